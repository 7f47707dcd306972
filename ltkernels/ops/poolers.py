"""FPN RoI poolers built on `roi_align`: each RoI is pooled from one pyramid level chosen by its size (FPN paper,
eq. 1), level = floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps), clamped to the levels given.

`MultiScaleRoIAlign` has torchvision's interface (a dict of features, `featmap_names`, `image_shapes`, scales
inferred from the image size, `aligned=False`), so torchvision's detection models take it as their box and mask
pooler; `MultiLevelRoIAlign` takes a list of features and explicit strides. Both are scriptable, leaves of torch.fx
tracing, check all RoIs once (one device sync) and pool each level with one kernel call.
"""

from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.jit.annotations import BroadcastingList2

from .._validate import ArgumentTypeError, ArgumentValueError, check_tensor, floating_dtypes
from .roi_align import _boxes_to_rois, _check_output_size, _check_rois_values, _eager_output_size

__all__ = ["MultiLevelRoIAlign", "MultiScaleRoIAlign"]


def _check_features(features: List[Tensor]) -> None:
    """Every level: 4-D, floating, and the batch size, channel count, dtype and device of the first."""
    if len(features) == 0:
        raise ArgumentValueError("features must hold at least one Tensor[N, C, H, W]")
    first = features[0]
    check_tensor("features[0]", first, ndim=4, dtypes=floating_dtypes())
    for i, f in enumerate(features):
        check_tensor(f"features[{i}]", f, ndim=4, dtypes=[first.dtype], device=first.device)
        if f.shape[0] != first.shape[0] or f.shape[1] != first.shape[1]:
            raise ArgumentValueError(
                f"features[{i}] has shape {list(f.shape)} but features[0] has {list(first.shape)}: every level must "
                f"have the same batch size and channel count")


def fpn_levels(boxes: Tensor, k_min: float, k_max: float, canonical_scale: float, canonical_level: float,
               eps: float = 1e-6) -> Tensor:
    """Level index (0 = level k_min) of each box [K, 4]: torchvision's LevelMapper, in the boxes' dtype."""
    s = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    lvl = torch.floor(canonical_level + torch.log2(s / canonical_scale)
                      + torch.tensor(eps, dtype=s.dtype, device=s.device))
    return (torch.clamp(lvl, min=k_min, max=k_max).to(torch.int64) - int(k_min)).to(torch.int64)


def _log2(v: float) -> float:
    return float(torch.log2(torch.tensor(v, dtype=torch.float64)))


def _pool_levels(features: List[Tensor], rois: Tensor, levels: Optional[Tensor], scales: List[float],
                 output_size: List[int], sampling_ratio: int, aligned: bool) -> Tensor:
    """RoIs already checked; one kernel call per level, results scattered back into RoI order."""
    ph, pw = output_size[0], output_size[1]
    if levels is None:
        return torch.ops.ltkernels.roi_align(features[0], rois, scales[0], ph, pw, sampling_ratio, aligned)
    first = features[0]
    out = torch.zeros((rois.shape[0], first.shape[1], ph, pw), dtype=first.dtype, device=first.device)
    for lvl, feat in enumerate(features):
        idx = torch.where(levels == lvl)[0]
        out[idx] = torch.ops.ltkernels.roi_align(feat, rois[idx], scales[lvl], ph, pw, sampling_ratio, aligned)
    return out


def _box_dtype(boxes: Union[Tensor, List[Tensor]]) -> torch.dtype:
    if isinstance(boxes, Tensor):
        return boxes.dtype
    dtype = boxes[0].dtype if len(boxes) > 0 else torch.float32
    for b in boxes:
        dtype = torch.promote_types(dtype, b.dtype)
    return dtype


def _pool(features: List[Tensor], boxes: Union[Tensor, List[Tensor]], scales: List[float], output_size: List[int],
          sampling_ratio: int, aligned: bool, canonical_scale: float, canonical_level: float, eps: float) -> Tensor:
    _check_features(features)
    ph, pw = _check_output_size(output_size)
    rois = _boxes_to_rois(boxes, features[0])
    # with ordered=True: an inverted box would get a NaN level and silently pool zeros
    _check_rois_values(rois, features[0].shape[0], scales[0], ph, pw, sampling_ratio, aligned, ordered=True)
    levels: Optional[Tensor] = None
    if len(features) > 1:
        k_min = -_log2(scales[0])
        k_max = -_log2(scales[-1])
        levels = fpn_levels(rois[:, 1:].to(_box_dtype(boxes)), k_min, k_max, canonical_scale, canonical_level, eps)
    return _pool_levels(features, rois, levels, scales, [ph, pw], sampling_ratio, aligned)


# ---- list of features, explicit strides ----------------------------------------------------------------------
def _check_strides(strides: List[int]) -> None:
    ok = len(strides) > 0
    for i, s in enumerate(strides):
        if s <= 0 or (s & (s - 1)) != 0 or (i > 0 and s <= strides[i - 1]):
            ok = False
    if not ok:
        raise ArgumentValueError(f"strides must be increasing powers of two, got {strides}")


def _infer_stride(image_height: int, feature_height: int) -> int:
    return int(2.0 ** float(torch.tensor(float(image_height) / float(feature_height)).log2().round()))


@torch.fx.wrap
def _multilevel_roi_align(features: List[Tensor], boxes: Union[Tensor, List[Tensor]], image_size: Optional[List[int]],
                          strides: Optional[List[int]], output_size: List[int], sampling_ratio: int, aligned: bool,
                          canonical_scale: float, canonical_level: float, eps: float) -> Tensor:
    if not torch.jit.is_scripting():
        if not isinstance(features, (list, tuple)):
            raise ArgumentTypeError("features must be a non-empty list of Tensor[N, C, H, W], fine to coarse")
        features = list(features)
        if isinstance(image_size, (list, tuple)) and image_size and isinstance(image_size[0], (list, tuple)):
            image_size = [max(s[0] for s in image_size), max(s[1] for s in image_size)]
    if strides is None:
        if image_size is None:
            raise ArgumentValueError("image_size (height, width) is needed to infer the strides (strides=None)")
        strides = [_infer_stride(image_size[0], f.shape[-2]) for f in features]
    elif len(strides) != len(features):
        raise ArgumentValueError(f"features has {len(features)} levels but strides has {len(strides)}")
    scales = [1.0 / s for s in strides]
    return _pool(features, boxes, scales, output_size, sampling_ratio, aligned, canonical_scale, canonical_level,
                 eps)


class MultiLevelRoIAlign(nn.Module):
    """FPN RoI pooler over a list of feature maps with known strides; the result is in RoI order.

    Args:
        output_size: int or (height, width).
        sampling_ratio, aligned: as in `roi_align`.
        canonical_scale, canonical_level: a box of side canonical_scale goes to level canonical_level.
        strides: the stride of each feature map passed to forward, fine to coarse (powers of two), e.g.
            (4, 8, 16, 32) for P2-P5. None: inferred in forward from `image_size`, like torchvision's
            MultiScaleRoIAlign (stride = 2 ** round(log2(image_height / feature_height))).

    Boxes must be finite with x1 <= x2 and y1 <= y2, and every level must have the same batch size, channel count,
    dtype and device; anything else raises with the reason. The adaptive-grid limit of `roi_align` is checked at
    the finest level's scale.
    """

    _stride_list: Optional[List[int]]

    def __init__(self, output_size: BroadcastingList2[int], sampling_ratio: int = 2, canonical_scale: int = 224,
                 canonical_level: int = 4, aligned: bool = True, strides: Optional[List[int]] = (4, 8, 16, 32),
                 eps: float = 1e-6):
        super().__init__()
        self.output_size = _check_output_size(_eager_output_size(output_size))
        self.sampling_ratio = int(sampling_ratio)
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.aligned = bool(aligned)
        self.eps = float(eps)
        if strides is not None:
            strides = [int(s) for s in strides]
            _check_strides(strides)
        self._stride_list = strides
        self.strides = None if strides is None else tuple(strides)

    def levels(self, rois: Tensor, strides: List[int]) -> Tensor:
        """Index (0 = finest given) of the level each RoI [K, 5] is pooled from."""
        return fpn_levels(rois[:, 1:], _log2(strides[0]), _log2(strides[-1]), float(self.canonical_scale),
                          float(self.canonical_level), self.eps)

    def forward(self, features: List[Tensor], boxes: Union[Tensor, List[Tensor]],
                image_size: Optional[List[int]] = None) -> Tensor:
        """features: list of Tensor[N, C, H_l, W_l], fine to coarse. boxes: Tensor[K, 5] or a list of Tensor[L, 4].
        image_size: (height, width), or in eager mode also a list of them (the largest counts); only needed when
        strides=None."""
        return _multilevel_roi_align(features, boxes, image_size, self._stride_list,
                                     [self.output_size[0], self.output_size[1]], self.sampling_ratio,
                                     self.aligned, float(self.canonical_scale), float(self.canonical_level),
                                     self.eps)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(output_size={self.output_size}, sampling_ratio={self.sampling_ratio}, "
                f"canonical_scale={self.canonical_scale}, canonical_level={self.canonical_level}, "
                f"aligned={self.aligned}, strides={self.strides})")


# ---- torchvision's interface ---------------------------------------------------------------------------------
def _infer_scale(feature: Tensor, original_size: List[int]) -> float:
    """torchvision's rule: the power of two nearest to feature height / image height."""
    approx_scale = float(feature.shape[-2]) / float(original_size[0])
    return 2.0 ** float(torch.tensor(approx_scale).log2().round())


@torch.fx.wrap
def _multiscale_roi_align(x: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]],
                          featmap_names: List[str], output_size: List[int], sampling_ratio: int, aligned: bool,
                          canonical_scale: float, canonical_level: float) -> Tensor:
    features: List[Tensor] = []
    for k, v in x.items():  # in the dict's order, as torchvision filters them
        if k in featmap_names:
            features.append(v)
    if len(features) == 0:
        raise ArgumentValueError(f"none of featmap_names {featmap_names} is a key of the features "
                                 f"({list(x.keys())})")
    if len(image_shapes) == 0:
        raise ArgumentValueError("image_shapes must hold the (height, width) of every image")
    max_h = max([s[0] for s in image_shapes])
    max_w = max([s[1] for s in image_shapes])
    scales = [_infer_scale(f, [max_h, max_w]) for f in features]
    return _pool(features, boxes, scales, output_size, sampling_ratio, aligned, canonical_scale, canonical_level,
                 1e-6)


class MultiScaleRoIAlign(nn.Module):
    """Drop-in for `torchvision.ops.MultiScaleRoIAlign` (same constructor, forward and results), on ltkernels'
    roi_align; also accepts `aligned` (default False, as torchvision). The scales are inferred from `image_shapes`
    at every call (torchvision caches those of the first call; with the same image sizes the results are equal).
    Float16/bfloat16 boxes keep exact image indices."""

    def __init__(self, featmap_names: List[str], output_size: Union[int, Tuple[int], List[int]], sampling_ratio: int,
                 *, canonical_scale: int = 224, canonical_level: int = 4, aligned: bool = False):
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self._pooled = list(_check_output_size(_eager_output_size(tuple(output_size))))
        self.featmap_names = list(featmap_names)
        self.output_size = tuple(output_size)
        self.sampling_ratio = int(sampling_ratio)
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.aligned = bool(aligned)

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]]) -> Tensor:
        return _multiscale_roi_align(x, boxes, image_shapes, self.featmap_names, self._pooled, self.sampling_ratio,
                                     self.aligned, float(self.canonical_scale), float(self.canonical_level))

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio})")
