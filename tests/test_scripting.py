"""TorchScript and torch.fx: the public RoIAlign / NMS functions and modules script, survive save/load, give the eager
results and keep their error messages; torch.fx treats them as leaves."""
import pytest
import torch

import ltkernels

FUNCTIONS = [ltkernels.roi_align, ltkernels.nms, ltkernels.batched_nms, ltkernels.multiclass_nms]


def _boxes(n=30):
    b = torch.rand(n, 4) * 40
    b[:, 2:] += b[:, :2] + 1
    return b


@pytest.fixture(scope="module")
def scripted():
    return {f.__name__: torch.jit.script(f) for f in FUNCTIONS}


def test_functions_match_eager(scripted):
    x = torch.rand(2, 3, 12, 12)
    rois = torch.cat([torch.randint(0, 2, (6, 1)).float(), _boxes(6) * 0.25], 1)
    for args in ((x, rois, 3), (x, rois, [2, 3], 0.5, 2, True), (x, [rois[:3, 1:], rois[3:, 1:]], 2)):
        torch.testing.assert_close(scripted["roi_align"](*args), ltkernels.roi_align(*args))
    boxes, scores = _boxes(), torch.rand(30)
    assert torch.equal(scripted["nms"](boxes, scores, 0.3), ltkernels.nms(boxes, scores, 0.3))
    idxs = torch.randint(0, 4, (30,))
    assert torch.equal(scripted["batched_nms"](boxes, scores, idxs, 0.3),
                       ltkernels.batched_nms(boxes, scores, idxs, 0.3))
    cls_scores = torch.rand(30, 5)
    for got, want in zip(scripted["multiclass_nms"](boxes, cls_scores, 0.05, 0.5, 10, "background_last"),
                         ltkernels.multiclass_nms(boxes, cls_scores, 0.05, 0.5, 10, "background_last")):
        assert torch.equal(got, want)


def test_scripted_errors_keep_their_messages(scripted):
    x = torch.rand(2, 3, 12, 12)
    cases = [
        (lambda: scripted["roi_align"](x, torch.zeros(3, 4), 2), r"boxes must have shape \[K, 5\]"),
        (lambda: scripted["roi_align"](x[0], torch.zeros(3, 5), 2), "input must be 4-D"),
        (lambda: scripted["roi_align"](x, torch.tensor([[0.5, 0, 0, 4, 4]]), 2), "batch index"),
        (lambda: scripted["roi_align"](x, torch.tensor([[0.0, -1e10, -1e10, 1e10, 1e10]]), 2),
         "adaptive sampling grid"),
        (lambda: scripted["nms"](_boxes()[:, :3], torch.rand(30), 0.5), "boxes must have size 4"),
        (lambda: scripted["nms"](_boxes(), torch.rand(30).double(), 0.5), r"dtype of boxes \(float32\)"),
        (lambda: scripted["batched_nms"](_boxes(), torch.rand(30), torch.zeros(29, dtype=torch.long), 0.5),
         "idxs must have one entry per box"),
        (lambda: scripted["multiclass_nms"](_boxes(), torch.rand(30, 2), 0.1, 0.5, 0), "max_per_image"),
        (lambda: scripted["multiclass_nms"](_boxes(), torch.rand(30, 2), 0.1, 0.5, 5, "mmdet"), "label_layout"),
    ]
    for call, message in cases:
        with pytest.raises(Exception, match=message):
            call()


def test_modules_script_and_save(tmp_path):
    x = torch.rand(2, 3, 16, 16)
    feats = [torch.rand(2, 3, 16, 16), torch.rand(2, 3, 8, 8)]
    boxes = [_boxes(5), _boxes(4)]
    modules = [
        (ltkernels.RoIAlign((2, 3), 0.25, 2), (x, boxes)),
        (ltkernels.MultiLevelRoIAlign(2, strides=(4, 8)), (feats, boxes)),
        (ltkernels.MultiLevelRoIAlign(2, strides=None), (feats, boxes, [64, 64])),
        (ltkernels.MultiScaleRoIAlign(["a", "b"], 2, 2), ({"a": feats[0], "b": feats[1]}, boxes, [(64, 64)] * 2)),
    ]
    for i, (module, args) in enumerate(modules):
        path = tmp_path / f"m{i}.pt"
        torch.jit.script(module).save(str(path))
        torch.testing.assert_close(torch.jit.load(str(path))(*args), module(*args))


def test_fx_symbolic_trace_keeps_the_ops_as_leaves():
    feats = {"a": torch.rand(1, 2, 16, 16), "b": torch.rand(1, 2, 8, 8)}
    boxes = [_boxes(5)]
    for module, args in ((ltkernels.RoIAlign(2, 0.25, 2), (feats["a"], boxes)),
                         (ltkernels.MultiScaleRoIAlign(["a", "b"], 2, 2), (feats, boxes, [(64, 64)])),
                         (ltkernels.MultiLevelRoIAlign(2, strides=(4, 8)), ([feats["a"], feats["b"]], boxes))):
        gm = torch.fx.symbolic_trace(module)
        calls = [n for n in gm.graph.nodes if n.op == "call_function"]
        assert len(calls) == 1 and calls[0].target.__module__.startswith("ltkernels")
        torch.testing.assert_close(gm(*args), module(*args))

    class Detector(torch.nn.Module):
        def forward(self, boxes, scores, idxs):
            keep = ltkernels.batched_nms(boxes, scores, idxs, 0.5)
            return ltkernels.nms(boxes[keep], scores[keep], 0.3)

    gm = torch.fx.symbolic_trace(Detector())
    boxes, scores, idxs = _boxes(), torch.rand(30), torch.randint(0, 3, (30,))
    assert torch.equal(gm(boxes, scores, idxs), Detector()(boxes, scores, idxs))

    class Head(torch.nn.Module):  # calls from another module are leaves too (not only those of our modules)
        def forward(self, x, rois, boxes):
            return ltkernels.roi_align(x, rois, 2) + ltkernels.roi_align(x, [boxes], 2)

    gm = torch.fx.symbolic_trace(Head())
    x, b = feats["a"], _boxes(5)
    rois = torch.cat([torch.zeros(5, 1), b], 1)
    assert sum(getattr(n.target, "__name__", "") == "roi_align" for n in gm.graph.nodes) == 2
    torch.testing.assert_close(gm(x, rois, b), Head()(x, rois, b))
