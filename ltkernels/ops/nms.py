"""NMS: torchvision-compatible `nms` / `batched_nms`, and the class-wise `multiclass_nms` of LVIS post-processing
(SPEC.md section 4), with `batched_multiclass_nms` for a whole batch of images in one call.

Exactness: the kept indices equal torchvision's (the IoU is computed with the arithmetic of torchvision's CPU kernel,
`iou > iou_threshold` suppresses). Ties in score are broken by the lower index (torchvision leaves the order of
equal scores to its sort); `multiclass_nms` breaks them by the reference's candidate order (row, then class).
float16/bfloat16 inputs are compared in float32, as if upcast. CUDA computes the same IoUs with correctly rounded
operations (no FMA contraction), so CPU and CUDA agree bit for bit. Non-finite boxes and NaN scores raise
ValueError; the kernels check them in their own pass (no extra host sync).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._ext import has_op
from .._validate import FLOATING, check_tensor

__all__ = ["nms", "batched_nms", "multiclass_nms", "batched_multiclass_nms"]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_iou_threshold(iou_threshold) -> float:
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, (int, float)):
        raise TypeError(f"iou_threshold must be a float, got {type(iou_threshold).__name__}")
    iou_threshold = float(iou_threshold)
    if math.isnan(iou_threshold) or iou_threshold < 0:
        raise ValueError(f"iou_threshold must be >= 0, got {iou_threshold}")
    return iou_threshold


def _check_boxes_scores(boxes, scores) -> None:
    check_tensor("boxes", boxes, ndim=2, dtypes=FLOATING, last_dim=4)
    check_tensor("scores", scores, ndim=1, dtypes=FLOATING, device=boxes.device)
    if scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"boxes and scores must have the same number of boxes, got boxes of shape "
                         f"{tuple(boxes.shape)} and scores of shape {tuple(scores.shape)}")
    if scores.dtype != boxes.dtype:
        raise TypeError(f"scores must have the dtype of boxes ({boxes.dtype}), got {scores.dtype}")


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression, a drop-in for `torchvision.ops.nms`.

    boxes [N, 4] (x1, y1, x2, y2), scores [N] of the same floating dtype; a box is removed when its IoU with a
    higher-scored kept box is > iou_threshold. Returns the int64 indices of the kept boxes in decreasing score order.
    """
    _check_boxes_scores(boxes, scores)
    iou_threshold = _check_iou_threshold(iou_threshold)
    return torch.ops.ltkernels.nms(boxes, scores, iou_threshold)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS within each category of `idxs` (boxes of different categories never suppress each other), a drop-in for
    `torchvision.ops.batched_nms`: the kept indices (int64) in decreasing score order. Exact at any number of
    categories (no coordinate offsets, no per-category loop)."""
    _check_boxes_scores(boxes, scores)
    check_tensor("idxs", idxs, ndim=1, dtypes=_INT_DTYPES, device=boxes.device)
    if idxs.shape[0] != boxes.shape[0]:
        raise ValueError(f"idxs must have one entry per box ({boxes.shape[0]}), got shape {tuple(idxs.shape)}")
    iou_threshold = _check_iou_threshold(iou_threshold)
    return torch.ops.ltkernels.batched_nms(boxes, scores, idxs, iou_threshold)


def _check_multiclass(boxes, scores, score_threshold, iou_threshold, max_per_image, what="scores"):
    check_tensor(what, scores, ndim=2, dtypes=FLOATING)
    check_tensor("boxes", boxes, dtypes=(scores.dtype,), device=scores.device)
    n, c = scores.shape
    if not ((boxes.dim() == 2 and tuple(boxes.shape) == (n, 4)) or
            (boxes.dim() == 3 and tuple(boxes.shape) == (n, c, 4))):
        raise ValueError(f"boxes must have shape [N, 4] (shared) or [N, C, 4] (class-specific) for scores of shape "
                         f"[N, C] = {tuple(scores.shape)}, got {tuple(boxes.shape)}")
    if isinstance(score_threshold, bool) or not isinstance(score_threshold, (int, float)):
        raise TypeError(f"score_threshold must be a float, got {type(score_threshold).__name__}")
    score_threshold = float(score_threshold)
    if math.isnan(score_threshold) or score_threshold < 0:
        raise ValueError(f"score_threshold must be >= 0, got {score_threshold}")
    iou_threshold = _check_iou_threshold(iou_threshold)
    if max_per_image is None:
        max_per_image = -1
    elif isinstance(max_per_image, bool) or not isinstance(max_per_image, int) or max_per_image < 1:
        raise ValueError(f"max_per_image must be a positive int or None (no limit), got {max_per_image!r}")
    return score_threshold, iou_threshold, max_per_image


def multiclass_nms(boxes: torch.Tensor, scores: torch.Tensor, score_threshold: float = 1e-4,
                   iou_threshold: float = 0.5, max_per_image: int | None = 300):
    """Class-wise NMS of one image, the LVIS post-processing step (SPEC.md section 4).

    scores [N, C] (background column removed), boxes [N, 4] shared by all classes or [N, C, 4] class-specific.
    Every (row, class) with score > score_threshold is a candidate, NMS (IoU > iou_threshold suppresses) runs within
    each class, and the max_per_image best survivors are returned (None: all) as
    `(boxes [K, 4], scores [K], labels [K] int64 in 1..C, row_index [K] int64)` in decreasing score order — exactly
    candidates -> `torchvision.ops.batched_nms` -> first K (ties in score: candidate order, row then class).
    """
    score_threshold, iou_threshold, max_per_image = _check_multiclass(
        boxes, scores, score_threshold, iou_threshold, max_per_image)
    image_index = torch.zeros(scores.shape[0], dtype=torch.int64, device=scores.device)
    b, s, labels, rows, _ = torch.ops.ltkernels.multiclass_nms(
        boxes, scores, image_index, 1, score_threshold, iou_threshold, max_per_image)
    return b, s, labels, rows


def batched_multiclass_nms(boxes, scores, image_index: torch.Tensor | None = None, num_images: int | None = None,
                           score_threshold: float = 1e-4, iou_threshold: float = 0.5,
                           max_per_image: int | None = 300, *, concat: bool = False):
    """`multiclass_nms` of every image of a batch in one call (one kernel pass, parallel over images).

    Either lists `boxes=[b_0, ...]`, `scores=[s_0, ...]` (one entry per image), or the rows of all images
    concatenated (`scores` [N, C], `boxes` [N, 4] or [N, C, 4]) with `image_index` [N] giving each row's image
    (0..num_images-1, rows of one image need not be contiguous). Returns a list of per-image
    `(boxes, scores, labels, row_index)` equal to per-image `multiclass_nms` calls (row_index counts rows within
    the image). With `concat=True` returns instead the concatenated `(boxes, scores, labels, row_index, image)`
    where row_index is the row of the concatenated input (no host sync beyond the op's own).
    """
    if isinstance(scores, (list, tuple)):
        if not isinstance(boxes, (list, tuple)) or len(boxes) != len(scores):
            raise ValueError("boxes and scores must both be lists with one entry per image")
        if image_index is not None:
            raise ValueError("image_index must be None when boxes and scores are per-image lists")
        if len(scores) == 0:
            raise ValueError("scores is an empty list: give at least one image")
        num_images = len(scores)
        for i, (b, s) in enumerate(zip(boxes, scores)):
            check_tensor(f"scores[{i}]", s, ndim=2, dtypes=FLOATING, device=scores[0].device)
            check_tensor(f"boxes[{i}]", b, dtypes=(s.dtype,), device=scores[0].device)
            if b.dim() != boxes[0].dim() or s.shape[1] != scores[0].shape[1]:
                raise ValueError("every image must have the same number of classes and the same box layout")
        sizes = [s.shape[0] for s in scores]
        image_index = torch.repeat_interleave(
            torch.arange(num_images, device=scores[0].device), torch.tensor(sizes, device=scores[0].device))
        boxes, scores = torch.cat(list(boxes)), torch.cat(list(scores))
        starts = torch.tensor([0] + sizes[:-1], device=scores.device).cumsum(0)
        local_row = torch.arange(scores.shape[0], device=scores.device) - starts[image_index]
    else:
        check_tensor("image_index", image_index, ndim=1, dtypes=(torch.int64, torch.int32), device=scores.device)
        if image_index.shape[0] != scores.shape[0]:
            raise ValueError(f"image_index must have one entry per row of scores ({scores.shape[0]}), "
                             f"got shape {tuple(image_index.shape)}")
        image_index = image_index.long()
        if num_images is None:
            num_images = int(image_index.max()) + 1 if image_index.numel() else 0
        if not _compiling() and image_index.numel() and (
                bool((image_index < 0).any()) or int(image_index.max()) >= num_images):
            raise ValueError(f"image_index must lie in [0, num_images={num_images})")
        local_row = None
    score_threshold, iou_threshold, max_per_image = _check_multiclass(
        boxes, scores, score_threshold, iou_threshold, max_per_image)
    b, s, labels, rows, images = torch.ops.ltkernels.multiclass_nms(
        boxes, scores, image_index, num_images, score_threshold, iou_threshold, max_per_image)
    if concat:
        return b, s, labels, rows, images
    if local_row is None:  # row within the image: rank among the rows of that image
        order = torch.sort(image_index, stable=True)[1]
        counts = torch.bincount(image_index, minlength=num_images)
        starts = counts.cumsum(0) - counts
        local_row = torch.empty_like(image_index)
        local_row[order] = torch.arange(order.numel(), device=order.device) - starts[image_index[order]]
    rows = local_row[rows]
    sizes = torch.bincount(images, minlength=num_images).tolist()
    return list(zip(b.split(sizes), s.split(sizes), labels.split(sizes), rows.split(sizes)))


# ---- torch.compile / autograd registrations --------------------------------------------------------------------

if has_op("nms"):
    @torch.library.register_fake("ltkernels::nms")
    def _nms_fake(boxes, scores, iou_threshold):
        k = torch.library.get_ctx().new_dynamic_size()
        return boxes.new_empty((k,), dtype=torch.int64)

if has_op("batched_nms"):
    @torch.library.register_fake("ltkernels::batched_nms")
    def _batched_nms_fake(boxes, scores, idxs, iou_threshold):
        k = torch.library.get_ctx().new_dynamic_size()
        return boxes.new_empty((k,), dtype=torch.int64)

if has_op("multiclass_nms"):
    @torch.library.register_fake("ltkernels::multiclass_nms")
    def _multiclass_nms_fake(boxes, scores, image_index, num_images, score_threshold, iou_threshold, max_per_image):
        k = torch.library.get_ctx().new_dynamic_size()
        return (boxes.new_empty((k, 4)), scores.new_empty((k,)), scores.new_empty((k,), dtype=torch.int64),
                scores.new_empty((k,), dtype=torch.int64), scores.new_empty((k,), dtype=torch.int64))

    def _multiclass_setup(ctx, inputs, output):
        boxes, scores = inputs[0], inputs[1]
        ctx.class_specific = boxes.dim() == 3
        ctx.boxes_shape, ctx.scores_shape = boxes.shape, scores.shape
        ctx.save_for_backward(output[2], output[3])

    def _multiclass_backward(ctx, g_boxes, g_scores, g_labels, g_rows, g_images):
        # The kept boxes and scores are gathered from the inputs: their gradients scatter back (no duplicates).
        labels, rows = ctx.saved_tensors
        grad_boxes = grad_scores = None
        if ctx.needs_input_grad[0] and g_boxes is not None:
            grad_boxes = g_boxes.new_zeros(ctx.boxes_shape)
            if ctx.class_specific:
                grad_boxes[rows, labels - 1] = g_boxes
            else:
                grad_boxes.index_add_(0, rows, g_boxes)
        if ctx.needs_input_grad[1] and g_scores is not None:
            grad_scores = g_scores.new_zeros(ctx.scores_shape)
            grad_scores[rows, labels - 1] = g_scores
        return grad_boxes, grad_scores, None, None, None, None, None

    torch.library.register_autograd("ltkernels::multiclass_nms", _multiclass_backward,
                                    setup_context=_multiclass_setup)
