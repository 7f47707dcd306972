"""`ltkernels.patch_torchvision()` on torchvision's own detectors (random weights, small images): the same
detections as torchvision, a training step with the same losses, and the scripted model."""
import pytest
import torch
import torchvision
from torchvision.models.detection import fasterrcnn_resnet50_fpn, maskrcnn_resnet50_fpn

import ltkernels
from ltkernels.ops.poolers import MultiScaleRoIAlign

MODELS = {"fasterrcnn": fasterrcnn_resnet50_fpn, "maskrcnn": maskrcnn_resnet50_fpn}


def _model(name):
    torch.manual_seed(0)
    # score threshold 0: a randomly initialised head scores every class about equally
    return MODELS[name](weights=None, weights_backbone=None, min_size=128, max_size=160, box_score_thresh=0.0,
                        box_detections_per_img=50)


def _images():
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, 120, 150, generator=g), torch.rand(3, 100, 140, generator=g)]


def _targets():
    return [{"boxes": torch.tensor([[10.0, 20.0, 80.0, 90.0], [30.0, 5.0, 140.0, 60.0]]),
             "labels": torch.tensor([3, 17]), "masks": torch.zeros(2, 120, 150, dtype=torch.uint8)},
            {"boxes": torch.tensor([[0.0, 0.0, 60.0, 50.0]]), "labels": torch.tensor([1]),
             "masks": torch.zeros(1, 100, 140, dtype=torch.uint8)}]


def _assert_same_detections(ours, theirs):
    """Every detection of torchvision has its own match in ours: the same label, score and box (and mask) to float
    tolerance. Matched rather than compared in order: torchvision's CPU sort is not stable, so the order of equal
    or nearly equal scores (e.g. thin proposals that pool the same features) is not part of its contract."""
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        assert len(a["scores"]) == len(b["scores"]) > 0
        unused = list(range(len(a["scores"])))
        for j in range(len(b["scores"])):
            match = [i for i in unused if a["labels"][i] == b["labels"][j]
                     and abs(float(a["scores"][i] - b["scores"][j])) <= 1e-5 + 1e-4 * float(b["scores"][j])
                     and torch.allclose(a["boxes"][i], b["boxes"][j], rtol=1e-4, atol=1e-3)]
            assert match, f"torchvision's detection {j} ({b['labels'][j]}, {b['scores'][j]}) has no match"
            i = match[0]
            unused.remove(i)
            if "masks" in a:
                torch.testing.assert_close(a["masks"][i], b["masks"][j], rtol=1e-3, atol=1e-3)
        # in score order up to near-ties
        assert torch.all(a["scores"][1:] <= a["scores"][:-1] + 1e-5)


@pytest.fixture(scope="module")
def reference():
    """torchvision's own detections and training losses, computed once per model."""
    out = {}
    for name in MODELS:
        model = _model(name).eval()
        with torch.no_grad():
            dets = model(_images())
        model.train()
        torch.manual_seed(2)
        losses = {k: v.detach() for k, v in model(_images(), _targets()).items()}
        out[name] = (dets, losses)
    return out


def test_patch_routes_and_restores():
    originals = (torchvision.ops.roi_align, torchvision.ops.nms, torchvision.ops.batched_nms,
                 torchvision.ops.MultiScaleRoIAlign, torchvision.ops.boxes.nms,
                 torchvision.models.detection.roi_heads.roi_align, torchvision.ops.poolers.roi_align)
    with ltkernels.patch_torchvision() as patch:
        assert patch.active
        assert torchvision.ops.roi_align is ltkernels.roi_align
        assert torchvision.ops.nms is ltkernels.nms
        assert torchvision.ops.boxes.batched_nms is ltkernels.batched_nms
        assert torchvision.models.detection.roi_heads.roi_align is ltkernels.roi_align
        assert torchvision.models.detection.faster_rcnn.MultiScaleRoIAlign is MultiScaleRoIAlign
        assert torchvision.ops.RoIAlign is ltkernels.RoIAlign
        assert not ltkernels.patch_torchvision().active  # already patched: a second call changes nothing
    assert not patch.active
    assert (torchvision.ops.roi_align, torchvision.ops.nms, torchvision.ops.batched_nms,
            torchvision.ops.MultiScaleRoIAlign, torchvision.ops.boxes.nms,
            torchvision.models.detection.roi_heads.roi_align, torchvision.ops.poolers.roi_align) == originals
    handle = ltkernels.patch_torchvision()  # plain call: patched until undo()
    try:
        assert torchvision.ops.nms is ltkernels.nms
    finally:
        handle.undo()
    assert torchvision.ops.nms is originals[1]


def _count_calls(monkeypatch):
    calls = {"roi_align": 0, "batched_nms": 0}
    for op in calls:
        real = getattr(torch.ops.ltkernels, op)

        def counted(*args, _real=real, _op=op):
            calls[_op] += 1
            return _real(*args)
        monkeypatch.setattr(torch.ops.ltkernels, op, counted)
    return calls


@pytest.mark.parametrize("name", list(MODELS))
def test_same_detections_and_training_step(name, reference, monkeypatch):
    ref_dets, ref_losses = reference[name]
    with ltkernels.patch_torchvision():
        model = _model(name).eval()
        assert isinstance(model.roi_heads.box_roi_pool, MultiScaleRoIAlign)
        calls = _count_calls(monkeypatch)
        with torch.no_grad():
            dets = model(_images())
        assert calls["roi_align"] > 0 and calls["batched_nms"] > 0  # ltkernels' kernels ran, not torchvision's
        _assert_same_detections(dets, ref_dets)

        model.train()
        torch.manual_seed(2)
        losses = model(_images(), _targets())
        assert losses.keys() == ref_losses.keys()
        for k in losses:
            torch.testing.assert_close(losses[k].detach(), ref_losses[k], rtol=1e-4, atol=1e-5)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        opt.zero_grad()
        sum(losses.values()).backward()
        grads = [p.grad for p in model.backbone.body.layer4.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        opt.step()


def test_model_built_before_the_patch_uses_ltkernels(reference, monkeypatch):
    model = _model("fasterrcnn").eval()
    with ltkernels.patch_torchvision():
        calls = _count_calls(monkeypatch)
        with torch.no_grad():
            dets = model(_images())
    assert calls["roi_align"] > 0 and calls["batched_nms"] > 0
    _assert_same_detections(dets, reference["fasterrcnn"][0])


@pytest.mark.parametrize("name", list(MODELS))
def test_scripted_model(name, reference, tmp_path):
    with ltkernels.patch_torchvision():
        scripted = torch.jit.script(_model(name).eval())
    code = scripted.roi_heads.box_roi_pool.code + scripted.rpn.code
    assert "ltkernels" in str(scripted.roi_heads.box_roi_pool.graph) or "ltkernels" in code
    path = tmp_path / f"{name}.pt"
    scripted.save(str(path))
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        _, dets = loaded(_images())  # scripted detection models return (losses, detections)
    _assert_same_detections(dets, reference[name][0])
