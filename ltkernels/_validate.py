"""Argument checks shared by the public functions: each failure names the argument and what was wrong.

Everything here is TorchScript-compatible (plain positional-or-keyword arguments, no global containers), so the
public functions that call it can be scripted and keep their messages.

The error classes derive from the Python class that describes the mistake (ValueError, TypeError) and from the
class torchvision raises for it (RuntimeError from its kernels' checks, AssertionError from its box-shape checks),
so `except ValueError` and a torchvision caller's `except RuntimeError` both catch them.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor


class ArgumentValueError(ValueError, RuntimeError):
    """An argument has a valid type but a wrong shape, size, device or value."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument has the wrong type or dtype."""


class BoxesShapeError(ArgumentValueError, AssertionError):
    """RoI boxes of the wrong shape (torchvision asserts on these)."""


def floating_dtypes() -> List[torch.dtype]:
    return [torch.float32, torch.float64, torch.float16, torch.bfloat16]


FLOATING = tuple(floating_dtypes())


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation dtype for inputs of `dtype` (csrc/common.h, `ltk::acc_type`): float64 stays
    float64, float32 / float16 / bfloat16 accumulate in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tracing() -> bool:
    """Whether the op is being traced (torch.compile, torch.export, torch.jit.trace, fake or proxy tensors): then no
    tensor has values to read, and a data-dependent check is skipped or queued on the device instead."""
    if torch.jit.is_scripting():
        return False
    return (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None
            or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None)


def can_read_values(t: Tensor, sync: bool = False) -> bool:
    """May an op read `t`'s values now, e.g. for a check whose message names the bad value? Never while
    `tracing()`; for a plain CPU tensor always (free); for a tensor on an accelerator only when the caller accepts
    the host sync (`sync=True`)."""
    if torch.jit.is_scripting():
        return sync or t.device.type == "cpu"
    if tracing() or type(t) is not torch.Tensor:
        return False
    return sync or t.device.type == "cpu"


def dtype_name(d: torch.dtype) -> str:
    """`float32` rather than `torch.float32` (or, under TorchScript, the dtype's enum number)."""
    if not torch.jit.is_scripting():
        return str(d).replace("torch.", "")
    names = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
             torch.bfloat16: "bfloat16", torch.int64: "int64", torch.int32: "int32", torch.int16: "int16",
             torch.int8: "int8", torch.uint8: "uint8", torch.bool: "bool"}
    if d in names:
        return names[d]
    return str(d)


def check_tensor(name: str, t: Tensor, ndim: Optional[int] = None, dtypes: Optional[List[torch.dtype]] = None,
                 device: Optional[torch.device] = None, last_dim: Optional[int] = None) -> None:
    if not torch.jit.is_scripting():
        if not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ArgumentValueError(f"{name} must be {ndim}-D, got shape {list(t.shape)}")
    if last_dim is not None and (t.dim() == 0 or t.shape[-1] != last_dim):
        raise ArgumentValueError(f"{name} must have size {last_dim} in its last dimension, got shape "
                                 f"{list(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join([dtype_name(d) for d in dtypes])
        raise ArgumentTypeError(f"{name} must have dtype in ({allowed}), got {dtype_name(t.dtype)}")
    if device is not None and t.device != device:
        raise ArgumentValueError(f"{name} is on {t.device} but must be on {device} (the device of the other "
                                 f"inputs)")


def check_labels(name: str, labels: Tensor, num_classes: int, ignore_index: int = -1, sync: bool = True) -> None:
    """Labels must be integers in {ignore_index} U [0, num_classes].

    With `sync=False` (CUDA tensors, tracing) the range check is queued on the device with `torch._assert_async`:
    it fails at the next synchronisation instead of costing one now."""
    if labels.dtype not in [torch.int64, torch.int32]:
        raise ArgumentTypeError(f"{name} must be int64 or int32, got {dtype_name(labels.dtype)}")
    if labels.numel() == 0:
        return
    msg = f"{name} must lie in 0..{num_classes} (0 = background) or be {ignore_index} (ignored)"
    bad = (labels != ignore_index) & ((labels < 0) | (labels > num_classes))
    if not sync:
        torch._assert_async(~bad.any(), msg)
    elif bool(bad.any()):
        raise ArgumentValueError(f"{msg}, found {int(labels[bad][0])}")


def background_last(label_layout: str) -> bool:
    """The label layout of an op's labels: "background_first" (ltkernels, torchvision: 0 = background, classes
    1..C; the default) or "background_last" (mmdet, detectron2: classes 0..C-1, background C)."""
    if label_layout == "background_first":
        return False
    if label_layout == "background_last":
        return True
    raise ArgumentValueError(f"label_layout must be 'background_first' (0 = background, classes 1..C) or "
                             f"'background_last' (classes 0..C-1, background C), got '{label_layout}'")


def to_background_first(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """background_last labels (class c -> c, background C) to background_first (class c -> c + 1, background 0);
    ignored rows stay ignored. A bijection of 0..C, so range checks give the same verdict before or after."""
    shifted = torch.where(labels == num_classes, torch.zeros_like(labels), labels + 1)
    return torch.where(labels == ignore_index, labels, shifted)


def refuse_double_backward(op: str) -> None:
    """Called in a backward formula that is not itself differentiable: autograd enables grad mode there only when
    a graph of the gradient is requested (create_graph=True), which would silently get no second-order terms."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op} does not support double backward: its gradient is computed by a kernel that is "
                           f"not differentiable. Call backward / torch.autograd.grad without create_graph=True "
                           f"through this loss.")
