"""Instance masks from LVIS / COCO segmentations (polygons or RLE), with pycocotools.

A segmentation is checked once when the annotation file is read (`check_segmentation`) and rasterised when an
image is loaded (`rasterize`), at the size of the transformed image: polygons are scaled (and flipped) as
coordinates and drawn at the target size, as detectron2 does, so a resize never blurs them; an RLE mask is decoded
at the image's original size and resized by nearest neighbour (then flipped).

Defects, each a key of `LVISDetection.skipped` when the dataset is built with masks (the annotation is skipped):
  bad_polygon_odd     a polygon with an odd number of coordinates
  bad_polygon_points  a polygon of fewer than 3 points (or an empty polygon list)
  bad_polygon_value   a coordinate that is not a finite number
  bad_rle             an RLE that is not {"size": [h, w], "counts": str or list of ints}
  bad_rle_size        an RLE whose size is not the image's (height, width)
  missing_segmentation  no `segmentation`, or one that is neither a polygon list nor an RLE
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["MASK_DEFECTS", "check_segmentation", "rasterize", "masks_to_rle", "paste_to_rle"]

MASK_DEFECTS = {
    "bad_polygon_odd": "segmentations with a polygon of an odd number of coordinates",
    "bad_polygon_points": "segmentations with a polygon of fewer than 3 points",
    "bad_polygon_value": "segmentations with a non-finite coordinate",
    "bad_rle": "malformed RLE segmentations",
    "bad_rle_size": "RLE segmentations whose size is not the image's",
    "missing_segmentation": "annotations without a polygon or RLE segmentation",
}

Segmentation = list[list[float]] | dict


def _mask_api():
    try:
        from pycocotools import mask as mask_api
    except ImportError as err:  # the models extra installs it
        raise ImportError("instance masks need pycocotools (pip install 'ltkernels[models]')") from err
    return mask_api


def check_segmentation(seg, height: int | None, width: int | None) -> tuple[Segmentation | None,
                                                                                   str | None]:
    """(the segmentation in a canonical form, None) or (None, the defect's key)."""
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if (not isinstance(size, (list, tuple)) or len(size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in size)):
            return None, "bad_rle"
        if isinstance(counts, list):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
                return None, "bad_rle"
            if sum(counts) != size[0] * size[1]:
                return None, "bad_rle"
        elif isinstance(counts, bytes):
            counts = counts.decode("ascii")
        elif not isinstance(counts, str):
            return None, "bad_rle"
        if height is not None and width is not None and (size[0], size[1]) != (int(height), int(width)):
            return None, "bad_rle_size"
        return {"size": [int(size[0]), int(size[1])], "counts": counts}, None
    if isinstance(seg, (list, tuple)):
        if not seg:
            return None, "bad_polygon_points"
        polys = []
        for poly in seg:
            if not isinstance(poly, (list, tuple)):
                return None, "missing_segmentation"
            try:
                vals = [float(v) for v in poly]
            except (TypeError, ValueError):
                return None, "bad_polygon_value"
            if not all(math.isfinite(v) for v in vals):
                return None, "bad_polygon_value"
            if len(vals) % 2:
                return None, "bad_polygon_odd"
            if len(vals) < 6:
                return None, "bad_polygon_points"
            polys.append(vals)
        return polys, None
    return None, "missing_segmentation"


def rasterize(segs: Sequence[Segmentation], orig_size: tuple[int, int], size: tuple[int, int],
              flipped: bool = False) -> torch.Tensor:
    """uint8 masks [K, h, w] at `size` = (h, w) of the segmentations given for an image of `orig_size`: polygons
    scaled by size / orig_size (x -> w - x when flipped), RLEs resized by nearest neighbour."""
    mask_api = _mask_api()
    oh, ow = orig_size
    h, w = size
    out = np.zeros((len(segs), h, w), dtype=np.uint8)
    if h == 0 or w == 0:
        return torch.from_numpy(out)
    sx, sy = w / float(ow), h / float(oh)
    for i, seg in enumerate(segs):
        if isinstance(seg, dict):
            rle = dict(seg)
            if isinstance(rle["counts"], list):
                rle = mask_api.frPyObjects(rle, *rle["size"])
            elif isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
            m = mask_api.decode(rle)
            if m.shape != (h, w):
                ys = np.minimum(((np.arange(h) + 0.5) * (m.shape[0] / h)).astype(np.int64), m.shape[0] - 1)
                xs = np.minimum(((np.arange(w) + 0.5) * (m.shape[1] / w)).astype(np.int64), m.shape[1] - 1)
                m = m[ys][:, xs]
            if flipped:
                m = m[:, ::-1]
            out[i] = m
        else:
            polys = []
            for p in seg:
                a = np.asarray(p, dtype=np.float64).reshape(-1, 2) * (sx, sy)
                if flipped:
                    a[:, 0] = w - a[:, 0]
                polys.append(a.reshape(-1).tolist())
            rles = mask_api.frPyObjects(polys, h, w)
            out[i] = mask_api.decode(mask_api.merge(rles))
    return torch.from_numpy(out)


def masks_to_rle(masks: torch.Tensor) -> list[dict]:
    """bool / uint8 masks [K, H, W] -> COCO RLE dicts with str counts (what LVIS result files hold)."""
    mask_api = _mask_api()
    if masks.shape[0] == 0:
        return []
    arr = np.asfortranarray(masks.detach().cpu().numpy().astype(np.uint8).transpose(1, 2, 0))
    rles = mask_api.encode(arr)
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def paste_to_rle(masks: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int], threshold: float = 0.5,
                 chunk_size: int = 32) -> list[dict]:
    """Mask probabilities [K, M, M] of boxes [K, 4] (x1y1x2y2 image pixels) -> K COCO RLE dicts at image_size (h, w):
    pasted by `ltkernels.paste_masks_chunks` (`chunk_size` full-size masks at a time, one reused buffer) and encoded
    chunk by chunk, so memory stays bounded with 300 detections of a large image."""
    import ltkernels

    if masks.shape[0] == 0:
        return []
    rles: list[dict] = []
    for _, chunk in ltkernels.paste_masks_chunks(masks.float(), boxes.to(masks.device).float(), image_size,
                                                 threshold, chunk_size=chunk_size):
        rles.extend(masks_to_rle(chunk))
    return rles
