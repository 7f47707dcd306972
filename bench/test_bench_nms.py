"""NMS family at detection / LVIS sizes, float32, identical detections checked before timing.

- nms: 5000 boxes (ltkernels vs torchvision.ops.nms).
- batched_nms: 20000 boxes over 80 classes (vs torchvision.ops.batched_nms, which loops over the classes at this size,
  and vs torchvision's coordinate-offset trick: one NMS over all boxes shifted by class).
- multiclass_nms, LVIS post-processing (docs/spec.md §4): per image 1000 RoIs x 1230 classes, softmax scores,
  class-specific boxes, score threshold 1e-4 (about 290k candidates per image), IoU 0.5, 300 per image.
  Peers: "torchvision" = candidates -> torchvision.ops.batched_nms -> first 300 (docs/spec.md's reference pipeline),
  "torchvision-offset" = the same pipeline through the coordinate-offset trick.
  * one image: 1000 RoIs; on CPU ltkernels only at 1000 (the torchvision pipeline's loop over 1230 classes takes 7
    to 55 s per 1000-RoI image on a 2-core CPU), the pipeline against it at 200 RoIs, and a 100-RoI group where the
    offset trick also runs (its single NMS over all candidates is quadratic: minutes at 1000 RoIs on CPU);
  * a batch of images in one call (`batched_multiclass_nms`) vs the torchvision pipeline per image: 16 x 1000 RoIs
    on CUDA, 4 x 100 on CPU.
  The torchvision peers on CPU run 1 timed round (after 2 warm-up calls): each call takes seconds.
"""
import pytest
import torch
import torchvision
from torchvision.ops.boxes import _batched_nms_coordinate_trick, _batched_nms_vanilla

import ltkernels
from ltkernels._ext import has_op
from ltkernels.models.benchmarking import quick_mode
from ltkernels.reference.nms import torchvision_multiclass_nms, torchvision_offset_multiclass_nms

pytestmark = pytest.mark.skipif(not (has_op("nms") and has_op("multiclass_nms")), reason="nms not built")

NUM_CLASSES = 1230


def boxes_scores(n, device, extent=1000.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * extent
    wh = torch.rand(n, 2, generator=g) * 120 + 8
    scores = (torch.randperm(n, generator=g).float() + 1) / (n + 1)
    return torch.cat([xy, xy + wh], 1).to(device), scores.to(device)


def lvis_image(rois, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(rois, 2, generator=g) * torch.tensor([1233.0, 700.0])
    wh = torch.rand(rois, 2, generator=g) * 100 + 4
    base = torch.cat([xy, xy + wh], 1)
    boxes = base[:, None, :] + torch.randn(rois, NUM_CLASSES, 4, generator=g) * 4
    scores = (torch.randn(rois, NUM_CLASSES, generator=g) * 3).softmax(1)
    return boxes.to(device), scores.to(device)


def check_same(got, want):
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w.cpu()), "detections differ from the peer's"


# ---- nms / batched_nms ------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["ltkernels", "torchvision"])
def test_nms(run_bench, device, impl):
    n = 1000 if quick_mode() else 5000
    boxes, scores = boxes_scores(n, device)
    fn = {"ltkernels": ltkernels.nms, "torchvision": torchvision.ops.nms}[impl]
    assert torch.equal(fn(boxes, scores, 0.5), torchvision.ops.nms(boxes, scores, 0.5))
    run_bench(lambda: fn(boxes, scores, 0.5), op="nms", impl=impl, size=f"{n}", dtype="float32", device=device,
              pass_="fwd")


@pytest.mark.parametrize("impl", ["ltkernels", "torchvision", "torchvision-offset"])
def test_batched_nms(run_bench, device, impl):
    n, classes = (4000, 80) if quick_mode() else (20000, 80)
    boxes, scores = boxes_scores(n, device)
    idxs = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(1)).to(device)
    fn = {"ltkernels": ltkernels.batched_nms, "torchvision": torchvision.ops.batched_nms,
          "torchvision-offset": _batched_nms_coordinate_trick}[impl]
    if impl == "ltkernels":  # exact per-class NMS (torchvision's offset trick, its CUDA path at this size, may
        # differ in float32 next to the threshold)
        assert torch.equal(fn(boxes, scores, idxs, 0.5), _batched_nms_vanilla(boxes, scores, idxs, 0.5))
    run_bench(lambda: fn(boxes, scores, idxs, 0.5), op="batched_nms", impl=impl, size=f"{n}x{classes}cls",
              dtype="float32", device=device, pass_="fwd", rounds=3 if impl == "torchvision-offset" else None)


# ---- multiclass_nms -----------------------------------------------------------------------------------------

MULTICLASS = {
    "ltkernels": ltkernels.multiclass_nms,
    "torchvision": torchvision_multiclass_nms,
    "torchvision-offset": torchvision_offset_multiclass_nms,
}


def multiclass_rois(device, group):
    """RoIs per image: LVIS's 1000 ("lvis"; on CPU ltkernels only: the torchvision pipeline's per-class loop takes up
    to a minute per 1000-RoI image on a loaded 2-core CPU), 200 ("mid", CPU: against the torchvision pipeline) and
    100 ("small", CPU: the offset trick also runs)."""
    if quick_mode():
        return 100
    return {"lvis": 1000, "mid": 200, "small": 100}[group]


@pytest.mark.parametrize("group", ["lvis", "mid", "small"])
@pytest.mark.parametrize("impl", list(MULTICLASS))
def test_multiclass_nms(run_bench, device, impl, group):
    if device == "cuda" and group != "lvis":
        pytest.skip("the smaller groups are for the CPU peers")
    if device == "cpu" and group == "lvis" and impl != "ltkernels":
        pytest.skip("the torchvision pipelines take up to a minute per 1000-RoI image on CPU (see the mid group)")
    if device == "cpu" and group == "mid" and impl == "torchvision-offset":
        pytest.skip("the offset trick's single NMS over all candidates takes too long on CPU")
    if quick_mode() and group == "mid":
        pytest.skip("quick mode: one size per device")
    rois = multiclass_rois(device, group)
    boxes, scores = lvis_image(rois, device)
    fn = MULTICLASS[impl]
    if impl == "ltkernels" and not (device == "cpu" and rois == 1000):  # (1000 x 1230 on CPU: tests/test_nms.py)
        check_same(fn(boxes, scores, 1e-4, 0.5, 300), torchvision_multiclass_nms(boxes, scores, 1e-4, 0.5, 300))
    slow = device == "cpu" and impl != "ltkernels"
    run_bench(lambda: fn(boxes, scores, 1e-4, 0.5, 300), op="multiclass_nms", impl=impl,
              size=f"1x{rois}x{NUM_CLASSES}", dtype="float32", device=device, pass_="fwd",
              rounds=1 if slow else None)


@pytest.mark.parametrize("impl", ["ltkernels", "torchvision", "torchvision-offset"])
def test_multiclass_nms_batch(run_bench, device, impl):
    if device == "cpu" and impl == "torchvision-offset":
        pytest.skip("the offset trick's single NMS over ~290k candidates takes minutes on CPU")
    images = 4 if device == "cpu" or quick_mode() else 16
    rois = multiclass_rois(device, "small" if device == "cpu" else "lvis")
    data = [lvis_image(rois, device, seed=i) for i in range(images)]
    boxes, scores = [b for b, _ in data], [s for _, s in data]
    if impl == "ltkernels":
        def fn():
            return ltkernels.batched_multiclass_nms(boxes, scores, score_threshold=1e-4, iou_threshold=0.5,
                                                    max_per_image=300)
        got = fn()
        # Per-image calls equal the torchvision pipeline (test_multiclass_nms above, tests/test_nms.py); the
        # batched call equals the per-image calls.
        for (b, s), g in zip(data, got):
            check_same(g, ltkernels.multiclass_nms(b, s, 1e-4, 0.5, 300))
    else:
        peer = MULTICLASS[impl]

        def fn():
            return [peer(b, s, 1e-4, 0.5, 300) for b, s in data]
    run_bench(fn, op="multiclass_nms", impl=impl, size=f"{images}x{rois}x{NUM_CLASSES}", dtype="float32",
              device=device, pass_="fwd", rounds=1 if device == "cpu" and impl != "ltkernels" else None)
