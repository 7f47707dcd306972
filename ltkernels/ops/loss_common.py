"""What the classification losses share in Python: the distributed test, the default and the user-given normalizer,
and the update of per-class gradient statistics (EFL, EQL v2)."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .._validate import (
    ArgumentTypeError,
    ArgumentValueError,
    can_read_values,
    check_labels,
    dtype_name,
    refuse_double_backward,
)

__all__: list = []


def distributed() -> bool:
    """A torch.distributed job of more than one rank (never while scripted: the scripted losses reach
    torch.distributed through ops)."""
    if torch.jit.is_scripting():
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rows_normalizer(labels: Tensor, ignore_index: int) -> Tensor:
    """max(#rows not labelled `ignore_index`, 1) as a 0-d float32 tensor on the labels' device (mmdetection's
    avg_factor and detectron2's N for unit weights; per rank, as they compute it)."""
    return (labels != ignore_index).sum().to(torch.float32).clamp(min=1.0)


def as_normalizer(normalizer: Union[float, Tensor], device: torch.device, validate: bool) -> Tensor:
    """A number or one-element tensor > 0 as the 0-d float32 normalizer on `device` (a tensor's value is checked
    when `validate`)."""
    if not isinstance(normalizer, torch.Tensor):
        value = float(normalizer)
        if not value > 0:  # NaN too
            raise ArgumentValueError(f"normalizer must be > 0, got {value}")
        return torch.tensor(value, dtype=torch.float32, device=device)
    if normalizer.numel() != 1:
        raise ArgumentValueError(f"normalizer must be a number or a one-element tensor, got shape "
                                 f"{list(normalizer.shape)}")
    normalizer = normalizer.detach().reshape([]).to(device=device, dtype=torch.float32)
    if validate and not bool(normalizer > 0):
        raise ArgumentValueError(f"normalizer must be > 0, got {float(normalizer)}")
    return normalizer


def accumulate_statistics(pos_grad: Tensor, neg_grad: Tensor, pos_neg: Tensor, pos_step: Tensor, neg_step: Tensor,
                          clamp: bool) -> None:
    """Adds one step's per-class statistics (summed over ranks in a distributed job) to the buffers and refreshes
    pos_neg = pos_grad / (neg_grad + 1e-10), clamped to [0, 1] when `clamp` (EFL; EQL v2 does not clamp). A step
    whose statistics are not all finite (NaN/inf logits) is dropped, decided on the device."""
    dtype = torch.promote_types(pos_grad.dtype, pos_step.dtype)
    step = torch.stack([pos_step, neg_step]).to(dtype)
    if distributed():
        dist.all_reduce(step)
    ok = torch.isfinite(step).all()
    step = torch.where(ok, step, torch.zeros_like(step))
    pos_grad.add_(step[0].to(pos_grad.dtype))
    neg_grad.add_(step[1].to(neg_grad.dtype))
    ratio = pos_grad / (neg_grad + 1e-10)
    if clamp:
        ratio = torch.clamp(ratio, min=0, max=1)
    pos_neg.copy_(torch.where(ok, ratio.to(pos_neg.dtype), pos_neg))


def check_finite(name: str, value: float, minimum: Optional[float] = None, strict: bool = False) -> None:
    """A finite scalar argument, optionally >= (or, `strict`, >) `minimum`."""
    v = float(value)
    if not (v == v and abs(v) != float("inf")):
        raise ArgumentValueError(f"{name} must be a finite number, got {value}")
    if minimum is not None and (v <= minimum if strict else v < minimum):
        raise ArgumentValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")


def check_label_values(labels: Tensor, num_classes: int, ignore_index: int, validate: bool) -> None:
    """Labels in {ignore_index} U [0, num_classes] when `validate` (a host sync on an accelerator); otherwise only
    their dtype (the CPU kernels raise on what they read, the CUDA kernels assert on the device)."""
    if validate:
        check_labels("labels", labels, num_classes, ignore_index)
    elif labels.dtype not in [torch.int64, torch.int32]:
        raise ArgumentTypeError(f"labels must be int64 or int32, got {dtype_name(labels.dtype)}")


def register_saved_gradient_autograd(op: str, num_inputs: int, statistics=None, name: Optional[str] = None) -> None:
    """Autograd of a loss op whose outputs are (loss, dL/dlogits computed with d(loss) = 1, statistics...) and whose
    first input is the logits: the backward scales the saved gradient by the upstream one (or hands it over as it is
    when that is 1 and readable: no pass); the other outputs are not differentiable.

    statistics: None, or (buffers, accumulate) for statistics taken from the gradient that reaches the logits (EFL):
    outputs 2 and 3 are then the per-class steps for d(loss) = 1, which the backward scales by |d(loss)| and adds
    with accumulate(*buffers(inputs), pos_step, neg_step) when buffers(inputs) is not None.
    name: the loss's name in errors (default: op)."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*output[1:4] if statistics is not None else output[1:2])
        ctx.buffers = statistics[0](inputs) if statistics is not None else None
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # else autograd fills an [N, K] zero gradient for the unused outputs

    def backward(ctx, grad_loss, *unused):
        refuse_double_backward(name or op)
        grad = ctx.saved_tensors[0]
        rest = (None,) * (num_inputs - 1)
        if grad_loss is None:
            return (None,) + rest
        unit = can_read_values(grad) and can_read_values(grad_loss) and bool(grad_loss == 1)
        if not unit:  # in the loss's (accumulation) type, then rounded once to the logits' type
            grad = (grad.to(grad_loss.dtype) * grad_loss).to(grad.dtype)
        if ctx.buffers is not None:
            pos_step, neg_step = ctx.saved_tensors[1], ctx.saved_tensors[2]
            if not unit:
                scale = grad_loss.abs().to(pos_step.dtype)
                pos_step, neg_step = pos_step * scale, neg_step * scale
            statistics[1](*ctx.buffers, pos_step, neg_step)
        return (grad,) + rest

    torch.library.register_autograd(f"ltkernels::{op}", backward, setup_context=setup_context)
