"""NMS: torchvision-compatible `nms` / `batched_nms`, and the class-wise `multiclass_nms` of LVIS post-processing
(docs/spec.md §4), with `batched_multiclass_nms` for a whole batch of images in one call.

Exactness: the kept indices equal torchvision's (the IoU is computed with the arithmetic of torchvision's CPU kernel,
`iou > iou_threshold` suppresses). Ties in score are broken by the lower index (torchvision leaves the order of
equal scores to its sort); `multiclass_nms` breaks them by the reference's candidate order (row, then class).
float16/bfloat16 inputs are compared in float32, as if upcast. CUDA computes the same IoUs with correctly rounded
operations (no FMA contraction), so CPU and CUDA agree bit for bit. Non-finite boxes and NaN scores raise
ValueError; the kernels check them in their own pass (no extra host sync).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from .._ext import has_op
from .._validate import (
    ArgumentTypeError,
    ArgumentValueError,
    background_last,
    can_read_values,
    check_tensor,
    dtype_name,
    floating_dtypes,
)

__all__ = ["nms", "batched_nms", "multiclass_nms", "batched_multiclass_nms", "batched_multiclass_nms_concat",
           "MAX_IMAGES_PER_CALL"]

# The kernels keep per-image bookkeeping: num_images is bounded so a wrong value fails clearly instead of
# exhausting memory.
MAX_IMAGES_PER_CALL = 1 << 24


def _int_dtypes() -> List[torch.dtype]:
    return [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]


def _eager_number(name: str, value):
    """Eager-mode conversion of a threshold given as a Python number or a one-element tensor (torchvision's ops
    accept both) to a float; TorchScript's signature already types it."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool:
            raise ArgumentTypeError(f"{name} must be a float or a one-element tensor, got a tensor of shape "
                                    f"{list(value.shape)} and dtype {dtype_name(value.dtype)}")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def _check_threshold(name: str, value: float) -> float:
    if math.isnan(value) or value < 0:
        raise ArgumentValueError(f"{name} must be >= 0, got {value}")
    return value


def _check_iou_threshold(iou_threshold: float) -> float:
    if not torch.jit.is_scripting():
        iou_threshold = _eager_number("iou_threshold", iou_threshold)
    return _check_threshold("iou_threshold", iou_threshold)


def _check_boxes_scores(boxes: Tensor, scores: Tensor) -> None:
    check_tensor("boxes", boxes, ndim=2, dtypes=floating_dtypes(), last_dim=4)
    check_tensor("scores", scores, ndim=1, dtypes=floating_dtypes(), device=boxes.device)
    if scores.shape[0] != boxes.shape[0]:
        raise ArgumentValueError(f"boxes and scores must have the same number of boxes, got boxes of shape "
                                 f"{list(boxes.shape)} and scores of shape {list(scores.shape)}")
    if scores.dtype != boxes.dtype:
        raise ArgumentTypeError(f"scores must have the dtype of boxes ({dtype_name(boxes.dtype)}), got "
                                f"{dtype_name(scores.dtype)}")


@torch.fx.wrap
def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression, a drop-in for `torchvision.ops.nms`.

    boxes [N, 4] (x1, y1, x2, y2), scores [N] of the same floating dtype; a box is removed when its IoU with a
    higher-scored kept box is > iou_threshold (a float, or in eager mode a one-element tensor). Returns the int64
    indices of the kept boxes in decreasing score order.
    """
    if not torch.jit.is_scripting() and torch.overrides.has_torch_function_variadic(boxes, scores):
        return torch.overrides.handle_torch_function(nms, (boxes, scores), boxes, scores, iou_threshold)
    _check_boxes_scores(boxes, scores)
    threshold = _check_iou_threshold(iou_threshold)
    return torch.ops.ltkernels.nms(boxes, scores, threshold)


def _category_ids(idxs: Tensor) -> Tensor:
    """Integer category ids for the kernel. Integer idxs pass as they are; bool become 0/1; floating idxs (which
    torchvision also accepts) are renumbered by value, so two categories never merge however close they are."""
    if idxs.dtype in _int_dtypes():
        return idxs
    if idxs.dtype == torch.bool:
        return idxs.long()
    if idxs.dtype in floating_dtypes():
        if can_read_values(idxs, sync=True) and bool(torch.isnan(idxs).any()):
            raise ArgumentValueError("idxs contains NaN: every box needs a category")
        return torch.unique(idxs, return_inverse=True)[1]
    raise ArgumentTypeError(f"idxs must be an integer, bool or floating tensor, got {dtype_name(idxs.dtype)}")


@torch.fx.wrap
def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each category of `idxs` (boxes of different categories never suppress each other), a drop-in for
    `torchvision.ops.batched_nms`: the kept indices (int64) in decreasing score order. Exact at any number of
    categories (no coordinate offsets, no per-category loop). `idxs` may be integer, bool or floating (categories
    are compared by value); empty `boxes` return an empty result before the other arguments are looked at, as in
    torchvision."""
    if not torch.jit.is_scripting():
        # a call with torch.fx proxies (or other __torch_function__ tensors) is recorded as one call of this function
        if torch.overrides.has_torch_function_variadic(boxes, scores, idxs):
            return torch.overrides.handle_torch_function(batched_nms, (boxes, scores, idxs), boxes, scores, idxs,
                                                         iou_threshold)
        check_tensor("boxes", boxes)
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    _check_boxes_scores(boxes, scores)
    check_tensor("idxs", idxs, ndim=1, device=boxes.device)
    if idxs.shape[0] != boxes.shape[0]:
        raise ArgumentValueError(f"idxs must have one entry per box ({boxes.shape[0]}), got shape "
                                 f"{list(idxs.shape)}")
    threshold = _check_iou_threshold(iou_threshold)
    return torch.ops.ltkernels.batched_nms(boxes, scores, _category_ids(idxs), threshold)


def _check_multiclass(boxes: Tensor, scores: Tensor, score_threshold: float, iou_threshold: float,
                      max_per_image: Optional[int], what: str = "scores") -> Tuple[float, float, int]:
    check_tensor(what, scores, ndim=2, dtypes=floating_dtypes())
    check_tensor("boxes", boxes, dtypes=[scores.dtype], device=scores.device)
    n, c = scores.shape[0], scores.shape[1]
    if not ((boxes.dim() == 2 and boxes.shape[0] == n and boxes.shape[1] == 4) or
            (boxes.dim() == 3 and boxes.shape[0] == n and boxes.shape[1] == c and boxes.shape[2] == 4)):
        raise ArgumentValueError(f"boxes must have shape [N, 4] (shared) or [N, C, 4] (class-specific) for scores "
                                 f"of shape [N, C] = {list(scores.shape)}, got {list(boxes.shape)}")
    if not torch.jit.is_scripting():
        score_threshold = _eager_number("score_threshold", score_threshold)
    score_threshold = _check_threshold("score_threshold", score_threshold)
    threshold = _check_iou_threshold(iou_threshold)
    limit = -1
    if max_per_image is not None:
        if not torch.jit.is_scripting():
            if isinstance(max_per_image, bool) or not isinstance(max_per_image, int):
                raise ArgumentValueError(f"max_per_image must be a positive int or None (no limit), got "
                                         f"{type(max_per_image).__name__} {max_per_image}")
        if max_per_image < 1:
            raise ArgumentValueError(f"max_per_image must be a positive int or None (no limit), got "
                                     f"{max_per_image}")
        limit = max_per_image
    return score_threshold, threshold, limit


@torch.fx.wrap
def multiclass_nms(boxes: Tensor, scores: Tensor, score_threshold: float = 1e-4, iou_threshold: float = 0.5,
                   max_per_image: Optional[int] = 300,
                   label_layout: str = "background_first") -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Class-wise NMS of one image, the LVIS post-processing step (docs/spec.md §4).

    scores [N, C] (background column removed), boxes [N, 4] shared by all classes or [N, C, 4] class-specific.
    Every (row, class) with score > score_threshold is a candidate, NMS (IoU > iou_threshold suppresses) runs within
    each class, and the max_per_image best survivors are returned (None: all) as
    `(boxes [K, 4], scores [K], labels [K] int64, row_index [K] int64)` in decreasing score order — exactly
    candidates -> `torchvision.ops.batched_nms` -> first K (ties in score: candidate order, row then class).
    labels are 1..C (column j of scores is label j + 1), or 0..C-1 with `label_layout="background_last"` (mmdet,
    detectron2).
    """
    if not torch.jit.is_scripting() and torch.overrides.has_torch_function_variadic(boxes, scores):
        return torch.overrides.handle_torch_function(multiclass_nms, (boxes, scores), boxes, scores, score_threshold,
                                                     iou_threshold, max_per_image, label_layout)
    first_label = 0 if background_last(label_layout) else 1
    score_threshold, threshold, limit = _check_multiclass(boxes, scores, score_threshold, iou_threshold,
                                                          max_per_image)
    image_index = torch.zeros(scores.shape[0], dtype=torch.int64, device=scores.device)
    b, s, labels, rows, _ = torch.ops.ltkernels.multiclass_nms(
        boxes, scores, image_index, 1, score_threshold, threshold, limit)
    if first_label == 0:
        labels = labels - 1
    return b, s, labels, rows


def _check_num_images(num_images: Optional[int], image_index: Tensor) -> int:
    """num_images: None (one more than the largest index) or an int in [max index + 1, MAX_IMAGES_PER_CALL]."""
    if num_images is None:
        return int(image_index.max()) + 1 if image_index.numel() > 0 else 0
    if not torch.jit.is_scripting():
        if isinstance(num_images, bool) or not isinstance(num_images, int):
            raise ArgumentTypeError(f"num_images must be an int or None, got {type(num_images).__name__}")
    limit = 1 << 24  # MAX_IMAGES_PER_CALL (TorchScript cannot read module-level constants)
    if not 0 <= num_images <= limit:
        raise ArgumentValueError(f"num_images must lie in [0, {limit}] (MAX_IMAGES_PER_CALL), got {num_images}")
    return num_images


def _check_image_lists(boxes: List[Tensor], scores: List[Tensor], score_threshold: float, iou_threshold: float,
                       max_per_image: Optional[int]) -> Tuple[float, float, int]:
    """The per-image form's checks (each image as `multiclass_nms` checks it; one C, box layout and device)."""
    if len(boxes) != len(scores):
        raise ArgumentValueError("boxes and scores must both be lists with one entry per image")
    if len(scores) == 0:
        raise ArgumentValueError("scores is an empty list: give at least one image")
    limit = 1 << 24  # MAX_IMAGES_PER_CALL (TorchScript cannot read module-level constants)
    if len(scores) > limit:
        raise ArgumentValueError(f"at most {limit} images per call (MAX_IMAGES_PER_CALL), got {len(scores)}")
    device = scores[0].device
    checked = (0.0, 0.0, -1)
    for i in range(len(scores)):
        s, b = scores[i], boxes[i]
        check_tensor(f"scores[{i}]", s, ndim=2, dtypes=floating_dtypes(), device=device)
        check_tensor(f"boxes[{i}]", b, dtypes=[s.dtype], device=device)
        if b.dim() != boxes[0].dim() or s.shape[1] != scores[0].shape[1] or s.dtype != scores[0].dtype:
            raise ArgumentValueError("every image must have the same number of classes, box layout and dtype")
        checked = _check_multiclass(b, s, score_threshold, iou_threshold, max_per_image, what=f"scores[{i}]")
    return checked


def _check_concat_rows(boxes: Tensor, scores: Tensor, image_index: Optional[Tensor], num_images: Optional[int]
                       ) -> Tuple[Tensor, int]:
    """The concatenated form's image_index (int64) and num_images."""
    if image_index is None:
        raise ArgumentValueError("image_index is required when boxes and scores are the rows of all images")
    check_tensor("image_index", image_index, ndim=1, dtypes=[torch.int64, torch.int32], device=scores.device)
    if image_index.shape[0] != scores.shape[0]:
        raise ArgumentValueError(f"image_index must have one entry per row of scores ({scores.shape[0]}), "
                                 f"got shape {list(image_index.shape)}")
    image_index = image_index.long()
    n_images = _check_num_images(num_images, image_index)
    if can_read_values(image_index, sync=True) and image_index.numel() > 0 and (
            bool((image_index < 0).any()) or int(image_index.max()) >= n_images):
        raise ArgumentValueError(f"image_index must lie in [0, num_images={n_images})")
    return image_index, n_images


def _batched_multiclass(boxes: Union[Tensor, List[Tensor]], scores: Union[Tensor, List[Tensor]],
                        image_index: Optional[Tensor], num_images: Optional[int], score_threshold: float,
                        iou_threshold: float, max_per_image: Optional[int], label_layout: str
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int, Optional[Tensor], Optional[List[int]]]:
    """The one kernel call of both input forms: (boxes, scores, labels in `label_layout`, row, image) of the
    survivors, num_images, and either the concatenated form's image_index (rows are rows of the concatenated input)
    or the per-image form's image sizes (rows are rows within the image: that form is read where each image lies,
    `multiclass_nms_images`, never concatenated on CPU)."""
    first_label = 0 if background_last(label_layout) else 1
    if not torch.jit.is_scripting():
        # eager mode also takes tuples; TorchScript's Union[Tensor, List[Tensor]] checks the types itself
        if isinstance(scores, tuple):
            scores = list(scores)
        if isinstance(boxes, tuple):
            boxes = list(boxes)
    sizes: Optional[List[int]] = None
    if isinstance(scores, Tensor):
        if not isinstance(boxes, Tensor):
            raise ArgumentValueError("boxes and scores must both be lists with one entry per image")
        image_index, num_images = _check_concat_rows(boxes, scores, image_index, num_images)
        sthr, ithr, limit = _check_multiclass(boxes, scores, score_threshold, iou_threshold, max_per_image)
        b, s, labels, rows, images = torch.ops.ltkernels.multiclass_nms(boxes, scores, image_index, num_images,
                                                                        sthr, ithr, limit)
    else:
        if isinstance(boxes, Tensor):
            raise ArgumentValueError("boxes and scores must both be lists with one entry per image")
        if image_index is not None:
            raise ArgumentValueError("image_index must be None when boxes and scores are per-image lists")
        sthr, ithr, limit = _check_image_lists(boxes, scores, score_threshold, iou_threshold, max_per_image)
        num_images = len(scores)
        sizes = [x.shape[0] for x in scores]
        b, s, labels, rows, images = torch.ops.ltkernels.multiclass_nms_images(boxes, scores, sthr, ithr, limit)
    if first_label == 0:
        labels = labels - 1
    return b, s, labels, rows, images, num_images, image_index, sizes


def batched_multiclass_nms_concat(boxes: Union[Tensor, List[Tensor]], scores: Union[Tensor, List[Tensor]],
                                  image_index: Optional[Tensor] = None, num_images: Optional[int] = None,
                                  score_threshold: float = 1e-4, iou_threshold: float = 0.5,
                                  max_per_image: Optional[int] = 300, label_layout: str = "background_first"
                                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`batched_multiclass_nms(..., concat=True)` with its own fixed return type, for TorchScript: the detections of
    all images concatenated, `(boxes, scores, labels, row_index, image)`, row_index being the row of the
    concatenated input. Scriptable."""
    b, s, labels, rows, images, _, _, sizes = _batched_multiclass(boxes, scores, image_index, num_images,
                                                                  score_threshold, iou_threshold, max_per_image,
                                                                  label_layout)
    if sizes is not None:  # per-image rows -> rows of the images concatenated
        starts = torch.tensor([0] + sizes[:-1], device=rows.device).cumsum(0)
        rows = rows + starts[images]
    return b, s, labels, rows, images


def batched_multiclass_nms(boxes: Union[Tensor, List[Tensor]], scores: Union[Tensor, List[Tensor]],
                           image_index: Optional[Tensor] = None, num_images: Optional[int] = None,
                           score_threshold: float = 1e-4, iou_threshold: float = 0.5,
                           max_per_image: Optional[int] = 300, concat: bool = False,
                           label_layout: str = "background_first") -> List[Tuple[Tensor, Tensor, Tensor, Tensor]]:
    """`multiclass_nms` of every image of a batch in one call (one kernel pass, parallel over images).

    Either lists `boxes=[b_0, ...]`, `scores=[s_0, ...]` (one entry per image), or the rows of all images
    concatenated (`scores` [N, C], `boxes` [N, 4] or [N, C, 4]) with `image_index` [N] giving each row's image
    (0..num_images-1, rows of one image need not be contiguous). Returns a list of per-image
    `(boxes, scores, labels, row_index)` equal to per-image `multiclass_nms` calls (row_index counts rows within
    the image). With `concat=True` returns instead the concatenated `(boxes, scores, labels, row_index, image)`
    where row_index is the row of the concatenated input (no host sync beyond the op's own).
    `num_images` is at most MAX_IMAGES_PER_CALL; `label_layout` as in `multiclass_nms`.
    Scriptable with the per-image list as its return type; scripted code calls `batched_multiclass_nms_concat`
    for the concatenated form (`concat=True` raises there).
    """
    if concat:
        if torch.jit.is_scripting():
            raise ArgumentValueError("concat=True changes the return type, which TorchScript cannot: call "
                                     "batched_multiclass_nms_concat instead")
        else:
            return batched_multiclass_nms_concat(boxes, scores, image_index, num_images, score_threshold,
                                                 iou_threshold, max_per_image, label_layout)
    b, s, labels, rows, images, num_images, image_index, _ = _batched_multiclass(
        boxes, scores, image_index, num_images, score_threshold, iou_threshold, max_per_image, label_layout)
    if image_index is not None:  # rows of the concatenated input -> rows within the image: rank among its rows
        order = torch.sort(image_index, stable=True)[1]
        counts = torch.bincount(image_index, minlength=num_images)
        starts = counts.cumsum(0) - counts
        local_row = torch.empty_like(image_index)
        local_row[order] = torch.arange(order.numel(), device=order.device) - starts[image_index[order]]
        rows = local_row[rows]
    sizes: List[int] = torch.bincount(images, minlength=num_images).tolist()
    parts = [b.split(sizes), s.split(sizes), labels.split(sizes), rows.split(sizes)]
    out: List[Tuple[Tensor, Tensor, Tensor, Tensor]] = []
    for i in range(num_images):
        out.append((parts[0][i], parts[1][i], parts[2][i], parts[3][i]))
    return out


# ---- torch.compile / autograd registrations --------------------------------------------------------------------

def _fake_check_boxes_scores(boxes, scores) -> None:
    """The kernels' shape checks (csrc/nms.h), for fake tensors."""
    torch._check(boxes.dim() == 2 and boxes.size(1) == 4, lambda: f"boxes must have shape [N, 4], got {boxes.shape}")
    torch._check(scores.dim() == 1 and scores.size(0) == boxes.size(0),
                 lambda: f"scores must have shape [{boxes.size(0)}], got {scores.shape}")
    torch._check(boxes.dtype == scores.dtype, lambda: "boxes and scores must have the same dtype")


if has_op("nms"):
    @torch.library.register_fake("ltkernels::nms")
    def _nms_fake(boxes, scores, iou_threshold):
        _fake_check_boxes_scores(boxes, scores)
        k = torch.library.get_ctx().new_dynamic_size()
        return boxes.new_empty((k,), dtype=torch.int64)

if has_op("batched_nms"):
    @torch.library.register_fake("ltkernels::batched_nms")
    def _batched_nms_fake(boxes, scores, idxs, iou_threshold):
        _fake_check_boxes_scores(boxes, scores)
        torch._check(idxs.dim() == 1 and idxs.size(0) == boxes.size(0),
                     lambda: f"idxs must have shape [{boxes.size(0)}], got {idxs.shape}")
        k = torch.library.get_ctx().new_dynamic_size()
        return boxes.new_empty((k,), dtype=torch.int64)

if has_op("multiclass_nms"):
    @torch.library.register_fake("ltkernels::multiclass_nms")
    def _multiclass_nms_fake(boxes, scores, image_index, num_images, score_threshold, iou_threshold, max_per_image):
        torch._check(scores.dim() == 2, lambda: f"scores must be 2-D [N, C], got {scores.shape}")
        n, c = scores.size(0), scores.size(1)
        torch._check((boxes.dim() == 2 and boxes.size(0) == n and boxes.size(1) == 4)
                     or (boxes.dim() == 3 and boxes.size(0) == n and boxes.size(1) == c and boxes.size(2) == 4),
                     lambda: f"boxes must have shape [N, 4] or [N, C, 4] for scores {scores.shape}, got {boxes.shape}")
        torch._check(image_index.dim() == 1 and image_index.size(0) == n,
                     lambda: f"image_index must have shape [{n}], got {image_index.shape}")
        torch._check(image_index.dtype == torch.int64, lambda: "image_index must be int64")
        k = torch.library.get_ctx().new_dynamic_size()
        return (boxes.new_empty((k, 4)), scores.new_empty((k,)), scores.new_empty((k,), dtype=torch.int64),
                scores.new_empty((k,), dtype=torch.int64), scores.new_empty((k,), dtype=torch.int64))

    def _multiclass_setup(ctx, inputs, output):
        boxes, scores = inputs[0], inputs[1]
        ctx.class_specific = boxes.dim() == 3
        ctx.boxes_shape, ctx.scores_shape = boxes.shape, scores.shape
        ctx.save_for_backward(output[2], output[3])

    def _scatter_back(ctx, g_boxes, g_scores, labels, rows, needs_boxes: bool, needs_scores: bool):
        # The kept boxes and scores are gathered from the inputs: their gradients scatter back (no duplicates).
        grad_boxes = grad_scores = None
        if needs_boxes and g_boxes is not None:
            grad_boxes = g_boxes.new_zeros(ctx.boxes_shape)
            if ctx.class_specific:
                grad_boxes[rows, labels - 1] = g_boxes
            else:
                grad_boxes.index_add_(0, rows, g_boxes)
        if needs_scores and g_scores is not None:
            grad_scores = g_scores.new_zeros(ctx.scores_shape)
            grad_scores[rows, labels - 1] = g_scores
        return grad_boxes, grad_scores

    def _multiclass_backward(ctx, g_boxes, g_scores, g_labels, g_rows, g_images):
        labels, rows = ctx.saved_tensors
        grad_boxes, grad_scores = _scatter_back(ctx, g_boxes, g_scores, labels, rows, ctx.needs_input_grad[0],
                                                ctx.needs_input_grad[1])
        return grad_boxes, grad_scores, None, None, None, None, None

    torch.library.register_autograd("ltkernels::multiclass_nms", _multiclass_backward,
                                    setup_context=_multiclass_setup)

if has_op("multiclass_nms_images"):
    @torch.library.register_fake("ltkernels::multiclass_nms_images")
    def _multiclass_nms_images_fake(boxes, scores, score_threshold, iou_threshold, max_per_image):
        torch._check(len(scores) > 0 and len(boxes) == len(scores),
                     lambda: "boxes and scores must be lists with one entry per image")
        for b, s in zip(boxes, scores):
            torch._check(s.dim() == 2 and s.size(1) == scores[0].size(1),
                         lambda: f"every scores entry must be [N_i, C] with one C, got {s.shape}")
            torch._check((b.dim() == 2 and b.size(0) == s.size(0) and b.size(1) == 4)
                         or (b.dim() == 3 and b.size(0) == s.size(0) and b.size(1) == s.size(1) and b.size(2) == 4),
                         lambda: f"boxes must have shape [N, 4] or [N, C, 4] for scores {s.shape}, got {b.shape}")
        k = torch.library.get_ctx().new_dynamic_size()
        s0 = scores[0]
        return (boxes[0].new_empty((k, 4)), s0.new_empty((k,)), s0.new_empty((k,), dtype=torch.int64),
                s0.new_empty((k,), dtype=torch.int64), s0.new_empty((k,), dtype=torch.int64))

    def _multiclass_images_setup(ctx, inputs, output):
        boxes, scores = inputs[0], inputs[1]
        ctx.class_specific = boxes[0].dim() == 3
        ctx.sizes = [s.shape[0] for s in scores]
        ctx.boxes_shape = (sum(ctx.sizes),) + tuple(boxes[0].shape[1:])
        ctx.scores_shape = (sum(ctx.sizes), scores[0].shape[1])
        ctx.needs_boxes = any(b.requires_grad for b in boxes)
        ctx.needs_scores = any(s.requires_grad for s in scores)
        ctx.save_for_backward(output[2], output[3], output[4])

    def _multiclass_images_backward(ctx, g_boxes, g_scores, g_labels, g_rows, g_images):
        # the gradients of the images concatenated, split back into the images
        labels, rows, images = ctx.saved_tensors
        starts = torch.tensor([0] + ctx.sizes, device=rows.device).cumsum(0)
        grad_boxes, grad_scores = _scatter_back(ctx, g_boxes, g_scores, labels, rows + starts[images],
                                                ctx.needs_boxes, ctx.needs_scores)
        return (None if grad_boxes is None else list(grad_boxes.split(ctx.sizes)),
                None if grad_scores is None else list(grad_scores.split(ctx.sizes)), None, None, None)

    torch.library.register_autograd("ltkernels::multiclass_nms_images", _multiclass_images_backward,
                                    setup_context=_multiclass_images_setup)
