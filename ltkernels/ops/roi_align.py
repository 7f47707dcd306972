"""RoIAlign (Mask R-CNN) with torchvision.ops.roi_align's contract, a module, and a multi-level (FPN) pooler.

`roi_align` calls `torch.ops.ltkernels.roi_align`; its backward calls `torch.ops.ltkernels._roi_align_backward`, which
on CUDA gathers instead of using atomics (bitwise-reproducible gradients) when
`torch.are_deterministic_algorithms_enabled()`. The CPU backward is always deterministic.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._ext import has_op
from .._validate import FLOATING, check_tensor

__all__ = ["roi_align", "RoIAlign", "MultiLevelRoIAlign"]


# ---- argument handling ------------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def _output_size(output_size) -> tuple[int, int]:
    if _is_int(output_size):
        size = (output_size, output_size)
    elif isinstance(output_size, (tuple, list)) and len(output_size) == 2 and all(_is_int(v) for v in output_size):
        size = (output_size[0], output_size[1])
    else:
        raise TypeError(f"output_size must be an int or a pair of ints (height, width), got {output_size!r}")
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"output_size must be positive, got {tuple(size)}")
    return size


def _boxes_to_rois(boxes, input: Tensor) -> Tensor:
    """Tensor[K, 5] as is, or a list of Tensor[L, 4] (one per image) -> Tensor[K, 5] with the image index first."""
    if isinstance(boxes, Tensor):
        check_tensor("boxes", boxes, ndim=2, dtypes=FLOATING, device=input.device)
        if boxes.shape[1] != 5:
            raise ValueError(f"boxes given as one tensor must have shape [K, 5] (batch index, x1, y1, x2, y2), "
                             f"got shape {tuple(boxes.shape)}")
        return boxes
    if not isinstance(boxes, (list, tuple)):
        raise TypeError(f"boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}")
    if len(boxes) > input.shape[0] and not torch.compiler.is_compiling():
        raise ValueError(f"boxes is a list of {len(boxes)} tensors but input holds only {input.shape[0]} images")
    for i, b in enumerate(boxes):
        check_tensor(f"boxes[{i}]", b, ndim=2, dtypes=FLOATING, device=input.device)
        if b.shape[1] != 4:
            raise ValueError(f"boxes[{i}] must have shape [L, 4] (x1, y1, x2, y2), got shape {tuple(b.shape)}")
    if not boxes:
        return input.new_zeros((0, 5))
    dtype = boxes[0].dtype
    for b in boxes[1:]:
        dtype = torch.promote_types(dtype, b.dtype)
    parts = [torch.cat([torch.full_like(b[:, :1], i, dtype=dtype), b.to(dtype)], dim=1) for i, b in enumerate(boxes)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _check_rois_values(rois: Tensor, batch_size: int) -> None:
    """One fused check (one device sync on CUDA): finite coordinates and integer batch indices in [0, N)."""
    if rois.numel() == 0:
        return
    idx = rois[:, 0]
    bad = ~torch.isfinite(rois).all(dim=1) | (idx < 0) | (idx >= batch_size) | (idx != idx.trunc())
    if bool(bad.any()):
        if not bool(torch.isfinite(rois).all()):
            raise ValueError("boxes contains NaN or infinite values")
        k = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"boxes batch index (column 0) must be an integer in [0, {batch_size - 1}] for an input of "
                         f"{batch_size} images, got {float(idx[k])} at row {k}")


def roi_align(input: Tensor, boxes: Tensor | Sequence[Tensor], output_size: int | tuple[int, int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """RoIAlign with average pooling (Mask R-CNN); same arguments and results as `torchvision.ops.roi_align`.

    Args:
        input: Tensor[N, C, H, W], float32/float64/float16/bfloat16 (float16/bfloat16 accumulate in float32).
        boxes: Tensor[K, 5] of (batch index, x1, y1, x2, y2), or a list of N' <= N Tensor[L, 4] of (x1, y1, x2, y2),
            one per image, in input-image coordinates; on the device of `input`.
        output_size: int or (height, width) of the pooled output.
        spatial_scale: maps box coordinates to feature-map coordinates (1 / stride).
        sampling_ratio: samples per bin along each axis; <= 0 means adaptive, ceil(roi_size / output_size).
        aligned: shift boxes by -0.5 pixel (Detectron2); if False, RoIs are at least 1x1 (legacy behaviour).

    Returns:
        Tensor[K, C, output_size[0], output_size[1]] in the dtype of `input`, RoIs in the order given.
    """
    compiling = torch.compiler.is_compiling()
    check_tensor("input", input, ndim=4, dtypes=FLOATING)
    ph, pw = _output_size(output_size)
    if not _is_int(sampling_ratio):
        raise TypeError(f"sampling_ratio must be an int, got {type(sampling_ratio).__name__}")
    if not isinstance(spatial_scale, (int, float)) or isinstance(spatial_scale, bool) \
            or not math.isfinite(spatial_scale) or spatial_scale <= 0:
        raise ValueError(f"spatial_scale must be a positive finite number, got {spatial_scale!r}")
    rois = _boxes_to_rois(boxes, input)
    if not compiling:
        _check_rois_values(rois, input.shape[0])
    return torch.ops.ltkernels.roi_align(input, rois, float(spatial_scale), ph, pw, int(sampling_ratio),
                                         bool(aligned))


class RoIAlign(nn.Module):
    """Module form of `roi_align` (same constructor as torchvision.ops.RoIAlign)."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float, sampling_ratio: int,
                 aligned: bool = False):
        super().__init__()
        _output_size(output_size)
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois: Tensor | Sequence[Tensor]) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned})")


class MultiLevelRoIAlign(nn.Module):
    """FPN RoI pooler: each RoI is pooled from one pyramid level chosen by its size (FPN paper, eq. 1),
        level = floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6), clamped to the levels given,
    with one `roi_align` call per level; the result is in RoI order.

    Args:
        output_size: int or (height, width).
        sampling_ratio, aligned: as in `roi_align`.
        canonical_scale, canonical_level: a box of side canonical_scale goes to level canonical_level.
        strides: the stride of each feature map passed to forward, fine to coarse (powers of two), e.g.
            (4, 8, 16, 32) for P2-P5. None: inferred in forward from `image_size`, like torchvision's
            MultiScaleRoIAlign (stride = 2 ** round(log2(image_size / feature_size))).
    """

    def __init__(self, output_size: int | tuple[int, int], sampling_ratio: int = 2, canonical_scale: int = 224,
                 canonical_level: int = 4, aligned: bool = True, strides: Sequence[int] | None = (4, 8, 16, 32),
                 eps: float = 1e-6):
        super().__init__()
        self.output_size = _output_size(output_size)
        self.sampling_ratio = sampling_ratio
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.aligned = aligned
        self.eps = eps
        if strides is not None:
            strides = tuple(int(s) for s in strides)
            if not strides or any(s <= 0 or s & (s - 1) for s in strides) or list(strides) != sorted(set(strides)):
                raise ValueError(f"strides must be increasing powers of two, got {strides}")
        self.strides = strides

    def _strides(self, features: Sequence[Tensor], image_size) -> tuple[int, ...]:
        if self.strides is not None:
            if len(self.strides) != len(features):
                raise ValueError(f"features has {len(features)} levels but strides has {len(self.strides)}")
            return self.strides
        if image_size is None:
            raise ValueError("image_size (height, width) is needed to infer the strides (strides=None)")
        if isinstance(image_size, (list, tuple)) and image_size and isinstance(image_size[0], (list, tuple)):
            image_size = (max(s[0] for s in image_size), max(s[1] for s in image_size))
        strides = []
        for f in features:
            approx = float(image_size[0]) / float(f.shape[-2])
            strides.append(int(2 ** round(math.log2(approx))))
        return tuple(strides)

    def levels(self, rois: Tensor, strides: Sequence[int]) -> Tensor:
        """Index (0 = finest given) of the level each RoI [K, 5] is pooled from."""
        k_min, k_max = math.log2(strides[0]), math.log2(strides[-1])
        boxes = rois[:, 1:]
        size = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        lvl = torch.floor(self.canonical_level + torch.log2(size / self.canonical_scale)
                          + torch.tensor(self.eps, dtype=size.dtype, device=size.device))
        return (torch.clamp(lvl, min=k_min, max=k_max) - k_min).to(torch.int64)

    def forward(self, features: Sequence[Tensor], boxes: Tensor | Sequence[Tensor], image_size=None) -> Tensor:
        """features: list of Tensor[N, C, H_l, W_l], fine to coarse. boxes: Tensor[K, 5] or a list of Tensor[L, 4].
        image_size: (height, width) (or a list of them), only needed when strides=None."""
        if not isinstance(features, (list, tuple)) or not features:
            raise TypeError("features must be a non-empty list of Tensor[N, C, H, W], fine to coarse")
        for i, f in enumerate(features):
            check_tensor(f"features[{i}]", f, ndim=4, dtypes=FLOATING, device=features[0].device)
        strides = self._strides(features, image_size)
        rois = _boxes_to_rois(boxes, features[0])
        if not torch.compiler.is_compiling():
            _check_rois_values(rois, features[0].shape[0])  # before the level assignment, which NaN would derail
        if len(features) == 1:
            return roi_align(features[0], rois, self.output_size, 1.0 / strides[0], self.sampling_ratio,
                             self.aligned)
        levels = self.levels(rois, strides)
        first = features[0]
        out = first.new_zeros((rois.shape[0], first.shape[1], *self.output_size))
        for lvl, (feat, stride) in enumerate(zip(features, strides)):
            idx = torch.nonzero(levels == lvl).flatten()
            pooled = roi_align(feat, rois[idx], self.output_size, 1.0 / stride, self.sampling_ratio, self.aligned)
            out = out.index_put((idx,), pooled.to(out.dtype))
        return out

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(output_size={self.output_size}, sampling_ratio={self.sampling_ratio}, "
                f"canonical_scale={self.canonical_scale}, canonical_level={self.canonical_level}, "
                f"aligned={self.aligned}, strides={self.strides})")


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
