"""Seesaw loss written from docs/spec.md §9 (mmdetection's formulation), in plain PyTorch.

The class logits are shifted by log(M_ij * C_ij), factors built from the detached logits and the class counts, so
autograd gives exactly the gradient of §9 (softmax(z) - onehot over the class columns of positive rows, softmax -
onehot over the two objectness columns of every non-ignored row, divided by the normalizer). It is the float64 test
oracle; `ltkernels.SeesawLoss` is the fast path.

Layout (§9): logits `[N, C + 2]`, columns 0..C-1 the classes 1..C, column C "object", column C + 1 "background";
labels 0 = background, 1..C, `ignore_index` = ignored; `cum_samples [C + 1]`, entry 0 background, entry c class c.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["seesaw_loss", "seesaw_counts", "seesaw_scores", "seesaw_factors", "default_normalizer"]


def seesaw_counts(labels: Tensor, num_classes: int, ignore_index: int = -1) -> Tensor:
    """Per-label row counts of the non-ignored rows, `[C + 1]` float64 (entry 0 background, entry c class c): what
    one forward adds to `cum_samples`."""
    valid = labels != ignore_index
    return torch.bincount(labels[valid].long(), minlength=num_classes + 1).to(torch.float64)


def default_normalizer(labels: Tensor, dtype=torch.float64, ignore_index: int = -1) -> Tensor:
    """max(non-ignored rows, 1): mmdetection's `avg_factor` for unit label weights."""
    return (labels != ignore_index).sum().to(dtype).clamp(min=1)


def seesaw_factors(cls_logits: Tensor, cls_labels: Tensor, cum_samples: Tensor, p: float = 0.8, q: float = 2.0,
                   eps: float = 1e-2) -> Tensor:
    """M_ij * C_ij of §9 for the positive rows: `cls_logits [P, C]` (class columns only), `cls_labels [P]` the
    0-based class column l' of each row, `cum_samples [C + 1]` in §9's order. Returns `[P, C]` (detached), with 1
    in each row's own column."""
    dtype = cls_logits.dtype
    c = cls_logits.shape[1]
    lab = cls_labels.long()
    factor = torch.ones(cls_logits.shape, dtype=dtype, device=cls_logits.device)
    if p > 0:
        n = cum_samples[1:].to(dtype).clamp(min=1)             # N_j, j = 0..C-1
        ratio = n[None, :] / n[lab][:, None]                   # N_j / N_l
        factor = factor * torch.where(ratio < 1, ratio.pow(p), torch.ones_like(ratio))
    if q > 0:
        sigma = torch.softmax(cls_logits.detach(), dim=1)
        own = sigma.gather(1, lab[:, None]).clamp(min=eps)     # max(sigma_l', eps)
        ratio = sigma / own
        factor = factor * torch.where(ratio > 1, ratio.pow(q), torch.ones_like(ratio))
    onehot = F.one_hot(lab, c).bool() if c > 0 else torch.zeros_like(factor, dtype=torch.bool)
    return torch.where(onehot, torch.ones_like(factor), factor).detach()


def seesaw_loss(logits: Tensor, labels: Tensor, cum_samples: Tensor,
                normalizer: Optional[Union[float, Tensor]] = None, p: float = 0.8, q: float = 2.0,
                eps: float = 1e-2, ignore_index: int = -1) -> Tensor:
    """The scalar loss of §9 with the given `cum_samples` (already holding this step's counts; not updated here).
    Differentiable in `logits` only."""
    n, cols = logits.shape
    c = cols - 2
    valid = labels != ignore_index
    pos = valid & (labels > 0)
    x_cls = logits[:, :c][pos]
    lab = (labels[pos] - 1).long()
    if normalizer is None:
        normalizer = default_normalizer(labels, logits.dtype, ignore_index)
    total = logits[:0].sum()  # 0, in the graph (a zero gradient) when nothing takes part
    if x_cls.shape[0] > 0:
        factor = seesaw_factors(x_cls, lab, cum_samples, p, q, eps)
        z = x_cls + factor.log()
        total = total - torch.log_softmax(z, dim=1).gather(1, lab[:, None]).sum()
    x_obj = logits[:, c:][valid]
    t = (labels[valid] == 0).long()                            # 0 "object" for positives, 1 background
    if x_obj.shape[0] > 0:
        total = total - torch.log_softmax(x_obj, dim=1).gather(1, t[:, None]).sum()
    return total / normalizer


def seesaw_scores(logits: Tensor) -> Tensor:
    """`[N, C + 1]`, column 0 P(background) from the objectness softmax, column c softmax over the class columns
    [c - 1] times P(object)."""
    c = logits.shape[1] - 2
    obj = torch.softmax(logits[:, c:], dim=1)
    cls = torch.softmax(logits[:, :c], dim=1)
    return torch.cat([obj[:, 1:2], cls * obj[:, 0:1]], dim=1)
