"""Mask pasting in pure PyTorch, written from the contract (docs/spec.md §8 = torchvision's paste_masks_in_image):
the float64 test oracle and the "eager" benchmark peer. Vectorised over masks and pixels (no Python loop over
masks): the widened integer box of each mask, then for every image pixel inside it the bilinear value of the
zero-padded mask resized to the box (ATen's align_corners=False rule), computed in `compute_dtype`."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["paste_masks_reference", "expanded_int_boxes"]


def expanded_int_boxes(boxes: Tensor, m: int) -> Tensor:
    """torchvision's expand_boxes(boxes, (m + 2) / m).to(int64), in the boxes' dtype (float16/bfloat16 in float32)."""
    b = boxes if boxes.dtype in (torch.float32, torch.float64) else boxes.float()
    scale = float(m + 2) / m
    w_half = (b[:, 2] - b[:, 0]) * 0.5
    h_half = (b[:, 3] - b[:, 1]) * 0.5
    x_c = (b[:, 2] + b[:, 0]) * 0.5
    y_c = (b[:, 3] + b[:, 1]) * 0.5
    w_half = w_half * scale
    h_half = h_half * scale
    e = torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], dim=1)
    return e.double().clamp(-2.0 ** 40, 2.0 ** 40).to(torch.int64)


def _taps(size_in: int, n: Tensor, d: Tensor, dtype: torch.dtype):
    ratio = size_in / n.to(dtype)
    real = (ratio * (d.to(dtype) + 0.5) - 0.5).clamp(min=0)
    i0 = real.floor().to(torch.int64).clamp(max=size_in - 1)
    l1 = (real - i0.to(dtype)).clamp(0, 1)
    same = n == size_in
    i0 = torch.where(same, d, i0)
    l1 = torch.where(same, torch.zeros_like(l1), l1)
    i1 = i0 + (i0 < size_in - 1).to(torch.int64)
    return i0, i1, 1 - l1, l1


def paste_masks_reference(masks: Tensor, boxes: Tensor, image_size: Sequence[int], threshold: float | None = 0.5,
                          compute_dtype: torch.dtype = torch.float64) -> Tensor:
    """bool [K, H, W] (value > threshold), or the interpolated probabilities [K, H, W] in `compute_dtype` when
    `threshold` is None (0 outside the boxes)."""
    k, m = masks.shape[0], masks.shape[-1]
    height, width = int(image_size[0]), int(image_size[1])
    prob = torch.zeros((k, height, width), dtype=compute_dtype, device=masks.device)
    if k and height and width:
        p = m + 2
        padded = torch.nn.functional.pad(masks.to(compute_dtype), (1, 1, 1, 1))  # [K, P, P]
        ib = expanded_int_boxes(boxes, m).to(masks.device)
        x0, y0, x1, y1 = ib.unbind(1)
        w = (x1 - x0 + 1).clamp(min=1)
        h = (y1 - y0 + 1).clamp(min=1)
        ys = torch.arange(height, device=masks.device)
        xs = torch.arange(width, device=masks.device)
        dy = ys[None, :] - y0[:, None]  # [K, H]
        dx = xs[None, :] - x0[:, None]  # [K, W]
        in_y = (dy >= 0) & (ys[None, :] <= y1[:, None])
        in_x = (dx >= 0) & (xs[None, :] <= x1[:, None])
        yi0, yi1, ly0, ly1 = _taps(p, h[:, None].expand_as(dy), dy.clamp(min=0), compute_dtype)
        xi0, xi1, lx0, lx1 = _taps(p, w[:, None].expand_as(dx), dx.clamp(min=0), compute_dtype)
        yi0, yi1 = yi0.clamp(max=p - 1), yi1.clamp(max=p - 1)
        xi0, xi1 = xi0.clamp(max=p - 1), xi1.clamp(max=p - 1)
        kk = torch.arange(k, device=masks.device)[:, None, None]

        def at(yi, xi):
            return padded[kk, yi[:, :, None], xi[:, None, :]]

        r0 = at(yi0, xi0) * lx0[:, None, :] + at(yi0, xi1) * lx1[:, None, :]
        r1 = at(yi1, xi0) * lx0[:, None, :] + at(yi1, xi1) * lx1[:, None, :]
        v = r0 * ly0[:, :, None] + r1 * ly1[:, :, None]
        inside = in_y[:, :, None] & in_x[:, None, :]
        prob = torch.where(inside, v, prob)
    if threshold is None:
        return prob
    return prob > threshold
