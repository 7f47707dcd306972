"""Equalized Focal Loss written from docs/spec.md §2 the way the official code computes it: a one-hot target
matrix, sigmoid, pow and log over the whole [N, C] block, autograd for the gradient, and the per-class statistics
taken from the gradient that reaches the logits (here a tensor hook instead of the official module hook).

It is the float64 test oracle and the "eager" benchmark baseline; `ltkernels.EqualizedFocalLoss` is the fast path.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["equalized_focal_loss", "efl_targets", "efl_statistics", "default_normalizer",
           "EqualizedFocalLossReference"]


def efl_targets(labels: torch.Tensor, num_classes: int, ignore_index: int = -1):
    """(targets [N, C] one-hot without the background column, valid [N] bool) in the float dtype of nothing: bool."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    onehot = torch.nn.functional.one_hot(safe, num_classes + 1)[:, 1:]
    return onehot.bool() & valid[:, None], valid


def default_normalizer(labels: torch.Tensor, dtype=torch.float32, ignore_index: int = -1) -> torch.Tensor:
    """max(positives, 1), or in a distributed job max(positives summed over ranks, 1) / world size (the official
    code: clamp first, then divide)."""
    num_pos = ((labels > 0) & (labels != ignore_index)).sum().to(dtype)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(num_pos)
        return num_pos.clamp(min=1) / dist.get_world_size()
    return num_pos.clamp(min=1)


def equalized_focal_loss(logits: torch.Tensor, labels: torch.Tensor, pos_neg: torch.Tensor | None = None,
                         normalizer=None, gamma_b: float = 2.0, scale: float = 8.0, alpha: float = 0.25,
                         ignore_index: int = -1) -> torch.Tensor:
    """The scalar loss of docs/spec.md §2 (differentiable in `logits`, nothing else)."""
    n, c = logits.shape
    targets, valid = efl_targets(labels, c, ignore_index)
    targets = targets.to(logits.dtype)
    if pos_neg is None:
        pos_neg = torch.ones(c, dtype=logits.dtype, device=logits.device)
    pred = torch.sigmoid(logits)
    pred_t = pred * targets + (1 - pred) * (1 - targets)
    gamma = (gamma_b + scale * (1 - pos_neg.detach().to(logits.dtype))).view(1, c).expand(n, c)
    weight = gamma / gamma_b if scale != 0 else torch.ones_like(gamma)
    cls_loss = -torch.log(pred_t) * torch.pow(1 - pred_t, gamma) * weight
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        cls_loss = alpha_t * cls_loss
    cls_loss = cls_loss * valid[:, None].to(logits.dtype)
    if normalizer is None:
        normalizer = default_normalizer(labels, logits.dtype, ignore_index)
    return cls_loss.sum() / normalizer


def efl_statistics(grad: torch.Tensor, labels: torch.Tensor, ignore_index: int = -1):
    """Per-class sums of |grad| over the positive and the negative targets of the non-ignored rows."""
    targets, valid = efl_targets(labels, grad.shape[1], ignore_index)
    g = grad.detach().abs()
    pos = (g * targets).sum(0)
    neg = (g * (~targets & valid[:, None])).sum(0)
    return pos, neg


class EqualizedFocalLossReference(nn.Module):
    """Eager EFL with the statistics collected from the logits' gradient by a hook (the official code path)."""

    def __init__(self, num_classes: int, gamma_b: float = 2.0, scale: float = 8.0, alpha: float = 0.25,
                 ignore_index: int = -1, dtype=torch.float32):
        super().__init__()
        self.num_classes, self.gamma_b, self.scale, self.alpha = num_classes, gamma_b, scale, alpha
        self.ignore_index = ignore_index
        self.register_buffer("pos_grad", torch.zeros(num_classes, dtype=dtype))
        self.register_buffer("neg_grad", torch.zeros(num_classes, dtype=dtype))
        self.register_buffer("pos_neg", torch.ones(num_classes, dtype=dtype))

    def collect(self, grad: torch.Tensor, labels: torch.Tensor) -> None:
        pos, neg = efl_statistics(grad, labels, self.ignore_index)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(pos)
            dist.all_reduce(neg)
        self.pos_grad += pos.to(self.pos_grad.dtype)
        self.neg_grad += neg.to(self.neg_grad.dtype)
        self.pos_neg.copy_(torch.clamp(self.pos_grad / (self.neg_grad + 1e-10), min=0, max=1))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, normalizer=None) -> torch.Tensor:
        loss = equalized_focal_loss(logits, labels, self.pos_neg, normalizer, self.gamma_b, self.scale, self.alpha,
                                    self.ignore_index)
        if logits.requires_grad:
            labels = labels.detach()
            logits.register_hook(lambda grad: self.collect(grad, labels))
        return loss
