"""Adversarial inputs: each must give the right answer or a clear error, eager and compiled, on every device."""
import time

import pytest
import torch
import torchvision

import ltkernels
from ltkernels.ops.roi_align import MAX_ADAPTIVE_SAMPLES

from conftest import devices


# ---- RoIAlign: a huge finite box with adaptive sampling ---------------------------------------------------------
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("aligned", [False, True])
def test_huge_box_adaptive_grid_is_refused_quickly(device, aligned):
    x = torch.rand(1, 2, 8, 8, device=device)
    rois = torch.tensor([[0.0, -1e10, -1e10, 1e10, 1e10]], device=device)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"adaptive sampling grid of .* more than the limit of 1048576"):
        ltkernels.roi_align(x, rois, 7, 1.0, -1, aligned)
    assert time.perf_counter() - start < 5
    # with an explicit sampling ratio the same box is cheap and allowed; so is a box just within the limit
    assert ltkernels.roi_align(x, rois, 7, 1.0, 2, aligned).shape == (1, 2, 7, 7)
    side = 2048.0  # at scale 0.5: 1024 x 1024 samples per bin for a 1 x 1 output, exactly the limit
    ok = torch.tensor([[0.0, 0.0, 0.0, side, side]], device=device)
    torch.testing.assert_close(ltkernels.roi_align(x, ok, 1, 0.5, -1, aligned),
                               torchvision.ops.roi_align(x.cpu(), ok.cpu(), 1, 0.5, -1, aligned).to(device))
    bigger = torch.tensor([[0.0, 0.0, 0.0, side, side + 2]], device=device)
    with pytest.raises(ValueError, match="adaptive sampling grid of 1025 x 1024"):
        ltkernels.roi_align(x, bigger, 1, 0.5, -1, aligned)


def test_huge_box_kernel_and_compiled_refuse_too():
    x = torch.rand(1, 2, 8, 8)
    rois = torch.tensor([[0.0, -1e10, -1e10, 1e10, 1e10]])
    with pytest.raises(RuntimeError, match="adaptive sampling grid of more than 1048576"):
        torch.ops.ltkernels.roi_align(x, rois, 1.0, 7, 7, -1, False)
    compiled = torch.compile(lambda a, r: ltkernels.roi_align(a, r, 7), fullgraph=True)
    with pytest.raises(RuntimeError, match="adaptive sampling grid of at most"):
        compiled(x, rois)
    assert MAX_ADAPTIVE_SAMPLES == 1 << 20


# ---- one rule for a fractional batch index, eager and compiled --------------------------------------------------
@pytest.mark.parametrize("bad", [0.5, -1.0, 2.0])
def test_fractional_batch_index_same_rule_eager_and_compiled(bad):
    x = torch.rand(2, 3, 8, 8)
    rois = torch.tensor([[bad, 1.0, 1.0, 5.0, 5.0]])
    with pytest.raises(ValueError, match="batch index"):
        ltkernels.roi_align(x, rois, 2)
    with pytest.raises(RuntimeError, match="batch index"):  # the kernel's own check (what a graph calls)
        torch.ops.ltkernels.roi_align(x, rois, 1.0, 2, 2, 2, False)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, r: ltkernels.roi_align(a, r, 2), fullgraph=True)
    with pytest.raises(RuntimeError, match="integer batch index"):
        compiled(x, rois)
    good = torch.tensor([[1.0, 1.0, 1.0, 5.0, 5.0]])
    torch.testing.assert_close(compiled(x, good), ltkernels.roi_align(x, good, 2))


# ---- image index exact for float16 / bfloat16 box lists ------------------------------------------------------
@pytest.mark.parametrize("dtype,n", [(torch.float16, 2051), (torch.bfloat16, 259)])
def test_box_list_image_index_is_exact_in_low_precision(dtype, n):
    # neighbouring images hold different values, exact in every dtype: a rounded index shows
    x = (torch.arange(n) % 7).float().view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous().to(dtype)
    boxes = [torch.tensor([[0.0, 0.0, 3.0, 3.0]], dtype=dtype) for _ in range(n)]
    out = ltkernels.roi_align(x, boxes, 1, 1.0, 2, True)
    # each image's constant value comes back from its own image (index n - 1 is not representable in `dtype`)
    assert out.flatten().float().tolist() == x[:, 0, 0, 0].float().tolist()
    pooler = ltkernels.MultiScaleRoIAlign(["0"], 1, 2)
    out = pooler({"0": x}, boxes, [(4, 4)] * n)
    assert out.flatten().float().tolist() == x[:, 0, 0, 0].float().tolist()


# ---- MultiLevelRoIAlign / MultiScaleRoIAlign ------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
def test_pooler_refuses_inverted_boxes(device):
    feats = [torch.rand(1, 2, 16, 16, device=device), torch.rand(1, 2, 8, 8, device=device)]
    inverted = [torch.tensor([[10.0, 2.0, 4.0, 12.0]], device=device)]  # x2 < x1: no pyramid level
    with pytest.raises(ValueError, match=r"x1 <= x2 and y1 <= y2 .* at row 0"):
        ltkernels.MultiLevelRoIAlign(2, strides=(4, 8))(feats, inverted)
    with pytest.raises(ValueError, match=r"x1 <= x2 and y1 <= y2"):
        ltkernels.MultiScaleRoIAlign(["0", "1"], 2, 2)({"0": feats[0], "1": feats[1]}, inverted, [(64, 64)])
    flat = [torch.tensor([[4.0, 2.0, 4.0, 12.0]], device=device)]  # zero width: the finest level, as torchvision
    out = ltkernels.MultiLevelRoIAlign(2, strides=(4, 8), aligned=False)(feats, flat)
    torch.testing.assert_close(out, ltkernels.roi_align(feats[0], flat, 2, 0.25, 2, False))


def test_pooler_refuses_mismatched_levels():
    feats = [torch.rand(1, 4, 16, 16), torch.rand(1, 3, 8, 8)]
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0]])]
    with pytest.raises(ValueError, match=r"features\[1\] has shape \[1, 3, 8, 8\] .* same batch size and channel"):
        ltkernels.MultiLevelRoIAlign(2, strides=(4, 8))(feats, boxes)
    with pytest.raises(ValueError, match="same batch size and channel count"):
        ltkernels.MultiScaleRoIAlign(["a", "b"], 2, 2)({"a": feats[0], "b": feats[1]}, boxes, [(64, 64)])
    with pytest.raises(TypeError, match=r"features\[1\] must have dtype in \(float32\)"):
        ltkernels.MultiLevelRoIAlign(2, strides=(4, 8))([feats[0], feats[0][:, :, ::2, ::2].double()], boxes)


# ---- batched_multiclass_nms: num_images ------------------------------------------------------------------------
def test_num_images_is_validated():
    scores = torch.rand(6, 3)
    boxes = torch.rand(6, 4) * 10
    boxes[:, 2:] += boxes[:, :2]
    index = torch.tensor([0, 0, 1, 1, 2, 2])
    for bad in (10 ** 12, -1):
        with pytest.raises(ValueError, match="num_images must lie in"):
            ltkernels.batched_multiclass_nms(boxes, scores, index, bad)
    with pytest.raises(TypeError, match="num_images must be an int"):
        ltkernels.batched_multiclass_nms(boxes, scores, index, 3.0)
    with pytest.raises(RuntimeError, match="num_images must lie in"):  # the kernel refuses it as well
        torch.ops.ltkernels.multiclass_nms(boxes, scores, index, 10 ** 12, 1e-4, 0.5, -1)
    assert ltkernels.MAX_IMAGES_PER_CALL == 1 << 24
    out = ltkernels.batched_multiclass_nms(boxes, scores, index, 5)  # images without rows are fine
    assert len(out) == 5 and out[3][0].shape == (0, 4)


# ---- double backward ----------------------------------------------------------------------------------------
def _bags_inputs():
    groups = ltkernels.BalancedGroups.from_instance_counts([3, 50, 500, 5000])
    logits = torch.randn(12, groups.num_logits, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (12,))
    return groups, logits, labels


def test_double_backward_is_refused_clearly():
    groups, logits, labels = _bags_inputs()
    loss = ltkernels.group_softmax_loss(logits, labels, groups, others_ratio=float("inf"))
    with pytest.raises(RuntimeError, match="group_softmax_loss does not support double backward"):
        torch.autograd.grad(loss, logits, create_graph=True)
    efl_logits = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    loss = ltkernels.equalized_focal_loss(efl_logits, labels)
    with pytest.raises(RuntimeError, match="equalized_focal_loss does not support double backward"):
        torch.autograd.grad(loss, efl_logits, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.gradgradcheck(lambda z: ltkernels.equalized_focal_loss(z, labels), (efl_logits,))
    # first-order gradients are unaffected, also when the loss is part of a larger graph
    loss = ltkernels.equalized_focal_loss(efl_logits, labels) + ltkernels.group_softmax_loss(
        logits, labels, groups, others_ratio=float("inf"))
    loss.backward()
    assert efl_logits.grad is not None and logits.grad is not None


def test_roi_align_double_backward_is_supported():
    x = torch.rand(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.5, 0.5, 4.0, 5.0]], dtype=torch.float64)
    assert torch.autograd.gradgradcheck(lambda z: ltkernels.roi_align(z, rois, 2, 1.0, 2), (x,))


# ---- inputs torchvision accepts -------------------------------------------------------------------------------
def _boxes(n=40):
    b = torch.rand(n, 4) * 50
    b[:, 2:] += b[:, :2] + 1
    return b, torch.rand(n)


def test_batched_nms_empty_before_other_arguments():
    for empty in (torch.empty(0), torch.empty(0, 4)):
        out = ltkernels.batched_nms(empty, None, None, None)
        assert out.dtype == torch.int64 and out.shape == (0,)


def test_batched_nms_float_and_bool_idxs():
    boxes, scores = _boxes()
    idxs = torch.randint(0, 3, (40,))
    expected = torchvision.ops.batched_nms(boxes, scores, idxs, 0.3)
    assert torch.equal(ltkernels.batched_nms(boxes, scores, idxs.float(), 0.3), expected)
    fractional = idxs.double() * 0.1 + 1e-9  # categories compared by value, never merged by rounding
    assert torch.equal(ltkernels.batched_nms(boxes, scores, fractional, 0.3), expected)
    flags = idxs > 0
    assert torch.equal(ltkernels.batched_nms(boxes, scores, flags, 0.3),
                       torchvision.ops.batched_nms(boxes, scores, flags, 0.3))
    with pytest.raises(ValueError, match="idxs contains NaN"):
        ltkernels.batched_nms(boxes, scores, torch.full((40,), float("nan")), 0.3)


def test_iou_threshold_as_0d_tensor():
    boxes, scores = _boxes()
    thr = torch.tensor(0.4)
    assert torch.equal(ltkernels.nms(boxes, scores, thr), torchvision.ops.nms(boxes, scores, 0.4))
    idxs = torch.randint(0, 3, (40,))
    assert torch.equal(ltkernels.batched_nms(boxes, scores, idxs, thr), torchvision.ops.batched_nms(
        boxes, scores, idxs, 0.4))
    b, s, _, _ = ltkernels.multiclass_nms(boxes, torch.rand(40, 2), torch.tensor(0.1), thr)
    assert b.shape[0] == s.shape[0] > 0
    with pytest.raises(TypeError, match="iou_threshold must be a float or a one-element tensor"):
        ltkernels.nms(boxes, scores, torch.tensor([0.4, 0.5]))


# ---- exception classes -----------------------------------------------------------------------------------------
def test_errors_are_also_torchvisions_classes():
    boxes, scores = _boxes()
    with pytest.raises(RuntimeError) as err:
        ltkernels.nms(boxes[:, :3], scores, 0.5)
    assert isinstance(err.value, ValueError) and "boxes must have size 4" in str(err.value)
    with pytest.raises(RuntimeError) as err:
        ltkernels.nms(boxes, scores.double(), 0.5)
    assert isinstance(err.value, TypeError)
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(AssertionError) as err:
        ltkernels.roi_align(x, torch.tensor([[0.0, 0, 3, 3]]), 2)
    assert isinstance(err.value, ValueError) and "[K, 5]" in str(err.value)
    assert issubclass(ltkernels.BoxesShapeError, (ValueError, AssertionError, RuntimeError))
    assert issubclass(ltkernels.ArgumentValueError, RuntimeError)
    assert issubclass(ltkernels.ArgumentTypeError, TypeError) and issubclass(ltkernels.ArgumentTypeError,
                                                                             RuntimeError)
