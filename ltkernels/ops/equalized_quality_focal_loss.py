"""Equalized Quality Focal Loss (EQFL, from the EFL paper, for IoU-aware one-stage detectors such as YOLOX or an
ATSS head whose classification score is trained towards the box IoU).

With y' the quality (IoU) of a positive row at its label's column and 0 everywhere else, p = sigmoid(x), and EFL's
per-class focusing factor gamma_j = gamma_b + scale * (1 - g_j) and weighting factor w_j = gamma_j / gamma_b:

    EQFL = sum over non-ignored rows and classes of  alpha_t * w_j * |y' - p|^gamma_j * BCE(p, y')  /  normalizer

It is EFL with a soft target on the positive column: the same fused kernels, the same statistics buffers and the
same update rule (`pos_grad[j]` sums |dL/dx| over the rows labelled j, `neg_grad[j]` over the others), the same
normalizer. With `scale=0` it is quality focal loss (GFL, with beta = gamma_b); with quality 1 on every positive it
is exactly EFL. No gradient flows into `quality` (a target, as in the official code).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .._ext import has_op
from .._validate import (
    ArgumentValueError,
    acc_dtype,
    can_read_values,
    check_tensor,
    floating_dtypes,
    refuse_double_backward,
)
from .equalized_focal_loss import (
    EqualizedFocalLoss,
    _accumulate,
    _prepare,
    check_unit_interval,
    fake_check_inputs,
    fake_fused_outputs,
)
from .loss_common import register_saved_gradient_autograd

__all__ = ["equalized_quality_focal_loss", "EqualizedQualityFocalLoss"]

_OP = "equalized_quality_focal_loss"

if has_op(_OP):

    @torch.library.register_fake("ltkernels::equalized_quality_focal_loss")
    def _(logits, labels, quality, pos_neg, normalizer, gamma_b, scale, alpha, ignore_index, pos_grad=None,
          neg_grad=None):
        fake_check_inputs(logits, labels, pos_neg, normalizer, quality)
        return logits.new_empty((), dtype=acc_dtype(logits.dtype))

    @torch.library.register_fake("ltkernels::_equalized_quality_focal_loss_backward")
    def _(grad_loss, logits, labels, quality, pos_neg, normalizer, gamma_b, scale, alpha, ignore_index):
        fake_check_inputs(logits, labels, pos_neg, normalizer, quality)
        acc = acc_dtype(logits.dtype)
        c = logits.shape[1]
        return (torch.empty_like(logits, memory_format=torch.contiguous_format), logits.new_empty((c,), dtype=acc),
                logits.new_empty((c,), dtype=acc))

    def _setup_context(ctx, inputs, output):
        logits, labels, quality, pos_neg, normalizer, gamma_b, scale, alpha, ignore_index, pos_grad, neg_grad = inputs
        # pos_neg snapshotted as in EFL: the gradient uses the g_j of its forward
        ctx.save_for_backward(logits, labels, quality, pos_neg.clone(), normalizer)
        ctx.params = (gamma_b, scale, alpha, ignore_index)
        ctx.buffers = (pos_grad, neg_grad, pos_neg) if pos_grad is not None else None

    def _backward(ctx, grad):
        refuse_double_backward(_OP)
        logits, labels, quality, pos_neg, normalizer = ctx.saved_tensors
        grad_logits, pos_step, neg_step = torch.ops.ltkernels._equalized_quality_focal_loss_backward(
            grad, logits, labels, quality, pos_neg, normalizer, *ctx.params)
        if ctx.buffers is not None:
            _accumulate(*ctx.buffers, pos_step, neg_step)
        return grad_logits, None, None, None, None, None, None, None, None, None, None

    torch.library.register_autograd("ltkernels::equalized_quality_focal_loss", _backward,
                                    setup_context=_setup_context)

    @torch.library.register_fake("ltkernels::_equalized_quality_focal_loss_fused")
    def _(logits, labels, quality, pos_neg, normalizer, gamma_b, scale, alpha, ignore_index, pos_grad=None,
          neg_grad=None):
        fake_check_inputs(logits, labels, pos_neg, normalizer, quality)
        return fake_fused_outputs(logits)

    register_saved_gradient_autograd("_equalized_quality_focal_loss_fused", 11, (
        lambda inputs: None if inputs[9] is None else (inputs[9], inputs[10], inputs[3]), _accumulate),
        name=_OP)


def equalized_quality_focal_loss(logits: Tensor, labels: Tensor, quality: Tensor, pos_neg: Optional[Tensor] = None,
                                 normalizer: Optional[Union[float, Tensor]] = None, gamma_b: float = 2.0,
                                 scale: float = 8.0, alpha: float = -1.0, ignore_index: int = -1,
                                 pos_grad: Optional[Tensor] = None, neg_grad: Optional[Tensor] = None,
                                 validate: Optional[bool] = None, label_layout: str = "background_first") -> Tensor:
    """Equalized Quality Focal Loss of `logits [N, C]` against `labels [N]` (0 = background, 1..C, `ignore_index`
    = ignored) with soft targets `quality [N]` in [0, 1] (the IoU of each positive row with its ground truth; read on
    positive rows only, no gradient).

    Every other argument is EFL's (`ltkernels.equalized_focal_loss`): pos_neg (g_j), normalizer (default
    max(#positives, 1), distributed as the official code), gamma_b, scale, ignore_index, the statistics buffers
    pos_grad / neg_grad, validate, label_layout. `alpha` defaults to -1 (no alpha_t), as in quality focal loss and
    the official EQFL; a value in [0, 1] weights the positive column by alpha and the others by 1 - alpha.
    validate also checks that quality lies in [0, 1] on the positive rows (a host sync on CUDA; the CPU kernel
    checks it anyway, the CUDA kernel asserts it on the device).
    Returns a 0-d float32 tensor (float64 for float64 logits). Double backward (create_graph=True) raises.
    Scriptable (torch.jit.script), as EFL.
    """
    check_tensor("logits", logits, ndim=2, dtypes=floating_dtypes())
    check_tensor("quality", quality, ndim=1, dtypes=floating_dtypes(), device=logits.device)
    if quality.shape[0] != logits.shape[0]:
        raise ArgumentValueError(f"quality must have {logits.shape[0]} entries (one per row of logits), got "
                                 f"{quality.shape[0]}")
    if validate is None:
        validate = can_read_values(logits)
    labels, pos_neg, normalizer = _prepare(logits, labels, pos_neg, normalizer, gamma_b, scale, alpha, ignore_index,
                                           pos_grad, neg_grad, validate, label_layout)
    if validate:
        positive = (labels > 0) & (labels != ignore_index)
        check_unit_interval("quality of the positive rows", quality.detach(), positive)
    if logits.requires_grad and torch.is_grad_enabled():  # a training step: loss and gradient in one pass
        return torch.ops.ltkernels._equalized_quality_focal_loss_fused(
            logits, labels, quality.detach(), pos_neg, normalizer, float(gamma_b), float(scale), float(alpha),
            int(ignore_index), pos_grad, neg_grad)[0]
    return torch.ops.ltkernels.equalized_quality_focal_loss(
        logits, labels, quality.detach(), pos_neg, normalizer, float(gamma_b), float(scale), float(alpha),
        int(ignore_index), pos_grad, neg_grad)


class EqualizedQualityFocalLoss(EqualizedFocalLoss):
    """Equalized Quality Focal Loss with EFL's gradient statistics in buffers (`pos_grad`, `neg_grad`, `pos_neg`,
    saved in `state_dict`, all-reduced under torch.distributed; see `EqualizedFocalLoss`).

    forward(logits [N, C], labels [N], quality [N], normalizer=None) -> scalar loss. `alpha` defaults to -1 (none).
    """

    def __init__(self, num_classes: int, gamma_b: float = 2.0, scale: float = 8.0, alpha: float = -1.0,
                 ignore_index: int = -1, label_layout: str = "background_first"):
        super().__init__(num_classes, gamma_b, scale, alpha, ignore_index, label_layout)

    def forward(self, logits: Tensor, labels: Tensor, quality: Tensor,  # type: ignore[override]
                normalizer: Optional[Union[float, Tensor]] = None) -> Tensor:
        if isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[1] != self.num_classes:
            raise ArgumentValueError(f"logits have {logits.shape[1]} classes but the loss was built for "
                                     f"num_classes={self.num_classes}")
        return equalized_quality_focal_loss(logits, labels, quality, self.pos_neg, normalizer, self.gamma_b,
                                            self.scale, self.alpha, self.ignore_index, pos_grad=self.pos_grad,
                                            neg_grad=self.neg_grad, label_layout=self.label_layout)
