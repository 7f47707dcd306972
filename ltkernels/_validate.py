"""Argument checks shared by the public functions: each failure names the argument and what was wrong."""
from __future__ import annotations

from collections.abc import Iterable

import torch

FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes: Iterable[torch.dtype] | None = None,
                 device: torch.device | None = None, last_dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if last_dim is not None and (t.dim() == 0 or t.shape[-1] != last_dim):
        raise ValueError(f"{name} must have size {last_dim} in its last dimension, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device} but must be on {device} (the device of the other inputs)")


def check_labels(name: str, labels: torch.Tensor, num_classes: int, ignore_index: int = -1, *,
                 sync: bool = True) -> None:
    """Labels must be integers in {ignore_index} U [0, num_classes].

    With `sync=False` (CUDA tensors, tracing) the range check is queued on the device with `torch._assert_async`:
    it fails at the next synchronisation instead of costing one now."""
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 or int32, got {str(labels.dtype).replace('torch.', '')}")
    if labels.numel() == 0:
        return
    msg = f"{name} must lie in 0..{num_classes} (0 = background) or be {ignore_index} (ignored)"
    bad = (labels != ignore_index) & ((labels < 0) | (labels > num_classes))
    if not sync:
        torch._assert_async(~bad.any(), msg)
    elif bool(bad.any()):
        raise ValueError(f"{msg}, found {int(labels[bad][0])}")
