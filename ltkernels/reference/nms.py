"""NMS references written from docs/spec.md §4.

- `nms_reference` / `batched_nms_reference`: plain greedy NMS (the test oracle). The IoU is computed with the same
  arithmetic as torchvision's CPU kernel, in the input's precision (float16/bfloat16 upcast to float32; pass
  `dtype=torch.float64` for the exact-maths variant), the comparison `iou > iou_threshold` done in float64. Ties in
  score are broken by the lower index (a stable descending sort).
- `torchvision_multiclass_nms`: the LVIS post-processing pipeline of docs/spec.md (candidates -> torchvision
  `batched_nms` -> first K), the contract of `ltkernels.multiclass_nms` and the "torchvision" benchmark peer.
- `torchvision_offset_multiclass_nms`: the same pipeline through torchvision's coordinate-offset trick (one NMS
  over all candidates, boxes shifted by class id), the "torchvision-offset" benchmark peer.
- `multiclass_nms_reference`: the pipeline on `batched_nms_reference` (exact per-class NMS, stable ties).
"""
from __future__ import annotations

import torch

from .._validate import acc_dtype

__all__ = ["nms_reference", "batched_nms_reference", "multiclass_candidates", "torchvision_multiclass_nms",
           "torchvision_offset_multiclass_nms", "multiclass_nms_reference"]


def nms_reference(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Indices of the kept boxes in decreasing score order (ties: lower index first)."""
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    b = boxes.to(dtype or acc_dtype(boxes.dtype))
    x1, y1, x2, y2 = b.unbind(1)
    area = (x2 - x1) * (y2 - y1)
    order = torch.sort(scores.double(), descending=True, stable=True)[1]
    suppressed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        iou = inter / (area[i] + area - inter)
        suppressed |= iou.double() > iou_threshold
    return torch.tensor(keep, dtype=torch.int64, device=boxes.device)


def batched_nms_reference(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float,
                          dtype: torch.dtype | None = None) -> torch.Tensor:
    """Greedy NMS within each value of idxs; kept indices in decreasing score order (ties: lower index first)."""
    keep = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    for c in torch.unique(idxs).tolist():
        members = torch.nonzero(idxs == c).flatten()
        keep[members[nms_reference(boxes[members], scores[members], iou_threshold, dtype)]] = True
    kept = torch.nonzero(keep).flatten()
    return kept[torch.sort(scores[kept].double(), descending=True, stable=True)[1]]


def multiclass_candidates(boxes: torch.Tensor, scores: torch.Tensor, score_threshold: float):
    """Every (row, class) with score > score_threshold, in row-major order: (boxes, scores, labels 1..C, rows)."""
    rows, cls = torch.nonzero(scores > score_threshold, as_tuple=True)
    cand_boxes = boxes[rows, cls] if boxes.dim() == 3 else boxes[rows]
    return cand_boxes, scores[rows, cls], cls + 1, rows


def _pipeline(batched, boxes, scores, score_threshold, iou_threshold, max_per_image):
    cand_boxes, cand_scores, labels, rows = multiclass_candidates(boxes, scores, score_threshold)
    keep = batched(cand_boxes, cand_scores, labels, iou_threshold)
    if max_per_image is not None and max_per_image >= 0:
        keep = keep[:max_per_image]
    return cand_boxes[keep], cand_scores[keep], labels[keep], rows[keep]


def torchvision_multiclass_nms(boxes, scores, score_threshold=1e-4, iou_threshold=0.5, max_per_image=300):
    """docs/spec.md's reference: candidates -> torchvision.ops.batched_nms -> the first max_per_image."""
    import torchvision
    return _pipeline(torchvision.ops.batched_nms, boxes, scores, score_threshold, iou_threshold, max_per_image)


def torchvision_offset_multiclass_nms(boxes, scores, score_threshold=1e-4, iou_threshold=0.5, max_per_image=300):
    """The pipeline through torchvision's coordinate-offset trick whatever the candidate count."""
    from torchvision.ops.boxes import _batched_nms_coordinate_trick
    return _pipeline(_batched_nms_coordinate_trick, boxes, scores, score_threshold, iou_threshold, max_per_image)


def multiclass_nms_reference(boxes, scores, score_threshold=1e-4, iou_threshold=0.5, max_per_image=300):
    """The pipeline on batched_nms_reference: exact per-class NMS with ties broken by the candidate order."""
    return _pipeline(batched_nms_reference, boxes, scores, score_threshold, iou_threshold, max_per_image)
