"""RoIAlign in pure PyTorch, written from the contract (docs/spec.md §3 = torchvision.ops.roi_align).

The samples of one bin form a grid_h x grid_w tensor product, and both the out-of-map rule and the border clamps act
on each axis on its own, so the bin average factorises into a row-weight matrix and a column-weight matrix:
    out[k, c] = Ay[k] @ input[n_k, c] @ Ax[k]^T,   Ay[k]: [PH, H], Ax[k]: [PW, W]
Ay[k][ph, r] sums, over the samples of bin row ph, the bilinear weight each gives pixel row r, divided by the sample
count grid_h * grid_w (at least 1). The float64 test oracle and the "eager" benchmark peer.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["roi_align_reference"]


def _axis_weights(start: Tensor, bin_size: Tensor, grid: Tensor, pooled: int, size: int) -> Tensor:
    """[K, pooled, size]: summed bilinear weights of the samples of each bin on each pixel along one axis."""
    k = start.shape[0]
    out = start.new_zeros((k, pooled, size))
    g_max = int(grid.max()) if k else 0
    if g_max <= 0 or size == 0:
        return out
    i = torch.arange(g_max, device=start.device, dtype=start.dtype)
    p = torch.arange(pooled, device=start.device, dtype=start.dtype)
    b = bin_size[:, None, None]
    g = grid.clamp(min=1).to(start.dtype)[:, None, None]
    v = start[:, None, None] + p[None, :, None] * b + (i[None, None, :] + 0.5) * b / g  # [K, P, G]
    use = (i[None, None, :] < grid[:, None, None]) & (v >= -1) & (v <= size)  # samples off the map count 0
    v = v.clamp(min=0)
    lo = v.floor().clamp(max=size - 1).long()
    at_edge = lo >= size - 1  # last row: both taps on it, no fractional part
    hi = torch.where(at_edge, lo, lo + 1)
    v = torch.where(at_edge, lo.to(v.dtype), v)
    frac = v - lo.to(v.dtype)
    zero = v.new_zeros(())
    out.scatter_add_(2, lo, torch.where(use, 1 - frac, zero))
    out.scatter_add_(2, hi, torch.where(use, frac, zero))
    return out


def _to_rois(boxes) -> Tensor:
    if isinstance(boxes, Tensor):
        return boxes
    parts = [torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)]
    return torch.cat(parts) if parts else torch.zeros((0, 5))


def roi_align_reference(input: Tensor, boxes, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
                        aligned: bool = False, compute_dtype: torch.dtype | None = torch.float64,
                        roi_chunk: int = 64) -> Tensor:
    """Same arguments as `ltkernels.roi_align`; computes in `compute_dtype` (None: the input's dtype) and returns
    the input's dtype. Differentiable with respect to `input` through autograd."""
    dtype = compute_dtype or input.dtype
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    rois = _to_rois(boxes).to(device=input.device, dtype=dtype)
    x = input.to(dtype)
    n_img, channels, height, width = x.shape
    k = rois.shape[0]
    offset = 0.5 if aligned else 0.0
    start_w = rois[:, 1] * spatial_scale - offset
    start_h = rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - start_w
    roi_h = rois[:, 4] * spatial_scale - offset - start_h
    if not aligned:
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / ph, roi_w / pw
    if sampling_ratio > 0:
        grid_h = torch.full((k,), sampling_ratio, dtype=torch.long, device=x.device)
        grid_w = grid_h
    else:
        grid_h = torch.ceil(roi_h / ph).clamp(min=0).long()
        grid_w = torch.ceil(roi_w / pw).clamp(min=0).long()
    count = (grid_h * grid_w).clamp(min=1).to(dtype)
    ay = _axis_weights(start_h, bin_h, grid_h, ph, height) / count[:, None, None]
    ax = _axis_weights(start_w, bin_w, grid_w, pw, width)
    batch = rois[:, 0].long()
    out = x.new_zeros((k, channels, ph, pw))
    for n in range(n_img):
        ids = torch.nonzero(batch == n).flatten()
        for s in range(0, ids.numel(), roi_chunk):
            sel = ids[s:s + roi_chunk]
            rows = torch.einsum("kph,chw->kcpw", ay[sel], x[n])  # [k', C, PH, W]
            out[sel] = torch.einsum("kcpw,kqw->kcpq", rows, ax[sel])
    return out.to(input.dtype)
