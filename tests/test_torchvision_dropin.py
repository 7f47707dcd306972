"""torchvision's own op tests (test/test_ops.py: RoIAlign, MultiScaleRoIAlign, NMS, batched NMS), rewritten to run
against ltkernels: the same inputs, references and expectations, our functions in place of torchvision's. Quantized
variants are left out (ltkernels has no quantized kernels)."""
import math

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.feature_extraction import get_graph_node_names

import ltkernels

from conftest import devices


class _Deterministic:
    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.saved = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(self.on)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.saved)


class _Wrap2(nn.Module):
    """torchvision's module wrappers for the fx leaf test: forward returns nothing, so the graph is inputs + op."""

    n_inputs = 2

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, a, b):
        self.layer(a, b)


class _Wrap3(_Wrap2):
    n_inputs = 3

    def forward(self, a, b, c):
        self.layer(a, b, c)


class _PoolWrapper(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.pool = pool

    def forward(self, imgs: Tensor, boxes: list[Tensor]) -> Tensor:
        return self.pool(imgs, boxes)


# ---- the float64 reference of torchvision's test ----------------------------------------------------------
def _bilinear(data, y, x):
    height, width = data.shape
    if -1 < y <= 0:
        y = 0
    elif height - 1 <= y < height:
        y = height - 1
    if -1 < x <= 0:
        x = 0
    elif width - 1 <= x < width:
        x = width - 1
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    val = 0.0
    for wx, xp in ((1 - (x - x0), x0), (x - x0, x0 + 1)):
        for wy, yp in ((1 - (y - y0), y0), (y - y0, y0 + 1)):
            if 0 <= yp < height and 0 <= xp < width:
                val += wx * wy * float(data[yp, xp])
    return val


def _roi_align_expected(x, rois, ph, pw, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
    x = x.double().cpu()
    out = torch.zeros(rois.size(0), x.size(1), ph, pw, dtype=torch.float64)
    offset = 0.5 if aligned else 0.0
    for r, roi in enumerate(rois.double().cpu()):
        n = int(roi[0])
        j0, i0, j1, i1 = (float(v) * spatial_scale - offset for v in roi[1:])
        bin_h, bin_w = (i1 - i0) / ph, (j1 - j0) / pw
        gh = sampling_ratio if sampling_ratio > 0 else int(math.ceil(bin_h))
        gw = sampling_ratio if sampling_ratio > 0 else int(math.ceil(bin_w))
        for i in range(ph):
            for j in range(pw):
                for c in range(x.size(1)):
                    val = 0.0
                    for iy in range(gh):
                        y = i0 + i * bin_h + (iy + 0.5) * bin_h / gh
                        for ix in range(gw):
                            xx = j0 + j * bin_w + (ix + 0.5) * bin_w / gw
                            val += _bilinear(x[n, c], y, xx)
                    out[r, c, i, j] = val / max(gh * gw, 1)
    return out


ROIS = [[0, 0, 0, 9, 9], [0, 0, 5, 4, 9], [0, 5, 5, 9, 9], [1, 0, 0, 9, 9]]


# ---- RoIAlign -----------------------------------------------------------------------------------------------
class TestRoIAlign:
    @pytest.mark.parametrize("device", devices())
    @pytest.mark.parametrize("contiguous", [True, False])
    @pytest.mark.parametrize("x_dtype", [torch.float16, torch.float32, torch.float64], ids=str)
    @pytest.mark.parametrize("aligned", [True, False])
    @pytest.mark.parametrize("deterministic", [True, False])
    def test_forward(self, device, contiguous, x_dtype, aligned, deterministic):
        if deterministic and device == "cpu" and not hasattr(device, "order"):
            pytest.skip("the CPU backward is always deterministic; the forward does not depend on it")
        tol = 4e-3 if x_dtype == torch.float16 else 1e-5
        pool = 5
        x = torch.rand(2, 3, 10, 10, dtype=x_dtype, device=device)  # torchvision's 50 channels serve its PS ops
        if not contiguous:
            x = x.permute(0, 1, 3, 2)
        rois = torch.tensor(ROIS, dtype=x_dtype, device=device)
        with _Deterministic(deterministic):
            y = ltkernels.RoIAlign((pool, pool), spatial_scale=1, sampling_ratio=-1, aligned=aligned)(x, rois)
        assert y.dtype == x.dtype
        expected = _roi_align_expected(x, rois, pool, pool, aligned=aligned)
        torch.testing.assert_close(expected.to(y), y, rtol=tol, atol=tol)

    @pytest.mark.parametrize("seed", range(3))
    @pytest.mark.parametrize("device", devices())
    @pytest.mark.parametrize("contiguous", [True, False])
    @pytest.mark.parametrize("deterministic", [True, False])
    def test_backward(self, seed, device, contiguous, deterministic):
        torch.manual_seed(seed)
        pool = 2
        x = torch.rand(1, 2 * pool * pool, 5, 5, dtype=torch.float64, device=device, requires_grad=True)
        if not contiguous:
            x = x.permute(0, 1, 3, 2)
        rois = torch.tensor([[0, 0, 0, 4, 4], [0, 0, 2, 3, 4], [0, 2, 2, 4, 4]], dtype=torch.float64,
                            device=device)
        scripted = torch.jit.script(ltkernels.roi_align)
        with _Deterministic(deterministic):
            assert torch.autograd.gradcheck(lambda z: ltkernels.roi_align(z, rois, pool, 1.0, 1), (x,), atol=1e-5)
        assert torch.autograd.gradcheck(lambda z: scripted(z, rois, pool, 1.0, 1), (x,), atol=1e-5)

    def test_boxes_shape(self):
        a = torch.linspace(1, 8 * 8, 8 * 8).reshape(1, 1, 8, 8)
        with pytest.raises(AssertionError):
            ltkernels.roi_align(a, torch.tensor([[0, 0, 3, 3]], dtype=a.dtype), output_size=(2, 2))
        with pytest.raises(AssertionError):
            ltkernels.roi_align(a, [torch.tensor([[0, 0, 3]], dtype=a.dtype)], output_size=(2, 2))

    def test_jit_boxes_list(self):
        model = _PoolWrapper(ltkernels.RoIAlign(output_size=[3, 3], spatial_scale=1.0, sampling_ratio=-1))
        x = torch.rand(2, 1, 10, 10)
        roi = torch.tensor(ROIS, dtype=torch.float).t()
        scripted = torch.jit.script(model)
        y = scripted(x, [roi, roi])
        assert y.shape == (10, 1, 3, 3)
        torch.testing.assert_close(y, model(x, [roi, roi]))

    @pytest.mark.parametrize("device", devices())
    def test_is_leaf_node(self, device):
        op = _Wrap2(ltkernels.RoIAlign((5, 5), spatial_scale=1, sampling_ratio=-1)).to(device)
        train_nodes, eval_nodes = get_graph_node_names(op)
        assert len(train_nodes) == len(eval_nodes) == 1 + op.n_inputs

    @pytest.mark.parametrize("device", devices())
    def test_torch_fx_trace(self, device):
        op = ltkernels.RoIAlign((5, 5), spatial_scale=1, sampling_ratio=-1).to(device)
        gm = torch.fx.symbolic_trace(op)
        x = torch.rand(2, 50, 5, 5, device=device)
        rois = torch.tensor(ROIS, dtype=torch.float, device=device)
        expected = op(x, rois)
        got = gm(x, rois)
        assert got.dtype == x.dtype
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---- MultiScaleRoIAlign -----------------------------------------------------------------------------------------
class TestMultiScaleRoIAlign:
    def test_msroialign_repr(self):
        t = ltkernels.MultiScaleRoIAlign(["0"], (7, 7), 2)
        assert repr(t) == "MultiScaleRoIAlign(featmap_names=['0'], output_size=(7, 7), sampling_ratio=2)"
        assert repr(t) == repr(torchvision.ops.MultiScaleRoIAlign(["0"], (7, 7), 2))

    @pytest.mark.parametrize("device", devices())
    def test_is_leaf_node(self, device):
        op = _Wrap3(ltkernels.MultiScaleRoIAlign(["0"], (7, 7), 2)).to(device)
        train_nodes, eval_nodes = get_graph_node_names(op)
        assert len(train_nodes) == len(eval_nodes) == 1 + op.n_inputs

    @pytest.mark.parametrize("device", devices())
    @pytest.mark.parametrize("sampling_ratio", [2, -1])
    def test_matches_torchvision(self, device, sampling_ratio):
        image = (64, 80)
        feats = {name: torch.rand(2, 3, image[0] // s, image[1] // s, device=device)
                 for name, s in (("p2", 4), ("p3", 8), ("p4", 16), ("pool", 32))}
        boxes = []
        for n in (6, 4):
            xy = torch.rand(n, 2) * torch.tensor([image[1], image[0]]) * 0.6
            wh = torch.exp(torch.empty(n, 2).uniform_(math.log(2), math.log(300)))
            boxes.append(torch.cat([xy, xy + wh], dim=1).to(device))
        shapes = [image, (60, 70)]
        names = ["p2", "p3", "p4"]
        ours = ltkernels.MultiScaleRoIAlign(names, 3, sampling_ratio)
        theirs = torchvision.ops.MultiScaleRoIAlign(names, 3, sampling_ratio)
        torch.testing.assert_close(ours(feats, boxes, shapes), theirs(feats, boxes, shapes))
        scripted = torch.jit.script(ours)
        torch.testing.assert_close(scripted(feats, boxes, shapes), theirs(feats, boxes, shapes))
        one = ltkernels.MultiScaleRoIAlign(["p3"], [2, 3], sampling_ratio)  # one level: no level mapping
        torch.testing.assert_close(one(feats, boxes, shapes),
                                   torchvision.ops.MultiScaleRoIAlign(["p3"], [2, 3], sampling_ratio)(
                                       feats, boxes, shapes))

    def test_aligned_and_canonical_options(self):
        feats = {"0": torch.rand(1, 2, 16, 16), "1": torch.rand(1, 2, 8, 8)}
        boxes = [torch.tensor([[1.0, 2.0, 20.0, 30.0], [0.0, 0.0, 60.0, 60.0]])]
        ours = ltkernels.MultiScaleRoIAlign(["0", "1"], 2, 2, canonical_scale=32, canonical_level=3, aligned=True)
        levels = ltkernels.ops.poolers.fpn_levels(boxes[0], 2.0, 3.0, 32.0, 3.0)
        assert levels.tolist() == [0, 1]
        expected = torch.cat([ltkernels.roi_align(feats["0"], [boxes[0][:1]], 2, 0.25, 2, True),
                              ltkernels.roi_align(feats["1"], [boxes[0][1:]], 2, 0.125, 2, True)])
        torch.testing.assert_close(ours(feats, boxes, [(64, 64)]), expected)

    def test_missing_names(self):
        with pytest.raises(ValueError, match="none of featmap_names"):
            ltkernels.MultiScaleRoIAlign(["a"], 2, 2)({"b": torch.rand(1, 1, 4, 4)}, [torch.zeros(0, 4)], [(8, 8)])


# ---- NMS ------------------------------------------------------------------------------------------------------
def _reference_nms(boxes, scores, iou_threshold):
    picked = []
    _, order = scores.sort(descending=True)
    while len(order) > 0:
        current = order[0]
        picked.append(int(current))
        if len(order) == 1:
            break
        order = order[1:]
        iou = torchvision.ops.box_iou(boxes[order], boxes[current][None]).squeeze(1)
        order = order[iou <= iou_threshold]
    return torch.as_tensor(picked)


def _tensors_with_iou(n, iou_thresh):
    # the last box has IoU just above the threshold with the first: it must be suppressed
    boxes = torch.rand(n, 4) * 100
    boxes[:, 2:] += boxes[:, :2]
    boxes[-1, :] = boxes[0, :]
    x0, y0, x1, y1 = boxes[-1].tolist()
    iou_thresh += 1e-5
    boxes[-1, 2] += (x1 - x0) * (1 - iou_thresh) / iou_thresh
    return boxes, torch.rand(n)


class TestNMS:
    @pytest.mark.parametrize("iou", [0.2, 0.5, 0.8])
    @pytest.mark.parametrize("seed", range(4))
    def test_nms_ref(self, iou, seed):
        torch.manual_seed(seed)
        boxes, scores = _tensors_with_iou(1000, iou)
        torch.testing.assert_close(ltkernels.nms(boxes, scores, iou), _reference_nms(boxes, scores, iou))

    def test_nms_input_errors(self):
        for boxes, scores in ((torch.rand(4), torch.rand(3)), (torch.rand(3, 5), torch.rand(3)),
                              (torch.rand(3, 4), torch.rand(3, 2)), (torch.rand(3, 4), torch.rand(4))):
            with pytest.raises(RuntimeError):
                ltkernels.nms(boxes, scores, 0.5)

    @pytest.mark.parametrize("iou", [0.2, 0.5, 0.8])
    def test_nms_cuda(self, cuda_side, iou):
        boxes, scores = _tensors_with_iou(300, iou)
        boxes, scores = boxes.double(), scores.double()
        r_cpu = ltkernels.nms(boxes, scores, iou)
        with cuda_side:
            r_gpu = ltkernels.nms(cuda_side.put(boxes), cuda_side.put(scores), iou)
        assert torch.equal(r_cpu, r_gpu.cpu())

    @pytest.mark.parametrize("device", devices())
    def test_nms_float16(self, device):
        boxes = torch.tensor([[285.3538, 185.5758, 1193.5110, 851.4551], [285.1472, 188.7374, 1192.4984, 851.0669],
                              [279.2440, 197.9812, 1189.4746, 849.2019]], device=device)
        scores = torch.tensor([0.6370, 0.7569, 0.3966], device=device)
        keep32 = ltkernels.nms(boxes, scores, 0.2)
        keep16 = ltkernels.nms(boxes.half(), scores.half(), 0.2)
        assert torch.equal(keep32, keep16)

    @pytest.mark.parametrize("seed", range(4))
    def test_batched_nms_implementations(self, seed):
        """torchvision's two batched_nms strategies, run on ltkernels' nms, agree with each other and with ours."""
        torch.manual_seed(seed)
        n = 1000
        boxes = torch.cat((torch.rand(n, 2), torch.rand(n, 2) + 10), dim=1)
        scores = torch.rand(n)
        idxs = torch.randint(0, 4, size=(n,))
        with ltkernels.patch_torchvision():
            vanilla = torchvision.ops.boxes._batched_nms_vanilla(boxes, scores, idxs, 0.9)
            trick = torchvision.ops.boxes._batched_nms_coordinate_trick(boxes, scores, idxs, 0.9)
        torch.testing.assert_close(vanilla, trick)
        torch.testing.assert_close(ltkernels.batched_nms(boxes, scores, idxs, 0.9), vanilla)
        empty = torch.empty((0,), dtype=torch.int64)
        torch.testing.assert_close(empty, ltkernels.batched_nms(empty, None, None, None))


def test_emulated_variants_reach_the_cuda_kernels():
    """The emu-* variants above run the CUDA kernels' emulated build (not the CPU kernels under another name)."""
    from ltkernels.testing import cuda_emulation as emulation

    if not emulation.available():
        pytest.skip("this build has no CUDA emulation (LTK_CUDA_EMU=ON, Boost.Context)")
    x = torch.rand(2, 3, 10, 10, requires_grad=True)
    rois = torch.tensor(ROIS, dtype=torch.float)
    boxes, scores = _tensors_with_iou(50, 0.5)
    with emulation.cuda_emulation(order="forward"):
        before = emulation.stats()["launches"]
        ltkernels.RoIAlign((5, 5), 1, -1)(x, rois).sum().backward()
        after_roi_align = emulation.stats()["launches"]
        ltkernels.nms(boxes, scores, 0.5)
        ltkernels.batched_nms(boxes, scores, torch.randint(0, 3, (50,)), 0.5)
        after_nms = emulation.stats()["launches"]
    assert after_roi_align >= before + 2 and after_nms >= after_roi_align + 2
