"""Federated loss written from docs/spec.md §11 (detectron2's `use_fed_loss`), in plain PyTorch.

Logits `[N, C]` (one sigmoid per class; detectron2's background column carries no loss and is not an input),
targets as in §2 (class c in column c - 1, background rows all 0), rows labelled `ignore_index` take no part. The
loss is the binary cross-entropy summed over the non-ignored rows and the columns of a class set S (a bool `[C]`
mask), divided by the normalizer; the columns outside S get no gradient.

The class set of a step (every present class, plus negatives drawn in proportion to the weights) is random; this
module gives its deterministic parts: which classes are present and how many negatives §11 draws. It is the
float64 test oracle; `ltkernels.FederatedLoss` is the fast path.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["federated_loss", "federated_targets", "present_classes", "num_negatives", "class_weight",
           "default_normalizer"]


def federated_targets(labels: Tensor, num_classes: int, ignore_index: int = -1):
    """(targets `[N, C]` bool, class c in column c - 1, background and ignored rows all False; valid `[N]`)."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    return F.one_hot(safe, num_classes + 1)[:, 1:].bool() & valid[:, None], valid


def default_normalizer(labels: Tensor, dtype=torch.float64, ignore_index: int = -1) -> Tensor:
    """max(non-ignored rows, 1): detectron2's N."""
    return (labels != ignore_index).sum().to(dtype).clamp(min=1)


def present_classes(labels: Tensor, num_classes: int, ignore_index: int = -1) -> Tensor:
    """bool `[C]`: column c - 1 is True when some non-ignored row has label c (background is not a column)."""
    targets, _ = federated_targets(labels, num_classes, ignore_index)
    return targets.any(0)


def num_negatives(labels: Tensor, num_classes: int, num_fed_classes: int = 50, ignore_index: int = -1) -> int:
    """How many negatives §11 draws: max(num_fed_classes - distinct present labels, 0), the background label
    counting as one present label when a non-ignored background row exists (detectron2's count)."""
    valid = labels != ignore_index
    distinct = int(present_classes(labels, num_classes, ignore_index).sum())
    distinct += int(bool((valid & (labels == 0)).any()))
    return max(num_fed_classes - distinct, 0)


def class_weight(categories: Sequence[dict], power: float = 0.5) -> Tensor:
    """The sampling weights `[C]` float64 of LVIS category dicts: image_count ** power, in the order of the ids."""
    cats = sorted(categories, key=lambda c: c["id"])
    return torch.tensor([float(c["image_count"]) for c in cats], dtype=torch.float64) ** power


def federated_loss(logits: Tensor, labels: Tensor, classes: Tensor,
                   normalizer: Optional[Union[float, Tensor]] = None, ignore_index: int = -1) -> Tensor:
    """The scalar loss of §11 over the class set `classes` (bool `[C]`). Differentiable in `logits` only."""
    c = logits.shape[1]
    targets, valid = federated_targets(labels, c, ignore_index)
    x = logits[valid]
    t = targets[valid].to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    mask = classes.to(device=logits.device, dtype=torch.bool)
    if normalizer is None:
        normalizer = default_normalizer(labels, logits.dtype, ignore_index)
    return bce[:, mask].sum() / normalizer
