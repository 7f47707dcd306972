"""One call that routes torchvision's RoIAlign, NMS and FPN poolers to ltkernels.

`patch_torchvision()` replaces, in every loaded `torchvision` module, the names that are bound to torchvision's
`roi_align`, `nms`, `batched_nms`, `RoIAlign` and `MultiScaleRoIAlign` with ltkernels' drop-ins. Code that looks
them up at call time — torchvision's detection models (their RPN, RoI heads, mask targets and the poolers of
models built before the call), `torchvision.ops.*` — then runs ltkernels, and models built while the patch is active
get ltkernels' `MultiScaleRoIAlign`. Scripting (`torch.jit.script`) a model while patched compiles ltkernels' ops
into it. The returned handle undoes the patch (`undo()`, or leave its `with` block).
"""
import importlib
import sys
from typing import List, Tuple

import torch

from .ops.nms import batched_nms, nms
from .ops.poolers import MultiScaleRoIAlign
from .ops.roi_align import RoIAlign, roi_align

__all__ = ["patch_torchvision", "TorchvisionPatch"]

# Loaded first so that every module which binds these names at import time is patched too.
_MODULES = ("torchvision.ops", "torchvision.ops.boxes", "torchvision.ops.roi_align", "torchvision.ops.poolers",
            "torchvision.models.detection")


class TorchvisionPatch:
    """The replacements made by `patch_torchvision`; a context manager that undoes them on exit."""

    def __init__(self, swaps: List[Tuple[object, str, object]]):
        self._swaps = swaps

    @property
    def active(self) -> bool:
        return bool(self._swaps)

    def undo(self) -> None:
        """Put torchvision's objects back (only those this handle replaced; idempotent)."""
        for module, name, original in reversed(self._swaps):
            setattr(module, name, original)
        self._swaps = []
        _forget_compiled_types()

    def __enter__(self) -> "TorchvisionPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"TorchvisionPatch(active={self.active}, replaced={len(self._swaps)} names)"


def _forget_compiled_types() -> None:
    # TorchScript caches the compiled methods of a module class: without this, a model class scripted before a
    # patch (or an undo) would keep the other implementation when scripted again.
    store = getattr(torch.jit._recursive, "concrete_type_store", None)
    if store is not None and hasattr(store, "type_store"):
        store.type_store.clear()


def patch_torchvision() -> TorchvisionPatch:
    """Route torchvision's `roi_align`, `nms`, `batched_nms`, `RoIAlign` and `MultiScaleRoIAlign` to ltkernels.

    Use it once at start-up, or as a context manager::

        with ltkernels.patch_torchvision():
            model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None)
            detections = model.eval()(images)

    Returns a `TorchvisionPatch`; calling it again while patched changes nothing (and its handle has nothing to
    undo). Differences that remain are listed in the README's API section (order of equal scores, stricter NaN
    and box checks)."""
    for name in _MODULES:
        importlib.import_module(name)
    import torchvision.ops as tv_ops
    import torchvision.ops.boxes as tv_boxes
    import torchvision.ops.poolers as tv_poolers

    tv_roi_align = sys.modules["torchvision.ops.roi_align"]
    if tv_ops.roi_align is roi_align:  # already patched (by another handle): nothing to do
        return TorchvisionPatch([])
    replacements = {
        id(tv_roi_align.roi_align): roi_align,
        id(tv_roi_align.RoIAlign): RoIAlign,
        id(tv_boxes.nms): nms,
        id(tv_boxes.batched_nms): batched_nms,
        id(tv_poolers.MultiScaleRoIAlign): MultiScaleRoIAlign,
    }
    swaps = []
    for mod_name, module in list(sys.modules.items()):
        if module is None or not (mod_name == "torchvision" or mod_name.startswith("torchvision.")):
            continue
        for name, value in list(vars(module).items()):
            new = replacements.get(id(value))
            if new is not None:
                swaps.append((module, name, value))
                setattr(module, name, new)
    _forget_compiled_types()
    return TorchvisionPatch(swaps)
