"""EQL v2 written from docs/spec.md §10 (the authors' formulation), in plain PyTorch.

Layout (§10): logits `[N, C + 1]`, one sigmoid per column, columns 0..C-1 the classes 1..C, column C background;
the target of a row is 1 in the column of its label (column C for background rows), 0 elsewhere; rows labelled
`ignore_index` take no part. The weights come from `pos_neg [C]` (g) through f(g) = 1 / (1 + exp(-gamma (g - mu)))
and are constants for autograd. The statistics of a step are the weighted per-element gradients before
normalisation, w_ij |p_ij - t_ij|, summed per class over the positive and the negative targets (columns 0..C-1).

It is the float64 test oracle; `ltkernels.EQLv2Loss` is the fast path.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["eqlv2_loss", "eqlv2_targets", "eqlv2_weights", "eqlv2_statistics", "eqlv2_update", "eqlv2_scores",
           "default_normalizer"]


def eqlv2_targets(labels: Tensor, num_classes: int, ignore_index: int = -1) -> Tuple[Tensor, Tensor]:
    """(targets `[N, C + 1]` bool: class c in column c - 1, background in column C; valid `[N]` bool). Ignored rows
    have all-False targets."""
    valid = labels != ignore_index
    col = torch.where(labels > 0, labels - 1, torch.full_like(labels, num_classes))
    col = torch.where(valid, col, torch.full_like(labels, num_classes)).long()
    targets = F.one_hot(col, num_classes + 1).bool() & valid[:, None]
    return targets, valid


def default_normalizer(labels: Tensor, dtype=torch.float64, ignore_index: int = -1) -> Tensor:
    """max(non-ignored rows, 1): the official n_i."""
    return (labels != ignore_index).sum().to(dtype).clamp(min=1)


def eqlv2_weights(targets: Tensor, pos_neg: Optional[Tensor], gamma: float = 12.0, mu: float = 0.8,
                  alpha: float = 4.0, dtype=torch.float64) -> Tensor:
    """w_ij of §10 (`[N, C + 1]`, detached): pos_w_j where the target is 1, neg_w_j where it is 0; column C weighs
    1. `pos_neg=None` means +inf (every weight 1)."""
    c = targets.shape[1] - 1
    if pos_neg is None:
        f = torch.ones(c, dtype=dtype, device=targets.device)
    else:
        g = pos_neg.detach().to(dtype)
        f = 1 / (1 + torch.exp(-gamma * (g - mu)))
    neg_w = torch.cat([f, torch.ones(1, dtype=dtype, device=targets.device)])
    pos_w = 1 + alpha * (1 - neg_w)
    t = targets.to(dtype)
    return (pos_w[None, :] * t + neg_w[None, :] * (1 - t)).detach()


def eqlv2_loss(logits: Tensor, labels: Tensor, pos_neg: Optional[Tensor] = None,
               normalizer: Optional[Union[float, Tensor]] = None, gamma: float = 12.0, mu: float = 0.8,
               alpha: float = 4.0, ignore_index: int = -1) -> Tensor:
    """The scalar loss of §10 with the weights of `pos_neg` (None: all +inf, weights 1). Differentiable in
    `logits` only."""
    c = logits.shape[1] - 1
    targets, valid = eqlv2_targets(labels, c, ignore_index)
    x = logits[valid]
    t = targets[valid].to(logits.dtype)
    w = eqlv2_weights(targets[valid], pos_neg, gamma, mu, alpha, logits.dtype)
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    if normalizer is None:
        normalizer = default_normalizer(labels, logits.dtype, ignore_index)
    return (bce * w).sum() / normalizer


def eqlv2_statistics(logits: Tensor, labels: Tensor, pos_neg: Optional[Tensor] = None, gamma: float = 12.0,
                     mu: float = 0.8, alpha: float = 4.0, ignore_index: int = -1) -> Tuple[Tensor, Tensor]:
    """One step's (pos_step `[C]`, neg_step `[C]`): the per-class sums of w_ij |p_ij - t_ij| over the non-ignored
    rows whose target in column j is 1, resp. 0, for the class columns 0..C-1 (the background column is left out).
    The weights are those of the same `pos_neg` as the forward."""
    c = logits.shape[1] - 1
    targets, valid = eqlv2_targets(labels, c, ignore_index)
    dtype = logits.dtype
    x = logits.detach()[valid]
    t = targets[valid].to(dtype)
    w = eqlv2_weights(targets[valid], pos_neg, gamma, mu, alpha, dtype)
    g = w * (torch.sigmoid(x) - t).abs()
    return (g * t).sum(0)[:c], (g * (1 - t)).sum(0)[:c]


def eqlv2_update(pos_grad: Tensor, neg_grad: Tensor, pos_step: Tensor,
                 neg_step: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The buffers after one step: (pos_grad + pos_step, neg_grad + neg_step, pos_neg = pos_grad / (neg_grad +
    1e-10)), new tensors, no clamp."""
    pos_grad = pos_grad + pos_step.to(pos_grad.dtype)
    neg_grad = neg_grad + neg_step.to(neg_grad.dtype)
    return pos_grad, neg_grad, pos_grad / (neg_grad + 1e-10)


def eqlv2_scores(logits: Tensor) -> Tensor:
    """`[N, C + 1]`: column 0 sigmoid(x_C) (background), column c sigmoid(x_{c-1}) * (1 - sigmoid(x_C))."""
    s = torch.sigmoid(logits)
    bg = s[:, -1:]
    return torch.cat([bg, s[:, :-1] * (1 - bg)], dim=1)
