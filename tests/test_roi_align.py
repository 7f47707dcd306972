import math

import pytest
import torch
import torchvision

import ltkernels
from ltkernels.reference.roi_align import roi_align_reference
from ltkernels.testing import cuda_emulation as emulation

from conftest import EMULATION, cuda_devices

# Two shapes that send the CPU kernels down their two paths: many RoIs on a small map use the channels-last
# (vectorised over channels) path, a few RoIs on a large map read the NCHW planes in place.
SHAPES = {
    "many_rois": dict(n=2, c=3, h=9, w=11, k=9, out=(3, 4)),
    "few_rois": dict(n=2, c=4, h=40, w=37, k=2, out=(2, 2)),
}


def make_boxes(k, n, h, w, scale=1.0, outside=True, dtype=torch.float64, device="cpu"):
    """Random (batch, x1, y1, x2, y2) in input-image coordinates; some boxes stick out of the map or lie off it."""
    img_w, img_h = w / scale, h / scale
    lo = -0.3 if outside else 0.0
    hi = 1.3 if outside else 1.0
    x1 = torch.empty(k, dtype=dtype).uniform_(lo, hi) * img_w
    y1 = torch.empty(k, dtype=dtype).uniform_(lo, hi) * img_h
    bw = torch.empty(k, dtype=dtype).uniform_(0.02, 0.6) * img_w
    bh = torch.empty(k, dtype=dtype).uniform_(0.02, 0.6) * img_h
    batch = torch.randint(0, n, (k,)).to(dtype)
    rois = torch.stack([batch, x1, y1, x1 + bw, y1 + bh], dim=1)
    if k >= 3 and outside:
        rois[0, 1:] = torch.tensor([-5 * img_w, -5 * img_h, -4 * img_w, -4 * img_h])  # wholly outside
        rois[1, 1:] = torch.tensor([0.2 * img_w, 0.3 * img_h, 0.2 * img_w, 0.3 * img_h])  # degenerate (zero size)
    return rois.to(device)


def as_list(rois, n):
    return [rois[rois[:, 0] == i, 1:] for i in range(n)]


def sorted_by_image(rois):
    return rois[torch.argsort(rois[:, 0], stable=True)]


# ---- forward --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
@pytest.mark.parametrize("boxes_as", ["tensor", "list"])
def test_forward_matches_reference_and_torchvision(shape, aligned, sampling_ratio, boxes_as):
    s = SHAPES[shape]
    scale = 0.5
    x = torch.randn(s["n"], s["c"], s["h"], s["w"], dtype=torch.float64)
    rois = sorted_by_image(make_boxes(s["k"], s["n"], s["h"], s["w"], scale))
    boxes = rois if boxes_as == "tensor" else as_list(rois, s["n"])
    args = (s["out"], scale, sampling_ratio, aligned)
    ref = roi_align_reference(x, boxes, *args)
    out = ltkernels.roi_align(x, boxes, *args)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    x32, r32 = x.float(), rois.float()
    boxes32 = r32 if boxes_as == "tensor" else as_list(r32, s["n"])
    out32 = ltkernels.roi_align(x32, boxes32, *args)
    tv = torchvision.ops.roi_align(x32, boxes32, *args)
    torch.testing.assert_close(out32, tv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out32.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_channels_last_and_noncontiguous_input(shape):
    s = SHAPES[shape]
    base = torch.randn(s["n"], 2 * s["c"], s["h"] + 3, s["w"], dtype=torch.float64)
    x = base[:, ::2, 3:, :]  # non-contiguous view
    assert not x.is_contiguous()
    rois = make_boxes(s["k"], s["n"], s["h"], s["w"])
    ref = roi_align_reference(x, rois, s["out"], 1.0, 2, True)
    torch.testing.assert_close(ltkernels.roi_align(x, rois, s["out"], 1.0, 2, True), ref, rtol=1e-12, atol=1e-12)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out = ltkernels.roi_align(x_cl, rois, s["out"], 1.0, 2, True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert out.is_contiguous()


def test_adaptive_sampling_large_rois_and_spatial_scale():
    x = torch.randn(1, 2, 30, 25, dtype=torch.float64)
    rois = torch.tensor([[0, 1.0, 2.0, 95.0, 110.0], [0, -40.0, -30.0, 200.0, 150.0], [0, 10.0, 10.0, 10.5, 60.0]],
                        dtype=torch.float64)
    for aligned in (False, True):
        ref = roi_align_reference(x, rois, (5, 3), 0.25, -1, aligned)
        torch.testing.assert_close(ltkernels.roi_align(x, rois, (5, 3), 0.25, -1, aligned), ref,
                                   rtol=1e-12, atol=1e-12)
        tv = torchvision.ops.roi_align(x, rois, (5, 3), 0.25, -1, aligned)
        torch.testing.assert_close(ltkernels.roi_align(x, rois, (5, 3), 0.25, -1, aligned), tv,
                                   rtol=1e-12, atol=1e-12)


def test_rois_wholly_outside_give_zero():
    x = torch.randn(1, 3, 8, 8)
    rois = torch.tensor([[0, -50.0, -50.0, -20.0, -20.0], [0, 30.0, 30.0, 60.0, 40.0]])
    out = ltkernels.roi_align(x, rois, 2, 1.0, 2, True)
    assert torch.equal(out, torch.zeros(2, 3, 2, 2))
    torch.testing.assert_close(out, torchvision.ops.roi_align(x, rois, 2, 1.0, 2, True))


@pytest.mark.parametrize("boxes", ["empty_list", "list_of_empty", "empty_tensor"])
def test_empty_boxes(boxes):
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    b = {"empty_list": [], "list_of_empty": [torch.zeros(0, 4), torch.zeros(0, 4)],
         "empty_tensor": torch.zeros(0, 5)}[boxes]
    out = ltkernels.roi_align(x, b, (2, 3), 1.0, 2, True)
    assert out.shape == (0, 3, 2, 3)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_zero_channels_and_empty_map():
    rois = torch.tensor([[0, 1.0, 1.0, 4.0, 4.0]])
    assert ltkernels.roi_align(torch.randn(1, 0, 5, 5), rois, 2).shape == (1, 0, 2, 2)
    out = ltkernels.roi_align(torch.randn(1, 2, 0, 5), rois, 2)
    assert torch.equal(out, torch.zeros(1, 2, 2, 2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_low_precision_dtypes(dtype, shape):
    s = SHAPES[shape]
    x = torch.randn(s["n"], s["c"], s["h"], s["w"]).to(dtype)
    rois = make_boxes(s["k"], s["n"], s["h"], s["w"], dtype=torch.float32)
    ref = ltkernels.roi_align(x.float(), rois, s["out"], 1.0, -1, True)
    out = ltkernels.roi_align(x, rois, s["out"], 1.0, -1, True)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    xg = x.detach().requires_grad_()
    g = torch.randn_like(ref)
    ltkernels.roi_align(xg, rois, s["out"], 1.0, -1, True).backward(g.to(dtype))
    xf = x.float().requires_grad_()
    ltkernels.roi_align(xf, rois, s["out"], 1.0, -1, True).backward(g.to(dtype).float())
    assert xg.grad.dtype == dtype
    torch.testing.assert_close(xg.grad.float(), xf.grad, rtol=2e-2, atol=2e-2)


# ---- backward -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_backward_matches_torchvision(shape, aligned, sampling_ratio):
    s = SHAPES[shape]
    x = torch.randn(s["n"], s["c"], s["h"], s["w"])
    rois = make_boxes(s["k"], s["n"], s["h"], s["w"], scale=0.5, dtype=torch.float32)
    args = (s["out"], 0.5, sampling_ratio, aligned)
    g = torch.randn(s["k"], s["c"], *s["out"])
    ours = x.clone().requires_grad_()
    ltkernels.roi_align(ours, rois, *args).backward(g)
    theirs = x.clone().requires_grad_()
    torchvision.ops.roi_align(theirs, rois, *args).backward(g)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-5)
    # and against autograd through the float64 reference
    xd = x.double().requires_grad_()
    roi_align_reference(xd, rois.double(), *args).backward(g.double())
    torch.testing.assert_close(ours.grad.double(), xd.grad, rtol=1e-4, atol=1e-4)


def test_backward_noncontiguous_grad():
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64, requires_grad=True)
    rois = make_boxes(6, 2, 9, 11)
    g = torch.randn(3, 6, 2, 2, dtype=torch.float64).transpose(0, 1)  # [6, 3, 2, 2], non-contiguous
    ltkernels.roi_align(x, rois, 2, 1.0, 2, False).backward(g)
    xr = x.detach().clone().requires_grad_()
    roi_align_reference(xr, rois, 2, 1.0, 2, False).backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gradcheck(aligned, shape):
    s = dict(SHAPES[shape])
    s["c"] = 2
    x = torch.randn(s["n"], s["c"], s["h"], s["w"], dtype=torch.float64, requires_grad=True)
    rois = make_boxes(s["k"], s["n"], s["h"], s["w"])
    fn = lambda t: ltkernels.roi_align(t, rois, s["out"], 1.0, -1, aligned)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_cpu_backward_is_deterministic(shape):
    s = dict(SHAPES[shape])
    s["c"] = 64  # several channel slices, so several threads share the work where cores exist
    x = torch.randn(s["n"], s["c"], s["h"], s["w"], requires_grad=True)
    rois = make_boxes(40, s["n"], s["h"], s["w"], dtype=torch.float32)
    g = torch.randn(40, s["c"], *s["out"])
    grads = []
    for _ in range(2):
        x.grad = None
        ltkernels.roi_align(x, rois, s["out"], 1.0, 2, True).backward(g)
        grads.append(x.grad.clone())
    assert torch.equal(grads[0], grads[1])


# ---- torch.library / torch.compile -----------------------------------------------------------------------------
def test_opcheck():
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64, requires_grad=True)
    rois = make_boxes(6, 2, 9, 11)
    torch.library.opcheck(torch.ops.ltkernels.roi_align.default, (x, rois, 0.5, 3, 2, 2, True))
    g = torch.randn(6, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.ltkernels._roi_align_backward.default,
                          (g, rois, 0.5, 3, 2, 2, 3, 9, 11, 2, True, False))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    x = torch.randn(2, 3, 9, 11)
    rois = make_boxes(6, 2, 9, 11, dtype=torch.float32)

    def fn(inp, r):
        return ltkernels.roi_align(inp, r, (3, 2), 0.5, 2, True).square().sum()

    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    xc = x.clone().requires_grad_()
    xe = x.clone().requires_grad_()
    loss_c = compiled(xc, rois)
    loss_e = fn(xe, rois)
    torch.testing.assert_close(loss_c, loss_e)
    loss_c.backward()
    loss_e.backward()
    torch.testing.assert_close(xc.grad, xe.grad)


# ---- module and FPN pooler -------------------------------------------------------------------------------------
def test_module_repr_and_forward():
    m = ltkernels.RoIAlign((3, 2), spatial_scale=0.25, sampling_ratio=2, aligned=True)
    assert repr(m) == "RoIAlign(output_size=(3, 2), spatial_scale=0.25, sampling_ratio=2, aligned=True)"
    x = torch.randn(2, 3, 9, 11)
    rois = make_boxes(5, 2, 9, 11, scale=0.25, dtype=torch.float32)
    torch.testing.assert_close(m(x, rois), torchvision.ops.RoIAlign((3, 2), 0.25, 2, True)(x, rois))


@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_multilevel_matches_torchvision_multiscale(sampling_ratio):
    image = (448, 512)
    strides = (4, 8, 16, 32)
    feats = [torch.randn(2, 3, image[0] // s, image[1] // s) for s in strides]
    boxes = []
    for n in (7, 5):
        xy = torch.rand(n, 2) * torch.tensor([image[1], image[0]]) * 0.7
        wh = torch.exp(torch.empty(n, 2).uniform_(math.log(16), math.log(600)))
        boxes.append(torch.cat([xy, xy + wh], dim=1))
    ours = ltkernels.MultiLevelRoIAlign(7, sampling_ratio=sampling_ratio, aligned=False, strides=strides)
    out = ours(feats, boxes)
    tv = torchvision.ops.MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 7, sampling_ratio)
    expected = tv({f"p{i + 2}": f for i, f in enumerate(feats)}, boxes, [image, image])
    assert out.shape == (12, 3, 7, 7)
    torch.testing.assert_close(out, expected)
    # strides inferred from the image size, and the Tensor[K, 5] form
    inferred = ltkernels.MultiLevelRoIAlign(7, sampling_ratio=sampling_ratio, aligned=False, strides=None)
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    torch.testing.assert_close(inferred(feats, rois, image_size=image), expected)
    # the levels really differ (the test would be weak if every box went to one level)
    assert len(set(ours.levels(rois, strides).tolist())) >= 3


def test_multilevel_backward_and_bad_strides():
    feats = [torch.randn(1, 2, 32 // s, 32 // s, dtype=torch.float64, requires_grad=True) for s in (4, 8)]
    boxes = [torch.tensor([[0.0, 0.0, 4.0, 6.0], [1.0, 2.0, 30.0, 31.0]], dtype=torch.float64)]
    m = ltkernels.MultiLevelRoIAlign(2, strides=(4, 8), canonical_scale=16, canonical_level=3)
    assert torch.autograd.gradcheck(lambda a, b: m([a, b], boxes), tuple(feats), fast_mode=True)
    with pytest.raises(ValueError, match="strides"):
        ltkernels.MultiLevelRoIAlign(2, strides=(4, 6))
    with pytest.raises(ValueError, match="strides"):
        m([feats[0]], boxes)
    with pytest.raises(ValueError, match="boxes contains NaN"):
        m(feats, [torch.tensor([[0.0, 0.0, float("nan"), 6.0]], dtype=torch.float64)])


# ---- bad input --------------------------------------------------------------------------------------------------
def test_bad_input():
    x = torch.randn(2, 3, 8, 8)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0], [1, 2.0, 2.0, 6.0, 7.0]])
    with pytest.raises(ValueError, match="input must be 4-D"):
        ltkernels.roi_align(x[0], rois, 2)
    with pytest.raises(TypeError, match="input must have dtype"):
        ltkernels.roi_align(x.to(torch.int32), rois, 2)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        ltkernels.roi_align(x.numpy(), rois, 2)
    with pytest.raises(ValueError, match=r"boxes .*\[K, 5\]"):
        ltkernels.roi_align(x, rois[:, 1:], 2)
    with pytest.raises(ValueError, match="boxes must be 2-D"):
        ltkernels.roi_align(x, rois[0], 2)
    with pytest.raises(ValueError, match=r"boxes\[1\] must have shape \[L, 4\]"):
        ltkernels.roi_align(x, [rois[:, 1:], rois], 2)
    with pytest.raises(ValueError, match="list of 3 tensors"):
        ltkernels.roi_align(x, [rois[:, 1:]] * 3, 2)
    with pytest.raises(TypeError, match="boxes must have dtype"):
        ltkernels.roi_align(x, rois.long(), 2)
    with pytest.raises(TypeError, match="boxes must be a Tensor"):
        ltkernels.roi_align(x, "boxes", 2)
    with pytest.raises(ValueError, match="boxes is on meta"):
        ltkernels.roi_align(x, rois.to("meta"), 2)
    for bad_index in (-1.0, 2.0, 0.5):
        r = rois.clone()
        r[1, 0] = bad_index
        with pytest.raises(ValueError, match=r"batch index .* \[0, 1\]"):
            ltkernels.roi_align(x, r, 2)
    r = rois.clone()
    r[0, 3] = float("nan")
    with pytest.raises(ValueError, match="boxes contains NaN"):
        ltkernels.roi_align(x, r, 2)
    with pytest.raises(ValueError, match="boxes contains NaN"):
        ltkernels.roi_align(x, [r[:, 1:]], 2)
    for size in (0, -1, (2, 0)):
        with pytest.raises(ValueError, match="output_size must be positive"):
            ltkernels.roi_align(x, rois, size)
    with pytest.raises(TypeError, match="output_size"):
        ltkernels.roi_align(x, rois, (2, 2, 2))
    with pytest.raises(TypeError, match="sampling_ratio"):
        ltkernels.roi_align(x, rois, 2, 1.0, 2.5)
    with pytest.raises(ValueError, match="spatial_scale"):
        ltkernels.roi_align(x, rois, 2, 0.0)
    # the kernel itself refuses what the Python layer would have caught
    with pytest.raises(RuntimeError, match="batch index"):
        torch.ops.ltkernels.roi_align(x, torch.tensor([[5.0, 1, 1, 4, 4]]), 1.0, 2, 2, 2, True)
    with pytest.raises(RuntimeError, match=r"rois must have shape \[K, 5\]"):
        torch.ops.ltkernels.roi_align(x, rois[:, 1:], 1.0, 2, 2, 2, True)


# ---- CUDA ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_cuda_matches_cpu(cuda_side, dtype, aligned, sampling_ratio):
    x = torch.randn(2, 5, 23, 19).to(dtype)
    rois = make_boxes(30, 2, 23, 19, scale=0.5, dtype=torch.float32)
    args = ((3, 4), 0.5, sampling_ratio, aligned)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype in (torch.float32, torch.float64) else dict(rtol=2e-2, atol=2e-2)
    out_cpu = ltkernels.roi_align(x, rois, *args)
    with cuda_side:
        out_gpu = ltkernels.roi_align(cuda_side.put(x), cuda_side.put(rois), *args)
    assert out_gpu.dtype == dtype
    torch.testing.assert_close(out_gpu.cpu().float(), out_cpu.float(), **tol)
    g = torch.randn(30, 5, 3, 4).to(dtype)
    xc = x.clone().requires_grad_()
    ltkernels.roi_align(xc, rois, *args).backward(g)
    for deterministic in (False, True):
        xg = cuda_side.put(x).requires_grad_()
        with torch.autograd.set_grad_enabled(True), cuda_side:
            torch.use_deterministic_algorithms(deterministic)
            try:
                ltkernels.roi_align(xg, cuda_side.put(rois), *args).backward(cuda_side.put(g))
            finally:
                torch.use_deterministic_algorithms(False)
        torch.testing.assert_close(xg.grad.cpu().float(), xc.grad.float(), **tol)


@pytest.mark.parametrize("device", cuda_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_deterministic_backward_is_bitwise_reproducible(device, dtype):
    n, c, h, w = (2, 4, 20, 25) if device == "cpu" else (2, 16, 40, 50)  # smaller under the emulation
    k = 60 if device == "cpu" else 500
    x = torch.randn(n, c, h, w, device=device).to(dtype).requires_grad_()
    rois = make_boxes(k, n, h, w, scale=1 / 8, dtype=torch.float32, device=device)
    g = torch.randn(k, c, 7, 7, device=device).to(dtype)
    grads = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(3):
            x.grad = None
            ltkernels.roi_align(x, rois, 7, 1 / 8, 2, True).backward(g)
            grads.append(x.grad.clone())
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])
    x.grad = None
    ltkernels.roi_align(x, rois, 7, 1 / 8, 2, True).backward(g)  # atomic version
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grads[0].float(), x.grad.float(), **tol)


@pytest.mark.parametrize("device", cuda_devices())
def test_cuda_matches_torchvision_and_reference(device):
    x = torch.randn(2, 4, 17, 21, dtype=torch.float64, device=device)
    rois = make_boxes(12, 2, 17, 21, dtype=torch.float64, device=device)
    for aligned in (False, True):
        for sr in (-1, 0, 3):
            ref = roi_align_reference(x, rois, (2, 5), 1.0, sr, aligned)
            torch.testing.assert_close(ltkernels.roi_align(x, rois, (2, 5), 1.0, sr, aligned), ref,
                                       rtol=1e-12, atol=1e-12)
    x32 = x.float().requires_grad_()
    tv_x = x.float().requires_grad_()
    out = ltkernels.roi_align(x32, rois.float(), 3, 1.0, 2, True)
    tv = torchvision.ops.roi_align(tv_x, rois.float(), 3, 1.0, 2, True)
    torch.testing.assert_close(out, tv)
    g = torch.randn_like(out)
    out.backward(g)
    tv.backward(g)
    torch.testing.assert_close(x32.grad, tv_x.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", cuda_devices())
def test_cuda_empty_and_gradcheck(device):
    x = torch.randn(2, 3, 8, 8, device=device, dtype=torch.float64, requires_grad=True)
    empty = ltkernels.roi_align(x, torch.zeros(0, 5, device=device, dtype=torch.float64), 2)
    assert empty.shape == (0, 3, 2, 2)
    empty.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert ltkernels.roi_align(torch.randn(1, 0, 5, 5, device=device),
                               torch.tensor([[0, 1.0, 1, 4, 4]], device=device), 2).shape == (1, 0, 2, 2)
    rois = make_boxes(5, 2, 8, 8, device=device)
    for det in (False, True):
        torch.use_deterministic_algorithms(det)
        try:
            assert torch.autograd.gradcheck(lambda t: ltkernels.roi_align(t, rois, 2, 1.0, -1, True), (x,),
                                            fast_mode=True)
        finally:
            torch.use_deterministic_algorithms(False)
    bad = rois.clone()
    bad[0, 0] = 7
    with pytest.raises(ValueError, match="batch index"):
        ltkernels.roi_align(x, bad, 2)


@pytest.mark.cuda
@pytest.mark.gpu
def test_cuda_opcheck_and_devices():
    x = torch.randn(2, 3, 8, 8, device="cuda", dtype=torch.float64, requires_grad=True)
    rois = make_boxes(5, 2, 8, 8, device="cuda")
    torch.library.opcheck(torch.ops.ltkernels.roi_align.default, (x, rois, 1.0, 2, 3, 2, True))
    with pytest.raises(ValueError, match="boxes is on cpu"):
        ltkernels.roi_align(x, rois.cpu(), 2)


@pytest.mark.cuda
def test_cuda_deterministic_backward_bitwise_identical_in_every_order():
    """The gather backward sums in a fixed order per pixel: bit-identical in every thread order and SM count."""
    if not EMULATION:
        pytest.skip("this build has no CUDA emulation")
    x = torch.randn(2, 3, 12, 15)
    rois = make_boxes(20, 2, 12, 15, scale=0.5, dtype=torch.float32)
    g = torch.randn(20, 3, 4, 4)
    grads = []
    torch.use_deterministic_algorithms(True)
    try:
        for order in emulation.ORDERS:
            for sms in (2, 132):
                with emulation.cuda_emulation(order=order, seed=7, sms=sms):
                    xe = x.clone().requires_grad_()
                    out = ltkernels.roi_align(xe, rois, 4, 0.5, -1, True)
                    out.backward(g)
                grads.append((out, xe.grad))
    finally:
        torch.use_deterministic_algorithms(False)
    for out, grad in grads[1:]:
        assert torch.equal(out, grads[0][0]) and torch.equal(grad, grads[0][1])
