import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

import ltkernels
from ltkernels.reference.paste_masks import expanded_int_boxes, paste_masks_reference

from conftest import devices


def make_boxes(k, h, w, dtype=torch.float32, outside=True, tiny=True):
    """Random (x1, y1, x2, y2) on an h x w image: some stick out of it, some are a pixel or less, one inverted."""
    lo, hi = (-0.3, 0.95) if outside else (0.0, 0.8)
    x1 = torch.empty(k, dtype=torch.float64).uniform_(lo, hi) * w
    y1 = torch.empty(k, dtype=torch.float64).uniform_(lo, hi) * h
    bw = torch.empty(k, dtype=torch.float64).uniform_(0.05, 0.7) * w
    bh = torch.empty(k, dtype=torch.float64).uniform_(0.05, 0.7) * h
    boxes = torch.stack([x1, y1, x1 + bw, y1 + bh], dim=1)
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], torch.tensor([2.0, 2.0], dtype=torch.float64))  # partly inside
    boxes[:, :2] = torch.minimum(boxes[:, :2], torch.tensor([w - 3.0, h - 3.0], dtype=torch.float64))
    if not outside:
        boxes[:, 2].clamp_(max=w - 1)
        boxes[:, 3].clamp_(max=h - 1)
    if tiny and k >= 4:
        boxes[0] = torch.tensor([3.2, 4.7, 3.6, 5.1])  # under a pixel
        boxes[1] = torch.tensor([5.0, 2.0, 5.0, 2.0])  # zero size
        boxes[2] = torch.tensor([6.0, 6.0, 4.0, 3.0])  # inverted
        boxes[3] = torch.tensor([0.0, 0.0, w - 1.0, h - 1.0])  # the whole image
    return boxes.to(dtype)


def torchvision_probabilities(masks, boxes, size):
    return paste_masks_in_image(masks[:, None], boxes, size)[:, 0]


def assert_thresholded(out, prob, threshold, margin):
    """out == prob > threshold, except where prob lies within `margin` of the threshold (rounding differences of
    the interpolation; the count of such pixels must stay tiny)."""
    assert out.dtype == torch.bool and out.shape == prob.shape
    expected = prob > threshold
    differ = out.cpu() != expected.cpu()
    near = (prob.cpu().double() - threshold).abs() <= margin
    assert not (differ & ~near).any(), f"{int((differ & ~near).sum())} pixels differ away from the threshold"
    assert int(differ.sum()) <= max(2, out.numel() // 10000)


# ---- against torchvision and the float64 reference -----------------------------------------------------------
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [1, 7, 28])
@pytest.mark.parametrize("threshold", [0.5, 0.2])
def test_matches_torchvision(device, dtype, m, threshold):
    h, w = 37, 45
    k = 10
    masks = torch.rand(k, m, m, dtype=dtype)
    boxes = make_boxes(k, h, w, dtype=dtype)
    prob = torchvision_probabilities(masks, boxes, (h, w))
    out = ltkernels.paste_masks(masks.to(device), boxes.to(device), (h, w), threshold)
    assert out.device.type == torch.device(device).type
    assert_thresholded(out.cpu(), prob, threshold, 1e-6 if dtype == torch.float32 else 1e-12)
    assert out.any() and not out.all()  # the comparison is not trivial


def test_reference_matches_torchvision_probabilities():
    for m, (h, w) in [(28, (50, 61)), (5, (20, 17)), (1, (9, 9))]:
        masks = torch.rand(12, m, m, dtype=torch.float64)
        boxes = make_boxes(12, h, w, dtype=torch.float64)
        ref = paste_masks_reference(masks, boxes, (h, w), threshold=None)
        torch.testing.assert_close(ref, torchvision_probabilities(masks, boxes, (h, w)), rtol=0, atol=1e-12)
        boxes32 = boxes.float()  # widened and truncated in float32, as torchvision does for float32 boxes
        ref32 = paste_masks_reference(masks.float(), boxes32, (h, w), threshold=None)
        torch.testing.assert_close(ref32.float(), torchvision_probabilities(masks.float(), boxes32, (h, w)),
                                   rtol=0, atol=5e-6)  # float32 weights


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_matches_reference(device, dtype):
    h, w = 33, 40
    masks = torch.rand(9, 14, 14).to(dtype)
    boxes = make_boxes(9, h, w, dtype=torch.float32)
    ref = paste_masks_reference(masks, boxes, (h, w), threshold=None)
    out = ltkernels.paste_masks(masks.to(device), boxes.to(device), (h, w), 0.5)
    assert_thresholded(out.cpu(), ref, 0.5, 1e-5 if dtype != torch.float64 else 1e-12)


def test_box_rounding_follows_torchvision():
    # centres on half pixels and widths whose widening lands on integers: the truncation toward zero decides
    boxes = torch.tensor([[-0.75, -0.25, 3.25, 2.75], [10.5, 11.5, 12.5, 13.5], [-3.9, 1.0, -0.1, 4.0]])
    ib = expanded_int_boxes(boxes, 28)
    scale = 30 / 28
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    assert torch.equal(ib[:, 0], (x_c - w_half).to(torch.int64))
    masks = torch.rand(3, 28, 28)
    prob = torchvision_probabilities(masks, boxes, (20, 20))
    assert_thresholded(ltkernels.paste_masks(masks, boxes, (20, 20)), prob, 0.5, 1e-6)


@pytest.mark.parametrize("device", devices())
def test_boxes_outside_the_image_paste_nothing(device):
    h, w = 20, 30
    masks = torch.ones(4, 6, 6)
    boxes = torch.tensor([[-50.0, 2.0, -20.0, 10.0],  # left of the image
                          [3.0, -40.0, 9.0, -15.0],  # above it
                          [35.0, 2.0, 60.0, 10.0],  # right of it
                          [3.0, 25.0, 9.0, 40.0]])  # below it
    out = ltkernels.paste_masks(masks.to(device), boxes.to(device), (h, w))
    assert out.shape == (4, h, w) and not out.any()
    assert torch.equal(out.cpu(), paste_masks_reference(masks, boxes, (h, w)))


def test_torchvision_fails_on_a_box_left_of_the_image():
    # the one stated difference: torchvision's slice end turns negative and the copy does not fit
    masks = torch.ones(1, 6, 6)
    boxes = torch.tensor([[-50.0, 2.0, -20.0, 10.0]])
    with pytest.raises(RuntimeError):
        paste_masks_in_image(masks[:, None], boxes, (20, 30))
    assert not ltkernels.paste_masks(masks, boxes, (20, 30)).any()


@pytest.mark.parametrize("device", devices())
def test_negative_threshold_marks_the_background(device):
    masks = torch.rand(3, 5, 5)
    boxes = make_boxes(3, 16, 18, outside=False, tiny=False)
    prob = torchvision_probabilities(masks, boxes, (16, 18))
    out = ltkernels.paste_masks(masks.to(device), boxes.to(device), (16, 18), -0.1)
    assert_thresholded(out.cpu(), prob, -0.1, 1e-6)
    assert out.all(dim=0).any()


def test_huge_boxes_are_defined():
    masks = torch.rand(2, 28, 28)
    boxes = torch.tensor([[-1e30, -1e30, 1e30, 1e30], [-5e3, -5e3, 5e3, 5e3]])
    out = ltkernels.paste_masks(masks, boxes, (10, 12))
    assert torch.equal(out, paste_masks_reference(masks, boxes, (10, 12)))
    prob = torchvision_probabilities(masks[1:], boxes[1:], (10, 12))
    assert_thresholded(out[1:], prob, 0.5, 1e-6)


# ---- empty and bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
def test_empty_results(device):
    masks, boxes = torch.rand(0, 28, 28, device=device), torch.zeros(0, 4, device=device)
    assert ltkernels.paste_masks(masks, boxes, (8, 9)).shape == (0, 8, 9)
    m3, b3 = torch.rand(3, 28, 28, device=device), make_boxes(3, 8, 9).to(device)
    for size in [(0, 9), (8, 0), (0, 0)]:
        out = ltkernels.paste_masks(m3, b3, size)
        assert out.shape == (3, *size) and out.dtype == torch.bool
    assert list(ltkernels.paste_masks_chunks(masks, boxes, (8, 9))) == []


@pytest.mark.parametrize("device", devices())
def test_bad_input(device):
    masks = torch.rand(3, 7, 7, device=device)
    boxes = make_boxes(3, 10, 10).to(device)
    with pytest.raises(ValueError, match="same number of masks"):
        ltkernels.paste_masks(masks, boxes[:2], (10, 10))
    with pytest.raises(ValueError, match="square"):
        ltkernels.paste_masks(masks[:, :5], boxes, (10, 10))
    with pytest.raises(ValueError, match="at least 1 x 1"):
        ltkernels.paste_masks(masks[:, :0, :0], boxes, (10, 10))
    with pytest.raises(ValueError, match="non-negative"):
        ltkernels.paste_masks(masks, boxes, (-1, 10))
    with pytest.raises(TypeError, match="image_size"):
        ltkernels.paste_masks(masks, boxes, (10.0, 10))
    with pytest.raises(TypeError, match="dtype"):
        ltkernels.paste_masks(masks.to(torch.int32), boxes, (10, 10))
    with pytest.raises(ValueError, match="NaN"):
        ltkernels.paste_masks(masks, boxes, (10, 10), float("nan"))
    for bad in (float("nan"), float("inf"), -float("inf")):
        b = boxes.clone()
        b[1, 2] = bad
        with pytest.raises(ValueError, match="finite"):
            ltkernels.paste_masks(masks, b, (10, 10))
        with pytest.raises(ValueError, match="finite"):  # the kernels check it for direct callers too
            torch.ops.ltkernels.paste_masks(masks, b, 10, 10, 0.5)
    with pytest.raises(ValueError, match="same number of masks"):
        torch.ops.ltkernels.paste_masks(masks, boxes[:2], 10, 10, 0.5)
    with pytest.raises(TypeError, match="bool"):
        ltkernels.paste_masks(masks, boxes, (10, 10), out=torch.empty(3, 10, 10, device=device))
    with pytest.raises(ValueError, match="shape"):
        ltkernels.paste_masks(masks, boxes, (10, 10), out=torch.empty(3, 10, 11, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="contiguous"):
        ltkernels.paste_masks(masks, boxes, (10, 10),
                              out=torch.empty(3, 10, 20, dtype=torch.bool, device=device)[:, :, ::2])
    with pytest.raises(ValueError, match="chunk_size"):
        next(ltkernels.paste_masks_chunks(masks, boxes, (10, 10), chunk_size=0))


# ---- buffers and chunks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("w", [24, 23])  # whole 32-bit words per row, or single bytes (CUDA kernel)
def test_out_and_chunks_equal_the_full_result(device, w):
    h, k = 19, 11
    masks = torch.rand(k, 9, 9, device=device)
    boxes = make_boxes(k, h, w).to(device)
    full = ltkernels.paste_masks(masks, boxes, (h, w))
    buffer = torch.ones(k + 1, h, w, dtype=torch.bool, device=device)  # poisoned; a slice at an odd offset
    got = ltkernels.paste_masks(masks, boxes, (h, w), out=buffer[1:])
    assert got.data_ptr() == buffer[1:].data_ptr()
    assert torch.equal(buffer[1:], full) and buffer[0].all()
    chunks = []
    pointers = set()
    for start, chunk in ltkernels.paste_masks_chunks(masks, boxes, (h, w), chunk_size=4):
        assert chunk.shape == (min(4, k - start), h, w)
        pointers.add(chunk.data_ptr())
        chunks.append(chunk.clone())
    assert len(pointers) == 1  # one buffer, reused
    assert torch.equal(torch.cat(chunks), full)
    kept = [c for _, c in ltkernels.paste_masks_chunks(masks, boxes, (h, w), chunk_size=4, reuse_buffer=False)]
    assert torch.equal(torch.cat(kept), full)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_matches_cpu(cuda_side, dtype):
    h, w = 41, 52
    masks = torch.rand(14, 28, 28).to(dtype)
    boxes = make_boxes(14, h, w)
    out_cpu = ltkernels.paste_masks(masks, boxes, (h, w))
    with cuda_side:
        out_gpu = ltkernels.paste_masks(cuda_side.put(masks), cuda_side.put(boxes), (h, w))
    ref = paste_masks_reference(masks, boxes, (h, w), threshold=None)
    if cuda_side.emulated:
        assert torch.equal(out_gpu.cpu(), out_cpu)  # the same formulas, compiled without contraction
    else:
        assert_thresholded(out_gpu.cpu(), ref, 0.5, 1e-5)  # nvcc fuses multiply-adds


# ---- torch.library / torch.compile -----------------------------------------------------------------------------
def test_opcheck():
    masks = torch.rand(5, 7, 7)
    boxes = make_boxes(5, 12, 13)
    torch.library.opcheck(torch.ops.ltkernels.paste_masks.default, (masks, boxes, 12, 13, 0.5))
    out = torch.empty(5, 12, 13, dtype=torch.bool)
    torch.library.opcheck(torch.ops.ltkernels.paste_masks_into.default, (masks, boxes, 0.5, out))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    masks = torch.randn(6, 10, 10)
    boxes = make_boxes(6, 21, 25)

    def fn(logits, b):
        pasted = ltkernels.paste_masks(logits.sigmoid(), b, (21, 25), 0.5)
        return pasted, pasted.sum(dim=(1, 2))

    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    got, got_area = compiled(masks, boxes)
    want, want_area = fn(masks, boxes)
    assert torch.equal(got, want) and torch.equal(got_area, want_area)

    def into(probs, b, out):
        ltkernels.paste_masks(probs, b, (21, 25), out=out)
        return out.sum()

    buf_c = torch.zeros(6, 21, 25, dtype=torch.bool)
    buf_e = torch.zeros(6, 21, 25, dtype=torch.bool)
    total = torch.compile(into, backend=backend, fullgraph=True)(masks.sigmoid(), boxes, buf_c)
    assert torch.equal(total, into(masks.sigmoid(), boxes, buf_e)) and torch.equal(buf_c, buf_e)
