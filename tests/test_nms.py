"""nms / batched_nms against torchvision, multiclass_nms against docs/spec.md's pipeline (candidates -> torchvision
batched_nms -> first K) at LVIS scale, the batched form, bad input, opcheck and torch.compile."""
import contextlib
import math

import pytest
import torch
import torchvision
from torchvision.ops.boxes import _batched_nms_vanilla

import ltkernels
from ltkernels.reference.nms import (
    batched_nms_reference,
    multiclass_nms_reference,
    nms_reference,
    torchvision_multiclass_nms,
)

from conftest import devices

SIZES = [0, 1, 63, 64, 65, 1000, 5000]


def random_boxes(n, dtype=torch.float32, extent=500.0, max_size=100.0, device="cpu"):
    xy = torch.rand(n, 2, dtype=torch.float64) * extent
    wh = torch.rand(n, 2, dtype=torch.float64) * max_size + 1
    return torch.cat([xy, xy + wh], 1).to(dtype=dtype, device=device)


def distinct_scores(n, dtype=torch.float32, device="cpu"):
    """Tie-free scores (torchvision's sort leaves the order of equal scores unspecified)."""
    return ((torch.randperm(n, dtype=torch.float64) + 1) / (n + 1)).to(dtype=dtype, device=device)


@contextlib.contextmanager
def one_thread():
    # torchvision's per-class loop of small ops crawls when its threads are oversubscribed (shared CI machines).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def lvis_inputs(n=1000, c=1230, class_specific=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([1233.0, 700.0], dtype=torch.float64)
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 100 + 4
    base = torch.cat([xy, xy + wh], 1)
    if class_specific:
        boxes = base[:, None, :] + torch.randn(n, c, 4, generator=g, dtype=torch.float64) * 4
    else:
        boxes = base
    scores = (torch.randn(n, c, generator=g, dtype=torch.float64) * 3).softmax(1)
    return boxes.to(dtype), scores.to(dtype)


def assert_same(result, expected):
    assert len(result) == len(expected)
    for r, e in zip(result, expected):
        assert r.dtype == e.dtype and r.shape == e.shape, (r.dtype, e.dtype, r.shape, e.shape)
        torch.testing.assert_close(r, e, rtol=0, atol=0)


# ---- nms / batched_nms --------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nms_matches_torchvision(n, dtype):
    boxes, scores = random_boxes(n, dtype), distinct_scores(n, dtype)
    for thr in (0.3, 0.5, 0.7):
        expected = torchvision.ops.nms(boxes, scores, thr)
        keep = ltkernels.nms(boxes, scores, thr)
        assert keep.dtype == torch.int64
        assert torch.equal(keep, expected)
    if n <= 1000:
        assert torch.equal(ltkernels.nms(boxes, scores, 0.5), nms_reference(boxes, scores, 0.5))


@pytest.mark.parametrize("n", SIZES)
def test_batched_nms_matches_torchvision(n):
    boxes, scores = random_boxes(n), distinct_scores(n)
    for num_classes in (1, 10, 1000):
        idxs = torch.randint(0, num_classes, (n,))
        keep = ltkernels.batched_nms(boxes, scores, idxs, 0.5)
        assert torch.equal(keep, _batched_nms_vanilla(boxes, scores, idxs, 0.5))  # exact per-class NMS
        if num_classes <= 10:  # torchvision's offset trick (n <= 1000) loses float32 precision at many classes
            assert torch.equal(keep, torchvision.ops.batched_nms(boxes, scores, idxs, 0.5))


def _float_iou(a, b):
    """IoU with torchvision's CPU arithmetic in float32."""
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    w = (torch.minimum(a[2], b[2]) - torch.maximum(a[0], b[0])).clamp(min=0)
    h = (torch.minimum(a[3], b[3]) - torch.maximum(a[1], b[1])).clamp(min=0)
    inter = w * h
    return inter / (area_a + area_b - inter)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nms_pairs_at_threshold(dtype):
    # Exactly representable: IoU(A, B) = 2 / 4 = 0.5 -> kept at threshold 0.5, suppressed just below it.
    a = torch.tensor([0.0, 0.0, 3.0, 1.0], dtype=dtype)
    b = torch.tensor([1.0, 0.0, 4.0, 1.0], dtype=dtype)
    boxes, scores = torch.stack([a, b]), torch.tensor([0.9, 0.8], dtype=dtype)
    assert ltkernels.nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert ltkernels.nms(boxes, scores, 0.4999999).tolist() == [0]
    # Random pairs, thresholds placed exactly at the computed IoU (kept) and at the value just below (suppressed),
    # including thresholds that float32 cannot represent (the comparison is done in float64, like torchvision).
    n = 200
    first = random_boxes(n, dtype, max_size=50)
    second = first + torch.randn(n, 4, dtype=torch.float64).to(dtype) * 5
    second[:, 2:] = torch.maximum(second[:, 2:], second[:, :2] + 1)
    for i in range(0, n, 10):
        pair = torch.stack([first[i], second[i]])
        iou = float(_float_iou(pair[0], pair[1]))
        sc = torch.tensor([0.9, 0.8], dtype=dtype)
        below, above = (math.nextafter(iou, 0.0), math.nextafter(iou, 1.0))
        for thr in (iou, below, above, round(iou, 3)):
            assert torch.equal(ltkernels.nms(pair, sc, thr), torchvision.ops.nms(pair, sc, thr)), (i, thr)
        assert ltkernels.nms(pair, sc, iou).tolist() == [0, 1]  # exactly at the threshold: kept
        if iou > 0:
            assert ltkernels.nms(pair, sc, below).tolist() == [0]  # just above the threshold: suppressed
    # Many boxes at the threshold at once, against torchvision.
    boxes = torch.cat([first, second])
    scores = distinct_scores(2 * n, dtype)
    thr = float(_float_iou(first[0], second[0]))
    assert torch.equal(ltkernels.nms(boxes, scores, thr), torchvision.ops.nms(boxes, scores, thr))
    idxs = torch.randint(0, 3, (2 * n,))
    assert torch.equal(ltkernels.batched_nms(boxes, scores, idxs, thr),
                       _batched_nms_vanilla(boxes, scores, idxs, thr))


def test_nms_degenerate_and_duplicates():
    boxes = random_boxes(300)
    boxes[::7, 2] = boxes[::7, 0]  # zero width
    boxes[::11, 3] = boxes[::11, 1]  # zero height
    boxes[::13] = boxes[::13, :1].repeat(1, 4)  # points
    boxes[1::5] = boxes[0::5][: boxes[1::5].shape[0]]  # duplicates of other boxes
    boxes = torch.cat([boxes, boxes[:50]])  # more exact duplicates
    scores = distinct_scores(boxes.shape[0])
    for thr in (0.0, 0.5, 1.0):
        assert torch.equal(ltkernels.nms(boxes, scores, thr), torchvision.ops.nms(boxes, scores, thr))
        idxs = torch.randint(0, 4, (boxes.shape[0],))
        assert torch.equal(ltkernels.batched_nms(boxes, scores, idxs, thr),
                           _batched_nms_vanilla(boxes, scores, idxs, thr))
    # Inverted boxes (x2 < x1): negative areas, computed with torchvision's arithmetic.
    inv = random_boxes(200)[:, [2, 3, 0, 1]]
    sc = distinct_scores(200)
    assert torch.equal(ltkernels.nms(inv, sc, 0.5), torchvision.ops.nms(inv, sc, 0.5))


def test_nms_ties_stable():
    """Equal scores: the lower index comes first (a stable descending sort)."""
    boxes = random_boxes(500, extent=100)
    scores = torch.randint(0, 5, (500,)).float()
    assert torch.equal(ltkernels.nms(boxes, scores, 0.5), nms_reference(boxes, scores, 0.5))
    idxs = torch.randint(0, 7, (500,))
    assert torch.equal(ltkernels.batched_nms(boxes, scores, idxs, 0.5),
                       batched_nms_reference(boxes, scores, idxs, 0.5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nms_low_precision_as_float32(dtype):
    boxes, scores = random_boxes(1000, dtype), distinct_scores(1000, dtype)
    # Equal low-precision scores are possible: the float32 reference breaks ties the same way (lower index).
    expected = nms_reference(boxes.float(), scores.float(), 0.5)
    assert torch.equal(ltkernels.nms(boxes, scores, 0.5), expected)
    idxs = torch.randint(0, 10, (1000,))
    assert torch.equal(ltkernels.batched_nms(boxes, scores, idxs, 0.5),
                       batched_nms_reference(boxes.float(), scores.float(), idxs, 0.5))


def test_nms_non_contiguous_and_int32_idxs():
    boxes = random_boxes(400).t().contiguous().t()
    scores = distinct_scores(800)[::2]
    idxs = torch.randint(0, 5, (400,), dtype=torch.int32)
    assert not boxes.is_contiguous() and not scores.is_contiguous()
    assert torch.equal(ltkernels.nms(boxes, scores, 0.5), torchvision.ops.nms(boxes, scores, 0.5))
    assert torch.equal(ltkernels.batched_nms(boxes, scores, idxs, 0.5),
                       torchvision.ops.batched_nms(boxes, scores, idxs.long(), 0.5))


@pytest.mark.parametrize("n", SIZES + [20000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_nms_cuda_matches_cpu(cuda_side, n, dtype):
    if cuda_side.emulated and n > 1000:
        pytest.skip("the emulated cost grows with blocks x threads: the sizes up to 1000 cover every tile case")
    boxes, scores = random_boxes(n, dtype), distinct_scores(n, dtype)
    idxs = torch.randint(0, 50, (n,))
    for thr in (0.5, 0.7):
        cpu = ltkernels.nms(boxes, scores, thr)
        cpu_b = ltkernels.batched_nms(boxes, scores, idxs, thr)
        with cuda_side:
            got = ltkernels.nms(cuda_side.put(boxes), cuda_side.put(scores), thr)
            got_b = ltkernels.batched_nms(cuda_side.put(boxes), cuda_side.put(scores), cuda_side.put(idxs), thr)
        assert torch.equal(got.cpu(), cpu)
        if dtype != torch.float16:
            assert torch.equal(cpu, torchvision.ops.nms(boxes, scores, thr))
        assert torch.equal(got_b.cpu(), cpu_b)


def test_nms_cuda_threshold_pairs_and_ties(cuda_side):
    first = random_boxes(300, max_size=50)
    second = first + torch.randn(300, 4).float() * 5
    boxes = torch.cat([first, second])
    scores = torch.randint(0, 20, (600,)).float()  # many ties: the stable rule on both devices
    idxs = torch.randint(0, 3, (600,))
    thr = float(_float_iou(first[0], second[0]))
    with cuda_side:
        got = ltkernels.nms(cuda_side.put(boxes), cuda_side.put(scores), thr)
        got_b = ltkernels.batched_nms(cuda_side.put(boxes), cuda_side.put(scores), cuda_side.put(idxs), thr)
    assert torch.equal(got.cpu(), ltkernels.nms(boxes, scores, thr))
    assert torch.equal(got_b.cpu(), ltkernels.batched_nms(boxes, scores, idxs, thr))


def test_segmented_nms_cuda_many_small_and_one_large_class(cuda_side):
    """Segments of 1..3 boxes next to one class larger than a block (the walk's segment bounds and its strided
    kept list), and a class whose boxes are all identical."""
    n = 700
    boxes = random_boxes(n, max_size=60)
    boxes[600:] = boxes[600]  # class 1: 100 copies of one box
    idxs = torch.cat([torch.zeros(300, dtype=torch.int64), torch.arange(300) // 3 + 2,
                      torch.ones(100, dtype=torch.int64)])
    scores = distinct_scores(n)
    cpu = ltkernels.batched_nms(boxes, scores, idxs, 0.3)
    with cuda_side:
        got = ltkernels.batched_nms(cuda_side.put(boxes), cuda_side.put(scores), cuda_side.put(idxs), 0.3)
    assert torch.equal(got.cpu(), cpu)
    assert torch.equal(cpu, torchvision.ops.batched_nms(boxes, scores, idxs, 0.3))


# ---- multiclass_nms ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("class_specific", [True, False], ids=["class_specific", "shared"])
def test_multiclass_nms_lvis_scale_matches_torchvision_pipeline(class_specific):
    boxes, scores = lvis_inputs(class_specific=class_specific)
    result = ltkernels.multiclass_nms(boxes, scores, 1e-4, 0.5, 300)
    with one_thread():
        expected = torchvision_multiclass_nms(boxes, scores, 1e-4, 0.5, 300)
    assert result[0].shape == (300, 4)
    assert_same(result, expected)
    assert int(result[2].min()) >= 1 and int(result[2].max()) <= 1230


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_multiclass_nms_dtypes(dtype):
    boxes, scores = lvis_inputs(n=100, c=50, dtype=dtype, seed=1)
    result = ltkernels.multiclass_nms(boxes, scores, 1e-3, 0.6, 100)
    if dtype == torch.float16:  # torchvision's CPU nms has no float16: the pipeline on float32 copies
        expected = multiclass_nms_reference(boxes.float(), scores.float(), 1e-3, 0.6, 100)
        expected = (expected[0].to(dtype), expected[1].to(dtype), expected[2], expected[3])
    else:
        expected = torchvision_multiclass_nms(boxes, scores, 1e-3, 0.6, 100)
    assert_same(result, expected)


def test_multiclass_nms_no_candidates_and_few_survivors():
    boxes, scores = lvis_inputs(n=50, c=20)
    empty = ltkernels.multiclass_nms(boxes, scores, 1.0, 0.5, 300)
    assert [t.shape for t in empty] == [(0, 4), (0,), (0,), (0,)]
    assert empty[2].dtype == torch.int64 and empty[3].dtype == torch.int64
    # Fewer than K survivors: everything that survives, in score order.
    result = ltkernels.multiclass_nms(boxes, scores, 0.05, 0.5, 300)
    expected = torchvision_multiclass_nms(boxes, scores, 0.05, 0.5, 300)
    assert 0 < result[0].shape[0] < 300
    assert_same(result, expected)
    # No limit.
    assert_same(ltkernels.multiclass_nms(boxes, scores, 1e-4, 0.5, None),
                 torchvision_multiclass_nms(boxes, scores, 1e-4, 0.5, None))
    # No rows at all.
    none = ltkernels.multiclass_nms(boxes[:0], scores[:0])
    assert [t.shape for t in none] == [(0, 4), (0,), (0,), (0,)]


def test_multiclass_nms_ties_follow_candidate_order():
    boxes, scores = lvis_inputs(n=200, c=30, class_specific=True)
    scores = (scores * 20).round() / 20  # many exact ties
    assert_same(ltkernels.multiclass_nms(boxes, scores, 0.0, 0.5, 100),
                multiclass_nms_reference(boxes, scores, 0.0, 0.5, 100))


def test_multiclass_nms_deep_walk_over_many_bands():
    """Heavy suppression: the walk needs nearly every candidate, far more than the first band the score sample picks
    (images of >= 65536 scores gather candidates band by band)."""
    g = torch.Generator().manual_seed(3)
    n, c = 400, 200
    base = torch.tensor([100.0, 100.0, 180.0, 160.0])
    boxes = base + torch.rand(n, c, 4, generator=g) * 3  # per class: every row's box overlaps every other's
    scores = torch.rand(n, c, generator=g)
    with one_thread():
        assert_same(ltkernels.multiclass_nms(boxes, scores, 0.0, 0.5, 300),
                    torchvision_multiclass_nms(boxes, scores, 0.0, 0.5, 300))
        assert_same(ltkernels.multiclass_nms(boxes, scores, 0.0, 0.5, None),
                    torchvision_multiclass_nms(boxes, scores, 0.0, 0.5, None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_multiclass_nms_signed_scores_zeros_and_sparse_tops(dtype):
    """Scores of any sign (raw logits) with +0 and -0 among them, thresholds 0 and -0, and a few high scores the
    sample of a large image misses: the same detections as the reference pipeline."""
    g = torch.Generator().manual_seed(4)
    up = (lambda t: t) if dtype == torch.float64 else (lambda t: t.float())  # ties: the reference's candidate order
    n, c = 300, 250
    boxes, _ = lvis_inputs(n=n, c=c, seed=4, dtype=dtype)  # the pipeline runs on float32 copies (float16 too)
    scores = torch.randn(n, c, generator=g) * 2
    scores[torch.rand(n, c, generator=g) < 0.2] = 0.0
    scores[torch.rand(n, c, generator=g) < 0.2] = -0.0
    logits = scores.to(dtype)
    for thr in (0.0, -0.0):
        expected = multiclass_nms_reference(up(boxes), up(logits), thr, 0.5, 300)
        got = ltkernels.multiclass_nms(boxes, logits, thr, 0.5, 300)
        assert torch.equal(got[2], expected[2]) and torch.equal(got[3], expected[3])
    sparse = torch.full((n, c), -5.0, dtype=dtype)
    flat = torch.randperm(n * c, generator=g)[:40]
    sparse.view(-1)[flat] = torch.linspace(1, 2, 40).to(dtype)
    got = ltkernels.multiclass_nms(boxes, sparse, 0.0, 0.5, 300)
    expected = multiclass_nms_reference(up(boxes), up(sparse), 0.0, 0.5, 300)
    assert got[0].shape[0] == 40 and torch.equal(got[3], expected[3]) and torch.equal(got[2], expected[2])


@pytest.mark.parametrize("class_specific", [True, False], ids=["class_specific", "shared"])
def test_batched_multiclass_nms_equals_per_image(class_specific):
    images = [lvis_inputs(n=n, c=200, class_specific=class_specific, seed=i) for i, n in enumerate([150, 0, 90, 120])]
    boxes, scores = [b for b, _ in images], [s for _, s in images]
    per_image = [ltkernels.multiclass_nms(b, s, 1e-3, 0.5, 50) for b, s in images]
    batched = ltkernels.batched_multiclass_nms(boxes, scores, score_threshold=1e-3, iou_threshold=0.5,
                                               max_per_image=50)
    assert len(batched) == 4
    for got, want in zip(batched, per_image):
        assert_same(got, want)
    # The same rows interleaved, with an image index per row.
    cat_b, cat_s = torch.cat(boxes), torch.cat(scores)
    image_index = torch.repeat_interleave(torch.arange(4), torch.tensor([150, 0, 90, 120]))
    perm = torch.randperm(cat_s.shape[0])
    shuffled = ltkernels.batched_multiclass_nms(cat_b[perm], cat_s[perm], image_index[perm], 4, 1e-3, 0.5, 50,
                                                concat=True)
    b, s, labels, rows, img = shuffled
    assert torch.equal(img, torch.repeat_interleave(torch.arange(4), torch.tensor([len(p[0]) for p in per_image])))
    want = [torch.cat(t) for t in zip(*per_image)]
    assert torch.equal(b, want[0]) and torch.equal(s, want[1]) and torch.equal(labels, want[2])
    starts = torch.tensor([0, 150, 150, 240])
    assert torch.equal(perm[rows], want[3] + starts[img])  # row_index of the concatenated (shuffled) input


@pytest.mark.parametrize("class_specific", [True, False], ids=["class_specific", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multiclass_nms_images_op(class_specific, dtype):
    # The per-image op reads each image where it lies: the same detections as multiclass_nms of the images
    # concatenated, row_index within the image; its CompositeExplicitAutograd kernel (the other backends': concatenate,
    # then multiclass_nms) agrees with the CPU kernel.
    sizes = [70, 0, 1, 45]
    images = [lvis_inputs(n=n, c=30, class_specific=class_specific, dtype=dtype, seed=i) for i, n in enumerate(sizes)]
    boxes, scores = [b for b, _ in images], [s for _, s in images]
    got = torch.ops.ltkernels.multiclass_nms_images(boxes, scores, 1e-3, 0.5, 25)
    index = torch.repeat_interleave(torch.arange(4), torch.tensor(sizes))
    want = torch.ops.ltkernels.multiclass_nms(torch.cat(boxes), torch.cat(scores), index, 4, 1e-3, 0.5, 25)
    starts = torch.tensor([0, 70, 70, 71])
    assert got[0].shape[0] > 0 and torch.equal(got[4], want[4])
    for g, w in zip(got[:3], want[:3]):
        assert torch.equal(g, w)
    assert torch.equal(got[3] + starts[got[4]], want[3])
    composite = torch.ops.ltkernels.multiclass_nms_images.default.redispatch(
        torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd), boxes, scores, 1e-3, 0.5, 25)
    for g, c in zip(got, composite):
        assert torch.equal(g, c)
    with pytest.raises(RuntimeError, match="one entry per image"):
        torch.ops.ltkernels.multiclass_nms_images(boxes, scores[:3], 1e-3, 0.5, 25)
    with pytest.raises(RuntimeError, match="same number of classes"):
        torch.ops.ltkernels.multiclass_nms_images(boxes[:1] + boxes[2:], scores[:1] + [scores[2][:, :5]] + scores[3:],
                                                  1e-3, 0.5, 25)
    other = torch.float64 if dtype == torch.float32 else torch.float32
    with pytest.raises(ValueError, match="same number of classes, box layout and dtype"):
        ltkernels.batched_multiclass_nms(boxes[:3] + [boxes[3].to(other)], scores[:3] + [scores[3].to(other)])


def test_batched_multiclass_nms_list_gradients():
    images = [lvis_inputs(n=n, c=5, dtype=torch.float64, seed=i) for i, n in enumerate([12, 0, 9])]
    boxes = [b.clone().requires_grad_(True) for b, _ in images]
    scores = [s.clone().requires_grad_(True) for _, s in images]

    def f(*tensors):
        out = ltkernels.batched_multiclass_nms(list(tensors[:3]), list(tensors[3:]), None, None, 1e-3, 0.5, 6)
        return tuple(t for b, s, _, _ in out for t in (b, s))

    torch.autograd.gradcheck(f, (*boxes, *scores))
    per_image = ltkernels.batched_multiclass_nms(boxes, scores, None, None, 1e-3, 0.5, 6)
    sum(b.sum() * 2 + s.sum() for b, s, _, _ in per_image).backward()
    for (b, s, labels, rows), gb, gs in zip(per_image, boxes, scores):
        want_s = torch.zeros_like(gs)
        want_s[rows, labels - 1] = 1
        want_b = torch.zeros_like(gb)
        want_b[rows, labels - 1] = 2
        assert torch.equal(gs.grad, want_s) and torch.equal(gb.grad, want_b)


def test_multiclass_nms_gradients():
    boxes, scores = lvis_inputs(n=20, c=6, dtype=torch.float64)
    boxes.requires_grad_(True)
    scores.requires_grad_(True)
    out_b, out_s, labels, rows = ltkernels.multiclass_nms(boxes, scores, 1e-3, 0.5, 10)
    (out_b.sum() * 2 + (out_s * torch.arange(out_s.numel())).sum()).backward()
    g_scores = torch.zeros_like(scores)
    g_scores[rows, labels - 1] = torch.arange(out_s.numel(), dtype=torch.float64)
    g_boxes = torch.zeros_like(boxes)
    g_boxes[rows, labels - 1] = 2
    assert torch.equal(scores.grad, g_scores) and torch.equal(boxes.grad, g_boxes)
    shared = boxes.detach()[:, 0].clone().requires_grad_(True)
    s2 = scores.detach().clone().requires_grad_(True)
    torch.autograd.gradcheck(lambda b, s: ltkernels.multiclass_nms(b, s, 1e-3, 0.5, 10)[:2], (shared, s2))


@pytest.mark.parametrize("class_specific", [True, False], ids=["class_specific", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_multiclass_nms_cuda_matches_cpu(cuda_side, class_specific, dtype):
    n, n_batched = (300, 100) if cuda_side.emulated else (1000, 300)
    boxes, scores = lvis_inputs(n=n, class_specific=class_specific, dtype=dtype)
    put = cuda_side.put
    for max_per_image in (300, None):
        cpu = ltkernels.multiclass_nms(boxes, scores, 1e-4, 0.5, max_per_image)
        with cuda_side:
            got = ltkernels.multiclass_nms(put(boxes), put(scores), 1e-4, 0.5, max_per_image)
        assert_same([t.cpu() for t in got], cpu)
    images = [lvis_inputs(n=n_batched, class_specific=class_specific, dtype=dtype, seed=i) for i in range(5)]
    cpu = ltkernels.batched_multiclass_nms([b for b, _ in images], [s for _, s in images])
    with cuda_side:
        got = ltkernels.batched_multiclass_nms([put(b) for b, _ in images], [put(s) for _, s in images])
        empty = ltkernels.multiclass_nms(put(boxes), put(scores), 1.0, 0.5, 300)
    for c, g in zip(cpu, got):
        assert_same([t.cpu() for t in g], c)
    assert empty[0].shape == (0, 4) and empty[0].device.type == torch.device(cuda_side.device).type


# ---- bad input ------------------------------------------------------------------------------------------

def test_bad_inputs():
    boxes, scores = random_boxes(10), distinct_scores(10)
    with pytest.raises(ValueError, match="same number of boxes"):
        ltkernels.nms(boxes, scores[:9], 0.5)
    with pytest.raises(ValueError, match="boxes must have size 4"):
        ltkernels.nms(boxes[:, :3], scores, 0.5)
    with pytest.raises(TypeError, match="scores must have the dtype of boxes"):
        ltkernels.nms(boxes, scores.double(), 0.5)
    with pytest.raises(ValueError, match="iou_threshold must be >= 0"):
        ltkernels.nms(boxes, scores, -0.1)
    with pytest.raises(ValueError, match="iou_threshold must be >= 0"):
        ltkernels.batched_nms(boxes, scores, torch.zeros(10, dtype=torch.int64), float("nan"))
    bad = scores.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="scores contains NaN"):
        ltkernels.nms(boxes, bad, 0.5)
    bad = boxes.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="boxes contains NaN"):
        ltkernels.batched_nms(bad, scores, torch.zeros(10, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="idxs must have one entry per box"):
        ltkernels.batched_nms(boxes, scores, torch.zeros(9, dtype=torch.int64), 0.5)
    with pytest.raises(TypeError, match="idxs must be an integer, bool or floating tensor"):
        ltkernels.batched_nms(boxes, scores, torch.zeros(10, dtype=torch.complex64), 0.5)
    mb, ms = lvis_inputs(n=10, c=5)
    with pytest.raises(ValueError, match=r"boxes must have shape \[N, 4\]"):
        ltkernels.multiclass_nms(mb[:, :4], ms)
    with pytest.raises(ValueError, match=r"boxes must have shape \[N, 4\]"):
        ltkernels.multiclass_nms(mb[:9], ms)
    with pytest.raises(ValueError, match="scores must be 2-D"):
        ltkernels.multiclass_nms(mb, ms[:, 0])
    with pytest.raises(ValueError, match="score_threshold must be >= 0"):
        ltkernels.multiclass_nms(mb, ms, -1e-4)
    with pytest.raises(ValueError, match="iou_threshold must be >= 0"):
        ltkernels.multiclass_nms(mb, ms, 1e-4, -0.5)
    with pytest.raises(ValueError, match="max_per_image must be a positive int"):
        ltkernels.multiclass_nms(mb, ms, 1e-4, 0.5, 0)
    nan_scores = ms.clone()
    nan_scores[1, 2] = float("nan")
    with pytest.raises(ValueError, match="scores contains NaN"):
        ltkernels.multiclass_nms(mb, nan_scores)
    inf_boxes = mb.clone()
    inf_boxes[4, 1, 0] = float("inf")
    with pytest.raises(ValueError, match="boxes contains NaN or infinite"):
        ltkernels.multiclass_nms(inf_boxes, ms)
    with pytest.raises(ValueError, match="image_index must lie in"):
        ltkernels.batched_multiclass_nms(mb, ms, torch.full((10,), 3), 2)
    with pytest.raises(ValueError, match="one entry per image"):
        ltkernels.batched_multiclass_nms([mb], [ms, ms])


@pytest.mark.cuda
@pytest.mark.gpu
def test_bad_devices():
    boxes, scores = random_boxes(10), distinct_scores(10)
    with pytest.raises(ValueError, match="scores is on cpu but must be on cuda"):
        ltkernels.nms(boxes.cuda(), scores, 0.5)
    with pytest.raises(ValueError, match="idxs is on cpu"):
        ltkernels.batched_nms(boxes.cuda(), scores.cuda(), torch.zeros(10, dtype=torch.int64), 0.5)
    mb, ms = lvis_inputs(n=10, c=5)
    with pytest.raises(ValueError, match="boxes is on cpu"):
        ltkernels.multiclass_nms(mb, ms.cuda())


def test_wrong_device_kind():
    boxes, scores = random_boxes(10), distinct_scores(10)
    with pytest.raises(ValueError, match="scores is on meta but must be on cpu"):
        ltkernels.nms(boxes, scores.to("meta"), 0.5)


# ---- opcheck and torch.compile ---------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices(emulated=False))
def test_opcheck(device):
    boxes, scores = random_boxes(100, device=device), distinct_scores(100, device=device)
    idxs = torch.randint(0, 4, (100,), device=device)
    torch.library.opcheck(torch.ops.ltkernels.nms.default, (boxes, scores, 0.5))
    torch.library.opcheck(torch.ops.ltkernels.batched_nms.default, (boxes, scores, idxs, 0.5))
    mb, ms = lvis_inputs(n=30, c=8)
    mb, ms = mb.to(device).requires_grad_(True), ms.to(device).requires_grad_(True)
    image_index = torch.randint(0, 2, (30,), device=device)
    torch.library.opcheck(torch.ops.ltkernels.multiclass_nms.default, (mb, ms, image_index, 2, 1e-3, 0.5, 20))
    torch.library.opcheck(torch.ops.ltkernels.multiclass_nms_images.default,
                          ([mb[:18], mb[18:]], [ms[:18], ms[18:]], 1e-3, 0.5, 20))


@pytest.mark.parametrize("device", devices(emulated=False))
def test_torch_compile(device):
    torch._dynamo.reset()
    boxes, scores = random_boxes(300, device=device), distinct_scores(300, device=device)
    idxs = torch.randint(0, 5, (300,), device=device)
    mb, ms = lvis_inputs(n=40, c=10)
    mb, ms = mb.to(device), ms.to(device)

    def f(boxes, scores, idxs, mb, ms):
        keep = ltkernels.nms(boxes, scores, 0.5)
        keep_b = ltkernels.batched_nms(boxes, scores, idxs, 0.5)
        b, s, labels, rows = ltkernels.multiclass_nms(mb, ms, 1e-3, 0.5, 20)
        cb, cs, clabels, crows, cimages = ltkernels.batched_multiclass_nms_concat([mb[:25], mb[25:]],
                                                                                [ms[:25], ms[25:]], None, None,
                                                                                1e-3, 0.5, 20)
        return boxes[keep] * 2, keep_b + 1, b, s * 2, labels, rows, cb, cs, clabels, crows, cimages

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        for got, want in zip(compiled(boxes, scores, idxs, mb, ms), f(boxes, scores, idxs, mb, ms)):
            assert torch.equal(got, want)
