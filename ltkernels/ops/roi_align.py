"""RoIAlign (Mask R-CNN) with torchvision.ops.roi_align's contract, a module, and a multi-level (FPN) pooler.

`roi_align` calls `torch.ops.ltkernels.roi_align`; its backward calls `torch.ops.ltkernels._roi_align_backward`, which
on CUDA gathers instead of using atomics (bitwise-reproducible gradients) when
`torch.are_deterministic_algorithms_enabled()`. The CPU backward is always deterministic.
"""
from __future__ import annotations

import math
from typing import List, Tuple, Union

import torch
from torch import Tensor, nn
from torch.jit.annotations import BroadcastingList2

from .._ext import has_op
from .._validate import (
    ArgumentTypeError,
    ArgumentValueError,
    BoxesShapeError,
    acc_dtype,
    check_tensor,
    floating_dtypes,
    tracing,
)

__all__ = ["roi_align", "RoIAlign", "MAX_ADAPTIVE_SAMPLES"]

# Adaptive sampling (sampling_ratio <= 0) takes ceil(roi_size / output_size) samples per bin along each axis: a huge
# finite box would take hours. A RoI whose adaptive grid exceeds this many samples per bin (grid_h * grid_w) is an
# error on every device (the kernels share the limit: kMaxAdaptiveSamples in csrc/roi_align_math.h).
def _max_adaptive_samples() -> int:  # a function: TorchScript cannot read module-level constants
    return 1 << 20


MAX_ADAPTIVE_SAMPLES = _max_adaptive_samples()


# ---- argument handling ------------------------------------------------------------------------------------------
def _eager_output_size(output_size) -> List[int]:
    """Eager-mode type check of output_size (TorchScript's BroadcastingList2[int] does it when scripted)."""
    def is_int(v) -> bool:
        return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)

    if is_int(output_size):
        return [output_size, output_size]
    if isinstance(output_size, (tuple, list)) and len(output_size) == 2 and all(is_int(v) for v in output_size):
        return [output_size[0], output_size[1]]
    raise ArgumentTypeError(f"output_size must be an int or a pair of ints (height, width), got {output_size!r}")


def _check_output_size(output_size: List[int]) -> Tuple[int, int]:
    if len(output_size) != 2:
        raise ArgumentTypeError(f"output_size must be an int or a pair of ints (height, width), got {output_size}")
    if output_size[0] <= 0 or output_size[1] <= 0:
        raise ArgumentValueError(f"output_size must be positive, got {output_size}")
    return output_size[0], output_size[1]


def _check_scalars(spatial_scale: float, sampling_ratio: int) -> float:
    if not torch.jit.is_scripting():
        if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, (int, torch.SymInt)):
            raise ArgumentTypeError(f"sampling_ratio must be an int, got {type(sampling_ratio).__name__}")
        if isinstance(spatial_scale, bool) or not isinstance(spatial_scale, (int, float)):
            raise ArgumentValueError(f"spatial_scale must be a positive finite number, got "
                                     f"{type(spatial_scale).__name__} {spatial_scale}")
    scale = float(spatial_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ArgumentValueError(f"spatial_scale must be a positive finite number, got {scale}")
    return scale


def _check_box_tensor(name: str, b: Tensor, width: int, layout: str, input: Tensor) -> None:
    """Box shapes fail with BoxesShapeError (an AssertionError, as torchvision's check), the rest as usual."""
    if b.dim() != 2:
        raise BoxesShapeError(f"{name} must be 2-D, got shape {list(b.shape)}")
    if b.shape[1] != width:
        raise BoxesShapeError(f"{name} must have shape {layout}, got shape {list(b.shape)}")
    check_tensor(name, b, dtypes=floating_dtypes(), device=input.device)


def _boxes_to_rois(boxes: Union[Tensor, List[Tensor]], input: Tensor) -> Tensor:
    """Tensor[K, 5] as is, or a list of Tensor[L, 4] (one per image) -> Tensor[K, 5] with the image index first.

    The list form is concatenated in at least float32: an image index written in float16 (bfloat16) is inexact
    beyond 2048 (256); the kernels read RoIs in float32 (float64 for float64 input) anyway."""
    if isinstance(boxes, Tensor):
        _check_box_tensor("boxes", boxes, 5, "[K, 5] (batch index, x1, y1, x2, y2)", input)
        return boxes
    if not torch.jit.is_scripting():
        if not isinstance(boxes, (list, tuple)):
            raise ArgumentTypeError(f"boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got "
                                    f"{type(boxes).__name__}")
        if len(boxes) > input.shape[0] and not tracing():
            raise ArgumentValueError(f"boxes is a list of {len(boxes)} tensors but input holds only "
                                     f"{input.shape[0]} images")
    elif len(boxes) > input.shape[0]:
        raise ArgumentValueError(f"boxes is a list of {len(boxes)} tensors but input holds only "
                                 f"{input.shape[0]} images")
    dtype = torch.float32
    for i, b in enumerate(boxes):
        _check_box_tensor(f"boxes[{i}]", b, 4, "[L, 4] (x1, y1, x2, y2)", input)
        dtype = torch.promote_types(dtype, b.dtype)
    if len(boxes) == 0:
        return torch.zeros((0, 5), dtype=dtype, device=input.device)
    parts: List[Tensor] = []
    for i, b in enumerate(boxes):
        parts.append(torch.cat([torch.full((b.shape[0], 1), i, dtype=dtype, device=b.device), b.to(dtype)], 1))
    return torch.cat(parts)


def _check_rois_values(rois: Tensor, batch_size: int, spatial_scale: float, pooled_height: int, pooled_width: int,
                       sampling_ratio: int, aligned: bool, ordered: bool = False) -> None:
    """One fused check of every RoI (one device sync on CUDA): finite coordinates, an integer batch index in
    [0, batch_size), an adaptive grid within MAX_ADAPTIVE_SAMPLES, and with `ordered` x1 <= x2 and y1 <= y2."""
    if rois.numel() == 0:
        return
    acc = acc_dtype(rois.dtype)
    r = rois.to(acc)
    idx = r[:, 0]
    finite = torch.isfinite(r).all(dim=1)
    bad_index = (idx < 0) | (idx >= batch_size) | (idx != idx.trunc())
    bad_order = ((r[:, 3] < r[:, 1]) | (r[:, 4] < r[:, 2])) if ordered else torch.zeros_like(finite)
    if sampling_ratio <= 0:  # the kernels' arithmetic: csrc/roi_align_math.h
        offset = 0.5 if aligned else 0.0
        h = (r[:, 4] * spatial_scale - offset) - (r[:, 2] * spatial_scale - offset)
        w = (r[:, 3] * spatial_scale - offset) - (r[:, 1] * spatial_scale - offset)
        if not aligned:
            h, w = h.clamp(min=1.0), w.clamp(min=1.0)
        gh = torch.ceil(h / pooled_height).clamp(min=0).double()
        gw = torch.ceil(w / pooled_width).clamp(min=0).double()
        limit = _max_adaptive_samples()
        bad_grid = gh * gw > limit
    else:
        gh = torch.ones_like(idx, dtype=torch.float64)
        gw = gh
        bad_grid = torch.zeros_like(finite)
    bad = ~finite | bad_index | bad_order | bad_grid
    if tracing():
        torch._assert_async(~bad.any(), f"roi_align: boxes must be finite, with an integer batch index in [0, "
                                        f"{batch_size}), and an adaptive sampling grid of at most "
                                        f"{_max_adaptive_samples()} samples per bin")
        return
    if bool(bad.any()):
        if not bool(finite.all()):
            raise ArgumentValueError("boxes contains NaN or infinite values")
        k = int(torch.nonzero(bad)[0, 0])
        if bool(bad_index[k]):
            raise ArgumentValueError(f"boxes batch index (column 0) must be an integer in [0, {batch_size - 1}] "
                                     f"for an input of {batch_size} images, got {float(idx[k])} at row {k}")
        if bool(bad_order[k]):
            raise ArgumentValueError(f"boxes must have x1 <= x2 and y1 <= y2 (an inverted box has no pyramid "
                                     f"level), got ({float(r[k, 1])}, {float(r[k, 2])}, {float(r[k, 3])}, "
                                     f"{float(r[k, 4])}) at row {k}")
        raise ArgumentValueError(
            f"the box at row {k} needs an adaptive sampling grid of {int(gh[k])} x {int(gw[k])} samples per bin, "
            f"more than the limit of {_max_adaptive_samples()} (MAX_ADAPTIVE_SAMPLES); clip the boxes to the image "
            f"or pass sampling_ratio > 0")


@torch.fx.wrap
def roi_align(input: Tensor, boxes: Union[Tensor, List[Tensor]], output_size: BroadcastingList2[int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """RoIAlign with average pooling (Mask R-CNN); same arguments and results as `torchvision.ops.roi_align`.

    Args:
        input: Tensor[N, C, H, W], float32/float64/float16/bfloat16 (float16/bfloat16 accumulate in float32).
        boxes: Tensor[K, 5] of (batch index, x1, y1, x2, y2), or a list of N' <= N Tensor[L, 4] of (x1, y1, x2, y2),
            one per image, in input-image coordinates; on the device of `input`.
        output_size: int or (height, width) of the pooled output.
        spatial_scale: maps box coordinates to feature-map coordinates (1 / stride).
        sampling_ratio: samples per bin along each axis; <= 0 means adaptive, ceil(roi_size / output_size), at most
            MAX_ADAPTIVE_SAMPLES per bin.
        aligned: shift boxes by -0.5 pixel (Detectron2); if False, RoIs are at least 1x1 (legacy behaviour).

    Returns:
        Tensor[K, C, output_size[0], output_size[1]] in the dtype of `input`, RoIs in the order given.

    Scriptable (torch.jit.script) and a leaf of torch.fx tracing, like torchvision's.
    """
    if not torch.jit.is_scripting():
        # a call with torch.fx proxies (or other __torch_function__ tensors) is recorded as one call of this function
        parts = (input, *boxes) if isinstance(boxes, (list, tuple)) else (input, boxes)
        if torch.overrides.has_torch_function(parts):
            return torch.overrides.handle_torch_function(roi_align, parts, input, boxes, output_size, spatial_scale,
                                                         sampling_ratio, aligned)
    check_tensor("input", input, ndim=4, dtypes=floating_dtypes())
    if not torch.jit.is_scripting():
        output_size = _eager_output_size(output_size)
    ph, pw = _check_output_size(output_size)
    scale = _check_scalars(spatial_scale, sampling_ratio)
    rois = _boxes_to_rois(boxes, input)
    _check_rois_values(rois, input.shape[0], scale, ph, pw, sampling_ratio, aligned)
    return torch.ops.ltkernels.roi_align(input, rois, scale, ph, pw, int(sampling_ratio), bool(aligned))


class RoIAlign(nn.Module):
    """Module form of `roi_align` (same constructor as torchvision.ops.RoIAlign); scriptable."""

    def __init__(self, output_size: BroadcastingList2[int], spatial_scale: float, sampling_ratio: int,
                 aligned: bool = False):
        super().__init__()
        self._pooled = list(_check_output_size(_eager_output_size(output_size)))
        self.output_size = output_size
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)

    def forward(self, input: Tensor, rois: Union[Tensor, List[Tensor]]) -> Tensor:
        return roi_align(input, rois, self._pooled, self.spatial_scale, self.sampling_ratio, self.aligned)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned})")


# ---- fake tensors and autograd -------------------------------------------------------------------------------
if has_op("roi_align"):

    @torch.library.register_fake("ltkernels::roi_align")
    def _roi_align_fake(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
        torch._check(input.dim() == 4, lambda: f"input must be 4-D, got {input.dim()}-D")
        torch._check(rois.dim() == 2 and rois.size(1) == 5, lambda: "rois must have shape [K, 5]")
        return input.new_empty((rois.size(0), input.size(1), pooled_height, pooled_width))

    @torch.library.register_fake("ltkernels::_roi_align_backward")
    def _roi_align_backward_fake(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels,
                                 height, width, sampling_ratio, aligned, deterministic):
        torch._check(grad.dim() == 4, lambda: f"grad must be 4-D, got {grad.dim()}-D")
        return grad.new_empty((batch_size, channels, height, width))

    def _setup_context(ctx, inputs, output):
        input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = inputs
        ctx.save_for_backward(rois)
        ctx.input_shape = tuple(input.shape)
        ctx.args = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)

    def _backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = ctx.args
        n, c, h, w = ctx.input_shape
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.ops.ltkernels._roi_align_backward(
                grad, rois, spatial_scale, pooled_height, pooled_width, n, c, h, w, sampling_ratio, aligned,
                torch.are_deterministic_algorithms_enabled())
        return grad_input, None, None, None, None, None, None

    torch.library.register_autograd("ltkernels::roi_align", _backward, setup_context=_setup_context)

    # The backward is linear in `grad` with the adjoint of roi_align, so its own derivative is roi_align itself:
    # double backward (gradgradcheck) works.
    def _setup_context_bwd(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        spatial_scale, pooled_height, pooled_width = inputs[2:5]
        ctx.args = (spatial_scale, pooled_height, pooled_width, inputs[9], inputs[10])

    def _backward_bwd(ctx, grad_grad_input):
        (rois,) = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.ops.ltkernels.roi_align(grad_grad_input, rois, *ctx.args)
        return (grad,) + (None,) * 11

    torch.library.register_autograd("ltkernels::_roi_align_backward", _backward_bwd,
                                    setup_context=_setup_context_bwd)
