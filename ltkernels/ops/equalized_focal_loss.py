"""Equalized Focal Loss (docs/spec.md §2) with its per-class gradient statistics collected in the backward kernel.

`EqualizedFocalLoss` keeps the buffers `pos_grad`, `neg_grad` and `pos_neg` (in `state_dict`). Each backward through
its loss computes dL/dlogits and, in the same pass, the per-class sums of |dL/dlogits| over positive and negative
targets (the upstream gradient, e.g. a loss weight, included); these per-step sums are all-reduced over the ranks
of a `torch.distributed` job and added to the buffers, and `pos_neg` is refreshed. No hooks, no host syncs.

NaN or infinite logits give a NaN/inf loss and gradient (visible to the caller, e.g. to a GradScaler or a NaN
check), but never reach the buffers: a backward whose statistics are not all finite leaves the three buffers
unchanged (decided on the device, without a sync).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._ext import has_op
from .._validate import (
    ArgumentTypeError,
    ArgumentValueError,
    acc_dtype,
    background_last,
    can_read_values,
    check_labels,
    check_tensor,
    dtype_name,
    floating_dtypes,
    refuse_double_backward,
    to_background_first,
)
from .loss_common import accumulate_statistics, as_normalizer, distributed, register_saved_gradient_autograd

__all__ = ["equalized_focal_loss", "EqualizedFocalLoss"]

_OP = "equalized_focal_loss"


def _default_normalizer(labels: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    """max(positives, 1); in a distributed job max(positives summed over ranks, 1) / world size, as the official
    code computes it (clamp first, then divide: a step with fewer positives than ranks gets 1 / world size, and
    the gradients that DDP averages over ranks then sum to those of one process on the whole batch). On the
    device. Rows labelled `ignore_index` are not positives, whatever its value."""
    num_pos = ((labels > 0) & (labels != ignore_index)).sum().to(torch.float32)
    if distributed():
        dist.all_reduce(num_pos)
        return num_pos.clamp(min=1.0) / dist.get_world_size()
    return num_pos.clamp(min=1.0)


@torch.library.custom_op("ltkernels::equalized_focal_loss_accumulate", mutates_args=("pos_grad", "neg_grad", "pos_neg"))
def _accumulate(pos_grad: torch.Tensor, neg_grad: torch.Tensor, pos_neg: torch.Tensor, pos_step: torch.Tensor,
                neg_step: torch.Tensor) -> None:
    """Adds one backward's statistics (summed over ranks in a distributed job) to the buffers; refreshes pos_neg.
    A step whose statistics are not all finite (NaN/inf logits) is dropped, decided on the device."""
    accumulate_statistics(pos_grad, neg_grad, pos_neg, pos_step, neg_step, True)


@_accumulate.register_fake
def _(pos_grad, neg_grad, pos_neg, pos_step, neg_step):
    return None


@torch.library.custom_op("ltkernels::equalized_focal_loss_default_normalizer", mutates_args=())
def _default_normalizer_op(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """`_default_normalizer` as an op, so that a scripted loss all-reduces the positive count as eager does."""
    return _default_normalizer(labels, ignore_index)


@_default_normalizer_op.register_fake
def _(labels, ignore_index):
    return labels.new_empty((), dtype=torch.float32)


def fake_check_inputs(logits, labels, pos_neg, normalizer, quality=None) -> None:
    """The kernels' shape checks (csrc/equalized_focal_loss.h), for the fake tensors of EFL and EQFL."""
    torch._check(logits.dim() == 2, lambda: f"logits must be 2-D, got {logits.shape}")
    n, c = logits.size(0), logits.size(1)
    torch._check(labels.dim() == 1 and labels.size(0) == n, lambda: f"labels must have shape [{n}], got {labels.shape}")
    torch._check(pos_neg.dim() == 1 and pos_neg.size(0) == c,
                 lambda: f"pos_neg must have shape [{c}], got {pos_neg.shape}")
    torch._check(normalizer.numel() == 1, lambda: f"normalizer must hold one value, got {normalizer.shape}")
    if quality is not None:
        torch._check(quality.dim() == 1 and quality.size(0) == n,
                     lambda: f"quality must have shape [{n}], got {quality.shape}")


if has_op(_OP):

    @torch.library.register_fake("ltkernels::equalized_focal_loss")
    def _(logits, labels, pos_neg, normalizer, gamma_b, scale, alpha, ignore_index, pos_grad=None, neg_grad=None):
        fake_check_inputs(logits, labels, pos_neg, normalizer)
        return logits.new_empty((), dtype=acc_dtype(logits.dtype))

    @torch.library.register_fake("ltkernels::_equalized_focal_loss_backward")
    def _(grad_loss, logits, labels, pos_neg, normalizer, gamma_b, scale, alpha, ignore_index):
        fake_check_inputs(logits, labels, pos_neg, normalizer)
        acc = acc_dtype(logits.dtype)
        c = logits.shape[1]
        return (torch.empty_like(logits, memory_format=torch.contiguous_format), logits.new_empty((c,), dtype=acc),
                logits.new_empty((c,), dtype=acc))

    def _setup_context(ctx, inputs, output):
        logits, labels, pos_neg, normalizer, gamma_b, scale, alpha, ignore_index, pos_grad, neg_grad = inputs
        # pos_neg is snapshotted: the backward of this very loss (or of another one) may update the buffer before
        # this backward runs, and the gradient must use the g_j of the forward.
        ctx.save_for_backward(logits, labels, pos_neg.clone(), normalizer)
        ctx.params = (gamma_b, scale, alpha, ignore_index)
        ctx.buffers = (pos_grad, neg_grad, pos_neg) if pos_grad is not None else None

    def _backward(ctx, grad):
        refuse_double_backward("equalized_focal_loss")
        logits, labels, pos_neg, normalizer = ctx.saved_tensors
        grad_logits, pos_step, neg_step = torch.ops.ltkernels._equalized_focal_loss_backward(
            grad, logits, labels, pos_neg, normalizer, *ctx.params)
        if ctx.buffers is not None:
            _accumulate(*ctx.buffers, pos_step, neg_step)
        return grad_logits, None, None, None, None, None, None, None, None, None

    torch.library.register_autograd("ltkernels::equalized_focal_loss", _backward, setup_context=_setup_context)

    @torch.library.register_fake("ltkernels::_equalized_focal_loss_fused")
    def _(logits, labels, pos_neg, normalizer, gamma_b, scale, alpha, ignore_index, pos_grad=None, neg_grad=None):
        fake_check_inputs(logits, labels, pos_neg, normalizer)
        return fake_fused_outputs(logits)

    register_saved_gradient_autograd("_equalized_focal_loss_fused", 10, (
        lambda inputs: None if inputs[8] is None else (inputs[8], inputs[9], inputs[2]), _accumulate),
        name="equalized_focal_loss")


def fake_fused_outputs(logits):
    """(loss, grad_logits, pos_step, neg_step) of the one-pass training step."""
    acc, c = acc_dtype(logits.dtype), logits.shape[1]
    return (logits.new_empty((), dtype=acc), torch.empty_like(logits, memory_format=torch.contiguous_format),
            logits.new_empty((c,), dtype=acc), logits.new_empty((c,), dtype=acc))


def check_params(gamma_b: float, scale: float, alpha: float, ignore_index: int, num_classes: int) -> None:
    """The scalar arguments of EFL / EQFL: finite gamma_b and scale, alpha in [0, 1] or -1 (no alpha_t), and an
    ignore_index that is not a label (0..C)."""
    if not math.isfinite(float(gamma_b)):
        raise ArgumentValueError(f"gamma_b must be a finite number, got {gamma_b}")
    if not math.isfinite(float(scale)):
        raise ArgumentValueError(f"scale must be a finite number, got {scale}")
    if not (0.0 <= float(alpha) <= 1.0 or float(alpha) == -1.0):
        raise ArgumentValueError(f"alpha must lie in [0, 1] (or be -1: no alpha weighting), got {alpha}")
    if 0 <= int(ignore_index) <= num_classes:
        raise ArgumentValueError(f"ignore_index must not be a label (0..{num_classes}), got {ignore_index}")


def check_unit_interval(name: str, t: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
    """Every value of `t` (where `mask`) in [0, 1], NaN refused (a host sync)."""
    v = t if mask is None else t[mask]
    bad = ~((v >= 0) & (v <= 1))
    if bool(bad.any()):
        raise ArgumentValueError(f"{name} must lie in [0, 1], found {float(v[bad][0])}")


def _check_buffer(name: str, t: Tensor, logits: Tensor) -> None:
    check_tensor(name, t, ndim=1, dtypes=floating_dtypes(), device=logits.device)
    if t.shape[0] != logits.shape[1]:
        raise ArgumentValueError(f"logits have {logits.shape[1]} classes but {name} has {t.shape[0]} entries")


def _prepare(logits: Tensor, labels: Tensor, pos_neg: Optional[Tensor], normalizer: Optional[Union[float, Tensor]],
             gamma_b: float, scale: float, alpha: float, ignore_index: int, pos_grad: Optional[Tensor],
             neg_grad: Optional[Tensor], validate: Optional[bool], label_layout: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Checks the arguments shared by EFL and EQFL; returns (labels background-first, pos_neg, normalizer 0-d
    float32 on the logits' device). Data-dependent checks (label range, pos_neg and a tensor normalizer's values)
    run when `validate` (default: CPU in eager mode)."""
    check_tensor("logits", logits, ndim=2, dtypes=floating_dtypes())
    check_tensor("labels", labels, ndim=1, device=logits.device)
    if labels.shape[0] != logits.shape[0]:
        raise ArgumentValueError(f"labels must have {logits.shape[0]} entries (one per row of logits), got "
                                 f"{labels.shape[0]}")
    c = logits.shape[1]
    convert = background_last(label_layout)
    check_params(gamma_b, scale, alpha, ignore_index, c)
    if gamma_b < 0 or (scale != 0 and gamma_b <= 0):
        raise ArgumentValueError(f"gamma_b must be > 0 (or >= 0 with scale=0), got {gamma_b}")
    if scale < 0:
        raise ArgumentValueError(f"scale must be >= 0, got {scale}")
    if validate is None:
        # the CPU kernel raises on out-of-range labels too, so a compiled graph (no data-dependent check) stays safe
        validate = can_read_values(logits)
    if validate:
        check_labels("labels", labels, c, ignore_index)
    elif labels.dtype not in [torch.int64, torch.int32]:
        raise ArgumentTypeError(f"labels must be int64 or int32, got {dtype_name(labels.dtype)}")
    if convert:
        labels = to_background_first(labels, c, ignore_index)
    if pos_neg is None:
        if pos_grad is not None or neg_grad is not None:
            raise ArgumentValueError("pos_grad and neg_grad need pos_neg (the three statistics buffers go together)")
        pos_neg = torch.ones(c, dtype=torch.float32, device=logits.device)
    _check_buffer("pos_neg", pos_neg, logits)
    if validate:
        check_unit_interval("pos_neg", pos_neg)
    if pos_grad is not None and neg_grad is not None:
        _check_buffer("pos_grad", pos_grad, logits)
        _check_buffer("neg_grad", neg_grad, logits)
    elif pos_grad is not None or neg_grad is not None:
        raise ArgumentValueError("pass both pos_grad and neg_grad, or neither")
    if normalizer is None:
        if torch.jit.is_scripting():
            return labels, pos_neg, torch.ops.ltkernels.equalized_focal_loss_default_normalizer(labels, ignore_index)
        return labels, pos_neg, _default_normalizer(labels, ignore_index)
    return labels, pos_neg, as_normalizer(normalizer, logits.device, validate)


def equalized_focal_loss(logits: Tensor, labels: Tensor, pos_neg: Optional[Tensor] = None,
                         normalizer: Optional[Union[float, Tensor]] = None, gamma_b: float = 2.0, scale: float = 8.0,
                         alpha: float = 0.25, ignore_index: int = -1, pos_grad: Optional[Tensor] = None,
                         neg_grad: Optional[Tensor] = None, validate: Optional[bool] = None,
                         label_layout: str = "background_first") -> Tensor:
    """Equalized Focal Loss of `logits [N, C]` against `labels [N]` (0 = background, 1..C, `ignore_index` = ignored).

    loss = sum over non-ignored rows and classes of alpha_t * w_j * (1 - p_t)^gamma_j * (-log p_t) / normalizer,
    gamma_j = gamma_b + scale * (1 - pos_neg[j]), w_j = gamma_j / gamma_b (docs/spec.md §2). With `scale=0` (or
    `pos_neg=None`, i.e. all ones) this is sigmoid focal loss with gamma = gamma_b; `alpha=-1` disables alpha_t.

    normalizer: None = max(#rows with label >= 1, 1) computed on the device (in a distributed job, as the official
    code: max(positives summed over ranks, 1) / world size); a number or one-element tensor > 0 is used as is.
    alpha: in [0, 1], or -1 for no alpha_t. ignore_index must not be a label (0..C). Values out of range (and NaN)
    are refused with ArgumentValueError; the data-dependent ones (labels, pos_neg in [0, 1], a tensor normalizer)
    when `validate`.
    pos_grad, neg_grad (with pos_neg): [C] statistics buffers; when given, backpropagating this loss adds the
    per-class sums of |dL/dlogits| over positive / negative targets (all-reduced over ranks in a distributed job)
    and refreshes pos_neg = clamp(pos_grad / (neg_grad + 1e-10), 0, 1), in place. `EqualizedFocalLoss` does this.
    validate: check that labels are in range first (a host sync on CUDA). Default: on CPU in eager mode; the CPU
    kernel raises on out-of-range labels anyway, and the CUDA kernel fails with a device-side assertion.
    label_layout: "background_first" (the labels above) or "background_last" (mmdet / detectron2: classes 0..C-1,
    background C; column j of logits is class j in both).
    Returns a 0-d float32 tensor (float64 for float64 logits). Double backward (create_graph=True) raises.
    Scriptable (torch.jit.script), with the same checks, statistics updates and distributed behaviour.
    """
    labels, pos_neg, normalizer = _prepare(logits, labels, pos_neg, normalizer, gamma_b, scale, alpha, ignore_index,
                                           pos_grad, neg_grad, validate, label_layout)
    if logits.requires_grad and torch.is_grad_enabled():  # a training step: loss and gradient in one pass
        return torch.ops.ltkernels._equalized_focal_loss_fused(logits, labels, pos_neg, normalizer, float(gamma_b),
                                                               float(scale), float(alpha), int(ignore_index),
                                                               pos_grad, neg_grad)[0]
    return torch.ops.ltkernels.equalized_focal_loss(logits, labels, pos_neg, normalizer, float(gamma_b),
                                                    float(scale), float(alpha), int(ignore_index), pos_grad, neg_grad)


class EqualizedFocalLoss(nn.Module):
    """Equalized Focal Loss (CVPR 2022) for one-stage detectors, with its gradient statistics kept in buffers.

    forward(logits [N, C], labels [N], normalizer=None) -> scalar loss; labels 0 = background, 1..C = classes,
    `ignore_index` = ignored. The buffers `pos_grad`, `neg_grad` (start at 0) and `pos_neg` (starts at 1, i.e.
    plain focal loss) are updated each time the loss is back-propagated, from the gradient that reaches the logits
    (an upstream loss weight included); in a `torch.distributed` job the per-step sums are all-reduced first, so
    every rank holds the same buffers. They are in `state_dict`, so a resumed run continues its statistics.
    Statistics are float32 (call `.double()` on the module for float64 buffers). `label_layout="background_last"`
    takes mmdet / detectron2 labels (classes 0..C-1, background C).
    """

    def __init__(self, num_classes: int, gamma_b: float = 2.0, scale: float = 8.0, alpha: float = 0.25,
                 ignore_index: int = -1, label_layout: str = "background_first"):
        super().__init__()
        if int(num_classes) < 1:
            raise ArgumentValueError(f"num_classes must be >= 1, got {num_classes}")
        if gamma_b <= 0:
            raise ArgumentValueError(f"gamma_b must be > 0, got {gamma_b}")
        if scale < 0:
            raise ArgumentValueError(f"scale must be >= 0, got {scale}")
        check_params(gamma_b, scale, alpha, ignore_index, int(num_classes))
        background_last(label_layout)  # validates the name
        self.label_layout = label_layout
        self.num_classes = int(num_classes)
        self.gamma_b, self.scale, self.alpha = float(gamma_b), float(scale), float(alpha)
        self.ignore_index = int(ignore_index)
        self.register_buffer("pos_grad", torch.zeros(self.num_classes))
        self.register_buffer("neg_grad", torch.zeros(self.num_classes))
        self.register_buffer("pos_neg", torch.ones(self.num_classes))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, gamma_b={self.gamma_b}, scale={self.scale}, alpha={self.alpha}, "
                f"ignore_index={self.ignore_index}, label_layout={self.label_layout!r}")

    def forward(self, logits: Tensor, labels: Tensor, normalizer: Optional[Union[float, Tensor]] = None) -> Tensor:
        if isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[1] != self.num_classes:
            raise ArgumentValueError(f"logits have {logits.shape[1]} classes but the loss was built for "
                                     f"num_classes={self.num_classes}")
        return equalized_focal_loss(logits, labels, self.pos_neg, normalizer, self.gamma_b, self.scale, self.alpha,
                                    self.ignore_index, pos_grad=self.pos_grad, neg_grad=self.neg_grad,
                                    label_layout=self.label_layout)
