"""Federated loss (Zhou et al., "Probabilistic two-stage detection"; detectron2's `use_fed_loss`; docs/spec.md
§11) as one fused kernel, with its class set drawn on the device.

Each step trains the sigmoid classifier on a class set S: the classes present in the batch plus negatives drawn
without replacement with probability proportional to `weight` (the LVIS training image counts to the power 0.5)
until |S| reaches `num_fed_classes` (50). The draw takes the k largest of log(weight) + Gumbel noise, which has the
law of `torch.multinomial(weight, k, replacement=False)` and needs no host sync.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Union

import torch
from torch import Tensor, nn

from .._ext import has_op
from .._validate import (
    ArgumentValueError,
    acc_dtype,
    background_last,
    can_read_values,
    check_tensor,
    floating_dtypes,
    to_background_first,
)
from .loss_common import as_normalizer, check_label_values, register_saved_gradient_autograd, rows_normalizer

__all__ = ["federated_loss", "federated_loss_classes", "FederatedLoss"]


if has_op("federated_loss"):

    @torch.library.register_fake("ltkernels::federated_loss")
    def _(logits, labels, classes, normalizer, ignore_index):
        torch._check(logits.dim() == 2, lambda: f"logits must be 2-D, got {logits.shape}")
        n, c = logits.size(0), logits.size(1)
        torch._check(labels.dim() == 1 and labels.size(0) == n, lambda: f"labels must have shape [{n}]")
        torch._check(classes.dim() == 1 and classes.size(0) == c,
                     lambda: f"classes must have shape [{c}], got {classes.shape}")
        torch._check(normalizer.numel() == 1, lambda: f"normalizer must hold one value, got {normalizer.shape}")
        return (logits.new_empty((), dtype=acc_dtype(logits.dtype)),
                torch.empty_like(logits, memory_format=torch.contiguous_format))

    register_saved_gradient_autograd("federated_loss", 5)


def _check_labels_tensor(logits: Tensor, labels: Tensor) -> None:
    check_tensor("labels", labels, ndim=1, device=logits.device)
    if labels.shape[0] != logits.shape[0]:
        raise ArgumentValueError(f"labels must have {logits.shape[0]} entries (one per row of logits), got "
                                 f"{labels.shape[0]}")


def federated_loss(logits: Tensor, labels: Tensor, classes: Tensor, normalizer: Optional[Union[float, Tensor]] = None,
                   ignore_index: int = -1, validate: Optional[bool] = None,
                   label_layout: str = "background_first") -> Tensor:
    """Federated loss of `logits [N, C]` (one sigmoid per class) against `labels [N]` (0 = background, 1..C,
    `ignore_index` ignored) over the class set `classes [C]` (bool, or float weights: 1 inside, 0 outside; e.g.
    from `federated_loss_classes`): sum over non-ignored rows and the classes of S of BCE(x, t) / normalizer
    (docs/spec.md §11). Columns outside S get no gradient. normalizer: None = max(non-ignored rows, 1)
    (detectron2's N), or a number / one-element tensor > 0. Returns a 0-d float32 tensor (float64 for float64
    logits). Scriptable."""
    check_tensor("logits", logits, ndim=2, dtypes=floating_dtypes())
    c = logits.shape[1]
    _check_labels_tensor(logits, labels)
    check_tensor("classes", classes, ndim=1, device=logits.device)
    if classes.shape[0] != c:
        raise ArgumentValueError(f"classes must have {c} entries (one per column of logits), got {classes.shape[0]}")
    if 0 <= int(ignore_index) <= c:
        raise ArgumentValueError(f"ignore_index must not be a label (0..{c}), got {ignore_index}")
    if validate is None:
        validate = can_read_values(logits)
    check_label_values(labels, c, ignore_index, validate)
    if background_last(label_layout):
        labels = to_background_first(labels, c, ignore_index)
    weights = classes.detach().to(torch.float32) if classes.dtype == torch.bool else classes.detach()
    if not weights.is_floating_point():
        raise ArgumentValueError("classes must be a bool mask or floating-point weights")
    if validate and not bool((torch.isfinite(weights) & (weights >= 0)).all()):
        raise ArgumentValueError("classes must hold finite weights >= 0")
    if normalizer is None:
        norm = rows_normalizer(labels, ignore_index)
    else:
        norm = as_normalizer(normalizer, logits.device, validate)
    loss, _ = torch.ops.ltkernels.federated_loss(logits, labels, weights, norm, int(ignore_index))
    return loss


def federated_loss_classes(labels: Tensor, weight: Tensor, num_fed_classes: int = 50, ignore_index: int = -1,
                           generator: Optional[torch.Generator] = None) -> Tensor:
    """The class set S of one step as a bool [C] mask on the labels' device, drawn without a host sync: every class
    present among `labels` (0 = background, 1..C), plus negatives drawn without replacement with probability
    proportional to `weight [C]` among the other classes of weight > 0, so that |S| (counting the background label
    as detectron2 does when a background row exists) reaches `num_fed_classes`. Fewer are drawn when fewer classes
    of weight > 0 remain; none when the present ones reach `num_fed_classes`."""
    check_tensor("weight", weight, ndim=1, dtypes=floating_dtypes(), device=labels.device)
    check_tensor("labels", labels, ndim=1)
    if int(num_fed_classes) < 0:
        raise ArgumentValueError(f"num_fed_classes must be >= 0, got {num_fed_classes}")
    c = weight.shape[0]
    if 0 <= int(ignore_index) <= c:
        raise ArgumentValueError(f"ignore_index must not be a label (0..{c}), got {ignore_index}")
    check_label_values(labels, c, ignore_index, can_read_values(labels))
    valid = labels != ignore_index
    index = torch.where(valid, labels, torch.zeros_like(labels)).long()
    counts = torch.zeros(c + 1, dtype=torch.float32, device=labels.device).index_add_(0, index, valid.float())
    present = counts > 0
    wanted = int(num_fed_classes) - present.sum()  # a 0-d device tensor
    fg = present[1:]
    u = torch.rand(c, generator=generator, device=weight.device, dtype=torch.float64)
    w = weight.detach().to(torch.float64)
    keys = torch.log(w) - torch.log(-torch.log(u.clamp(min=1e-300)))  # Gumbel-max: log w + G
    keys = torch.where(fg | ~(w > 0), torch.full_like(keys, float("-inf")), keys)
    k = min(int(num_fed_classes), c)
    top = torch.topk(keys, k).indices
    rank = torch.arange(k, device=weight.device)
    chosen = (rank < wanted) & (keys[top] > float("-inf"))
    drawn = torch.zeros(c, dtype=torch.bool, device=weight.device).scatter(0, top, chosen)
    return fg | drawn


class FederatedLoss(nn.Module):
    """Federated loss for the sigmoid box classifier of a two-stage detector (detectron2's `use_fed_loss`).

    `weight [C]` (a buffer, in `state_dict`): the sampling weights of the classes, detectron2's LVIS image counts to
    the power 0.5 (`FederatedLoss.from_categories`). forward(logits [N, C], labels [N], normalizer=None) draws the
    step's class set on the device (`last_classes` holds it) and returns the loss. The classifier predicts C logits
    per RoI (`num_outputs`); `scores(logits)` gives [N, C + 1] scores: sigmoid per class, and in column 0 the
    probability that no class is present, prod_j (1 - sigmoid(x_j)).
    """

    def __init__(self, weight: Tensor, num_fed_classes: int = 50, ignore_index: int = -1,
                 label_layout: str = "background_first"):
        super().__init__()
        check_tensor("weight", weight, ndim=1, dtypes=floating_dtypes())
        if weight.shape[0] < 1:
            raise ArgumentValueError("weight must have one entry per class (C >= 1)")
        if not bool((torch.isfinite(weight) & (weight >= 0)).all()):
            raise ArgumentValueError("weight must be finite and >= 0")
        if int(num_fed_classes) < 1:
            raise ArgumentValueError(f"num_fed_classes must be >= 1, got {num_fed_classes}")
        c = weight.shape[0]
        if 0 <= int(ignore_index) <= c:
            raise ArgumentValueError(f"ignore_index must not be a label (0..{c}), got {ignore_index}")
        background_last(label_layout)
        self.num_classes = c
        self.num_fed_classes = int(num_fed_classes)
        self.ignore_index = int(ignore_index)
        self.label_layout = label_layout
        self.register_buffer("weight", weight.detach().clone().float())
        self.register_buffer("last_classes", torch.zeros(c, dtype=torch.bool), persistent=False)

    @classmethod
    def from_categories(cls, categories: List[Dict], power: float = 0.5, **kwargs) -> FederatedLoss:
        """From LVIS categories (dicts with `id` 1..C and `image_count`): weight = image_count ** power."""
        cats = sorted(categories, key=lambda d: int(d["id"]))
        ids = [int(d["id"]) for d in cats]
        if ids != list(range(1, len(ids) + 1)):
            raise ArgumentValueError("categories must have the contiguous ids 1..C")
        counts = torch.tensor([float(d["image_count"]) for d in cats], dtype=torch.float64)
        return cls((counts ** float(power)).float(), **kwargs)

    @classmethod
    def from_lvis(cls, version: str = "v1", power: float = 0.5, **kwargs) -> FederatedLoss:
        """From the bundled LVIS statistics ("v0.5" or "v1"): weight = training image count ** power."""
        from ..data import lvis_categories

        return cls.from_categories(lvis_categories(version), power, **kwargs)

    @property
    def num_outputs(self) -> int:
        return self.num_classes

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_fed_classes={self.num_fed_classes}, "
                f"ignore_index={self.ignore_index}, label_layout={self.label_layout!r}")

    def forward(self, logits: Tensor, labels: Tensor, normalizer: Optional[Union[float, Tensor]] = None,
                generator: Optional[torch.Generator] = None) -> Tensor:
        check_tensor("logits", logits, ndim=2, dtypes=floating_dtypes())
        if logits.shape[1] != self.num_classes:
            raise ArgumentValueError(f"logits must have num_classes = {self.num_classes} columns, got "
                                     f"{logits.shape[1]}")
        _check_labels_tensor(logits, labels)
        validate = can_read_values(logits)
        check_label_values(labels, self.num_classes, self.ignore_index, validate)
        if background_last(self.label_layout):
            labels = to_background_first(labels, self.num_classes, self.ignore_index)
        classes = federated_loss_classes(labels, self.weight, self.num_fed_classes, self.ignore_index, generator)
        self.last_classes.copy_(classes)
        return federated_loss(logits, labels, classes, normalizer, self.ignore_index, validate=validate)

    def scores(self, logits: Tensor) -> Tensor:
        none = torch.exp(-torch.nn.functional.softplus(logits).sum(dim=1, keepdim=True))
        return torch.cat([none, torch.sigmoid(logits)], dim=1)
