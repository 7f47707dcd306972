"""Mask pasting for Mask R-CNN inference (docs/spec.md §8): `paste_masks` resizes K low-resolution mask
probabilities into their boxes on the image and thresholds them in one kernel call, where torchvision's
`paste_masks_in_image` loops over the masks in Python and materialises a float image per mask.

Semantics: `paste_masks(masks, boxes, (H, W), t)` equals
`torchvision.models.detection.roi_heads.paste_masks_in_image(masks[:, None], boxes, (H, W))[:, 0] > t` on the same
inputs, one-pixel zero padding and the truncation of the widened box to integers included. Differences, by design:
  * a box that lies wholly outside the image pastes nothing (torchvision's slices turn negative there: it raises or
    pastes into the wrong columns);
  * float16/bfloat16 masks interpolate in float32 (torchvision rounds the weights and the result to the mask dtype),
    float16/bfloat16 boxes are widened in float32;
  * integer box coordinates are clamped to +-2^40 (torchvision would allocate a mask of the box's size);
  * a pixel's value is computed in ATen's order of operations; where the CPU build of torch contracts them into
    fused multiply-adds, a value within a few ulps of the threshold may fall on the other side.
Non-finite boxes raise ValueError (checked by the kernels; on CUDA that costs one host sync on the [K, 4] boxes).
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._ext import has_op
from .._validate import ArgumentTypeError, ArgumentValueError, check_tensor, dtype_name, floating_dtypes

__all__ = ["paste_masks", "paste_masks_chunks"]


def _image_size(image_size) -> Tuple[int, int]:
    if isinstance(image_size, torch.Size):
        image_size = tuple(image_size)
    if not isinstance(image_size, (tuple, list)) or len(image_size) != 2:
        raise ArgumentTypeError(f"image_size must be (height, width), got {image_size!r}")
    out = []
    for v in image_size:
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ArgumentTypeError(f"image_size must hold two ints, got {image_size!r}")
        if v < 0:
            raise ArgumentValueError(f"image_size must be non-negative, got {tuple(image_size)}")
        out.append(v)
    return out[0], out[1]


def _threshold(threshold) -> float:
    if isinstance(threshold, torch.Tensor):
        if threshold.numel() != 1:
            raise ArgumentTypeError("threshold must be a float or a one-element tensor")
        threshold = float(threshold)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ArgumentTypeError(f"threshold must be a float, got {type(threshold).__name__}")
    if threshold != threshold:
        raise ArgumentValueError("threshold must not be NaN")
    return float(threshold)


def _check(masks: Tensor, boxes: Tensor) -> None:
    check_tensor("masks", masks, ndim=3, dtypes=floating_dtypes())
    check_tensor("boxes", boxes, ndim=2, dtypes=floating_dtypes(), last_dim=4, device=masks.device)
    if masks.shape[1] != masks.shape[2]:
        raise ArgumentValueError(f"masks must be square, [K, M, M], got shape {list(masks.shape)}")
    if masks.shape[0] != boxes.shape[0]:
        raise ArgumentValueError(f"masks and boxes must hold the same number of masks, got masks of shape "
                                 f"{list(masks.shape)} and boxes of shape {list(boxes.shape)}")
    if masks.shape[1] == 0:
        raise ArgumentValueError(f"masks must be at least 1 x 1, got shape {list(masks.shape)}")


def paste_masks(masks: Tensor, boxes: Tensor, image_size: Sequence[int], threshold: float = 0.5, *,
                out: Optional[Tensor] = None) -> Tensor:
    """Pastes mask probabilities into their boxes on an image and thresholds them.

    Args:
        masks: Tensor[K, M, M] of mask probabilities (float32/float64/float16/bfloat16), e.g. the 28 x 28 output of
            a Mask R-CNN head for each detection's class, after the sigmoid.
        boxes: Tensor[K, 4] of (x1, y1, x2, y2) in image pixels, on the device of `masks`; finite. Parts outside the
            image are cut off.
        image_size: (H, W) of the image.
        threshold: a pixel is in the mask when its interpolated probability is > threshold.
        out: optional bool Tensor[K, H, W] (contiguous, on the device of `masks`) to write into, e.g. a slice of a
            buffer reused across images; it is returned.

    Returns:
        bool Tensor[K, H, W]: equal to torchvision's `paste_masks_in_image(masks[:, None], boxes, (H, W))[:, 0] >
        threshold` (see the module docstring for the differences).
    """
    _check(masks, boxes)
    height, width = _image_size(image_size)
    thr = _threshold(threshold)
    if out is None:
        return torch.ops.ltkernels.paste_masks(masks, boxes, height, width, thr)
    check_tensor("out", out, ndim=3, device=masks.device)
    if out.dtype != torch.bool:
        raise ArgumentTypeError(f"out must be a bool tensor, got {dtype_name(out.dtype)}")
    if tuple(out.shape) != (masks.shape[0], height, width):
        raise ArgumentValueError(f"out must have shape {[masks.shape[0], height, width]}, got {list(out.shape)}")
    if not out.is_contiguous():
        raise ArgumentValueError("out must be contiguous")
    torch.ops.ltkernels.paste_masks_into(masks, boxes, thr, out)
    return out


def paste_masks_chunks(masks: Tensor, boxes: Tensor, image_size: Sequence[int], threshold: float = 0.5,
                       chunk_size: int = 32, reuse_buffer: bool = True) -> Iterator[Tuple[int, Tensor]]:
    """`paste_masks` a chunk of masks at a time, so that 300 full-size masks never live at once.

    Yields (start, bool Tensor[k, H, W]) for masks start .. start + k - 1, k <= chunk_size. With `reuse_buffer`
    (the default) every chunk is a view of one buffer that the next chunk overwrites: consume it (e.g. encode it as
    RLE) or clone it before the next iteration.
    """
    _check(masks, boxes)
    height, width = _image_size(image_size)
    thr = _threshold(threshold)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ArgumentValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    k = masks.shape[0]
    buffer = None
    for start in range(0, k, chunk_size):
        n = min(chunk_size, k - start)
        if buffer is None or not reuse_buffer:
            rows = min(chunk_size, k) if reuse_buffer else n
            buffer = torch.empty((rows, height, width), dtype=torch.bool, device=masks.device)
        view = buffer[:n]
        torch.ops.ltkernels.paste_masks_into(masks[start:start + n], boxes[start:start + n], thr, view)
        yield start, view


# ---- fake tensors ---------------------------------------------------------------------------------------------
if has_op("paste_masks"):

    @torch.library.register_fake("ltkernels::paste_masks")
    def _paste_masks_fake(masks, boxes, height, width, threshold):
        torch._check(masks.dim() == 3, lambda: f"masks must be 3-D, got {masks.dim()}-D")
        torch._check(boxes.dim() == 2 and boxes.size(1) == 4, lambda: "boxes must have shape [K, 4]")
        torch._check(masks.size(0) == boxes.size(0), lambda: "masks and boxes must hold the same number of masks")
        return masks.new_empty((masks.size(0), height, width), dtype=torch.bool)

    @torch.library.register_fake("ltkernels::paste_masks_into")
    def _paste_masks_into_fake(masks, boxes, threshold, out):
        torch._check(out.dtype == torch.bool, lambda: "out must be a bool tensor")
        return None
