"""Equalized Quality Focal Loss written the way the official code computes it: binary cross-entropy with logits
against the soft targets (the quality of a positive row at its label's column, 0 elsewhere), times
|target - sigmoid(x)|^gamma_j and the weighting factor w_j, autograd for the gradient, and EFL's per-class
statistics taken from the gradient that reaches the logits (a tensor hook).

The float64 test oracle and the "eager" benchmark baseline of `ltkernels.EqualizedQualityFocalLoss`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .equalized_focal_loss import EqualizedFocalLossReference, default_normalizer, efl_targets

__all__ = ["equalized_quality_focal_loss", "eqfl_soft_targets", "EqualizedQualityFocalLossReference"]


def eqfl_soft_targets(labels: torch.Tensor, quality: torch.Tensor, num_classes: int, ignore_index: int = -1,
                      dtype=torch.float64):
    """(soft targets [N, C]: quality at each positive row's label column, 0 elsewhere; one-hot [N, C] bool; valid
    [N] bool)."""
    onehot, valid = efl_targets(labels, num_classes, ignore_index)
    soft = onehot.to(dtype) * quality.detach().to(dtype)[:, None]
    return soft, onehot, valid


def equalized_quality_focal_loss(logits: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor,
                                 pos_neg: torch.Tensor | None = None, normalizer=None, gamma_b: float = 2.0,
                                 scale: float = 8.0, alpha: float = -1.0, ignore_index: int = -1) -> torch.Tensor:
    """The scalar EQFL (differentiable in `logits` only). alpha = -1: no alpha_t (the official EQFL)."""
    n, c = logits.shape
    soft, onehot, valid = eqfl_soft_targets(labels, quality, c, ignore_index, logits.dtype)
    if pos_neg is None:
        pos_neg = torch.ones(c, dtype=logits.dtype, device=logits.device)
    gamma = (gamma_b + scale * (1 - pos_neg.detach().to(logits.dtype))).view(1, c).expand(n, c)
    weight = gamma / gamma_b if scale != 0 else torch.ones_like(gamma)
    pred = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, soft, reduction="none")
    loss = bce * (soft - pred).abs().pow(gamma) * weight
    if alpha >= 0:
        t = onehot.to(logits.dtype)
        loss = loss * (alpha * t + (1 - alpha) * (1 - t))
    loss = loss * valid[:, None].to(logits.dtype)
    if normalizer is None:
        normalizer = default_normalizer(labels, logits.dtype, ignore_index)
    return loss.sum() / normalizer


class EqualizedQualityFocalLossReference(EqualizedFocalLossReference):
    """Eager EQFL with EFL's statistics collected from the logits' gradient by a hook (the official code path)."""

    def __init__(self, num_classes: int, gamma_b: float = 2.0, scale: float = 8.0, alpha: float = -1.0,
                 ignore_index: int = -1, dtype=torch.float32):
        super().__init__(num_classes, gamma_b, scale, alpha, ignore_index, dtype)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor,
                normalizer=None) -> torch.Tensor:
        loss = equalized_quality_focal_loss(logits, labels, quality, self.pos_neg, normalizer, self.gamma_b,
                                            self.scale, self.alpha, self.ignore_index)
        if logits.requires_grad:
            labels = labels.detach()
            logits.register_hook(lambda grad: self.collect(grad, labels))
        return loss
