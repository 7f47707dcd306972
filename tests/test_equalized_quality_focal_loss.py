import pytest
import torch

import ltkernels
from ltkernels._ext import has_op
from ltkernels.reference.equalized_focal_loss import efl_statistics
from ltkernels.reference.equalized_quality_focal_loss import EqualizedQualityFocalLossReference
from ltkernels.reference.equalized_quality_focal_loss import equalized_quality_focal_loss as ref_loss

from conftest import CudaSide, devices

pytestmark = pytest.mark.skipif(not has_op("equalized_quality_focal_loss"),
                                reason="equalized_quality_focal_loss not built")


def make_batch(n, c, device="cpu", dtype=torch.float64, p_ignore=0.1, p_bg=0.6, spread=3.0, seed=None):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    labels = torch.randint(1, c + 1, (n,), generator=gen)
    r = torch.rand(n, generator=gen)
    labels[r < p_bg] = 0
    labels[r < p_ignore] = -1
    logits = (torch.randn(n, c, generator=gen, dtype=torch.float64) * spread - 1.0).to(dtype)
    quality = torch.rand(n, generator=gen, dtype=torch.float64)
    return logits.to(device), labels.to(device), quality.to(device)


def assert_close(a, b, rtol=1e-9, atol=1e-12):
    torch.testing.assert_close(a.double().cpu(), b.double().cpu(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("alpha", [-1.0, 0.25])
def test_matches_float64_reference_over_steps(device, alpha):
    """Loss, gradient and the three buffers equal a float64 oracle (BCE against the soft targets, autograd, the
    statistics summed by hand)."""
    n, c = 257, 13
    mod = ltkernels.EqualizedQualityFocalLoss(c, gamma_b=2.0, scale=8.0, alpha=alpha).double().to(device)
    pos_grad = torch.zeros(c, dtype=torch.float64)
    neg_grad = torch.zeros(c, dtype=torch.float64)
    pos_neg = torch.ones(c, dtype=torch.float64)
    for weight in (1.0, 2.5, 0.3, 1.0):
        logits, labels, quality = make_batch(n, c, device)
        x = logits.clone().requires_grad_()
        loss = mod(x, labels, quality)
        (weight * loss).backward()
        xr = logits.detach().cpu().clone().requires_grad_()
        lr = ref_loss(xr, labels.cpu(), quality.cpu(), pos_neg, None, 2.0, 8.0, alpha)
        (gr,) = torch.autograd.grad(weight * lr, xr)
        pos, neg = efl_statistics(gr, labels.cpu())
        pos_grad += pos
        neg_grad += neg
        pos_neg = torch.clamp(pos_grad / (neg_grad + 1e-10), 0, 1)
        assert_close(loss, lr)
        assert_close(x.grad, gr)
        assert_close(mod.pos_grad, pos_grad)
        assert_close(mod.neg_grad, neg_grad)
        assert_close(mod.pos_neg, pos_neg)
    assert (pos_neg < 1).any() and (pos_neg > 0).all()


@pytest.mark.parametrize("device", devices())
def test_hard_targets_are_efl(device):
    """Quality 1 on every positive row: the soft target is EFL's one-hot, so loss, gradient and statistics are
    EFL's (same gamma_b, scale, alpha and g_j), over steps in which g_j moves."""
    c = 11
    eqfl = ltkernels.EqualizedQualityFocalLoss(c, alpha=0.25).double().to(device)
    efl = ltkernels.EqualizedFocalLoss(c, alpha=0.25).double().to(device)
    for _ in range(3):
        logits, labels, _ = make_batch(150, c, device)
        ones = torch.ones(len(labels), dtype=torch.float64, device=labels.device)
        x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        l1, l2 = eqfl(x1, labels, ones), efl(x2, labels)
        l1.backward()
        l2.backward()
        assert_close(l1, l2, rtol=1e-12)
        assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-14)
        for name in ("pos_grad", "neg_grad", "pos_neg"):
            assert_close(getattr(eqfl, name), getattr(efl, name), rtol=1e-10, atol=1e-14)
    assert (efl.pos_neg < 1).any()


def test_zero_quality_positive_has_efl_negative_terms():
    """A positive row with quality 0 has target 0 in every column: its loss and gradient are those of a background
    row under EFL (alpha = -1, so both weight all columns alike), but its label column still counts as positive in
    the statistics (the rows labelled j)."""
    c = 6
    pos_neg = torch.rand(c, dtype=torch.float64)
    logits, _, _ = make_batch(40, c)
    labels = torch.randint(1, c + 1, (40,))
    zero = torch.zeros(40, dtype=torch.float64)
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    l1 = ltkernels.equalized_quality_focal_loss(x1, labels, zero, pos_neg, normalizer=5.0, alpha=-1.0)
    l2 = ltkernels.equalized_focal_loss(x2, torch.zeros_like(labels), pos_neg, normalizer=5.0, alpha=-1.0)
    l1.backward()
    l2.backward()
    assert_close(l1, l2, rtol=1e-12)
    assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("beta", [2.0, 1.5])
def test_scale0_is_quality_focal_loss(device, beta):
    """scale = 0: quality focal loss (GFL), written here from its paper: -|y - s|^beta ((1 - y) log(1 - s) + y log s)
    with y the IoU at the label's column and 0 elsewhere."""
    c = 9
    logits, labels, quality = make_batch(200, c, device, p_ignore=0.0, spread=2.0)
    x = logits.clone().requires_grad_()
    loss = ltkernels.equalized_quality_focal_loss(x, labels, quality, normalizer=7.0, gamma_b=beta, scale=0.0)
    loss.backward()
    xt = logits.clone().requires_grad_()
    y = torch.zeros_like(logits)
    pos = labels > 0
    y[pos, labels[pos] - 1] = quality[pos]
    s = torch.sigmoid(xt)
    expected = (-(y - s).abs() ** beta * ((1 - y) * torch.log1p(-s) + y * torch.log(s))).sum() / 7.0
    expected.backward()
    assert_close(loss, expected, rtol=1e-9)
    assert_close(x.grad, xt.grad, rtol=1e-8, atol=1e-12)


def test_gradcheck():
    c = 5
    logits, labels, quality = make_batch(12, c, p_ignore=0.2, spread=2.0)
    pos_neg = torch.rand(c, dtype=torch.float64)
    x = logits.clone().requires_grad_()
    fn = lambda t: ltkernels.equalized_quality_focal_loss(t, labels, quality, pos_neg, normalizer=3.0, scale=4.0,
                                                          alpha=0.3)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


def test_no_gradient_into_quality_and_extreme_logits():
    c = 4
    logits, labels, quality = make_batch(30, c)
    labels[:10] = 2
    logits[:5] = 80.0
    logits[5:10] = -80.0
    q = quality.clone().requires_grad_()
    x = logits.clone().requires_grad_()
    loss = ltkernels.equalized_quality_focal_loss(x, labels, q, scale=2.0)
    loss.backward()
    assert q.grad is None
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    xr = logits.clone().requires_grad_()
    ref = ref_loss(xr, labels, quality, None, None, 2.0, 2.0)
    ref.backward()
    assert_close(loss, ref)
    assert_close(x.grad, xr.grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_logits(dtype):
    c = 31
    mod = ltkernels.EqualizedQualityFocalLoss(c)
    ref = EqualizedQualityFocalLossReference(c, dtype=torch.float64)
    for _ in range(2):
        logits, labels, quality = make_batch(300, c, dtype=dtype)
        x = logits.clone().requires_grad_()
        loss = mod(x, labels, quality.float())
        loss.backward()
        xr = logits.double().requires_grad_()
        lr = ref(xr, labels, quality)
        lr.backward()
        assert loss.dtype == torch.float32 and x.grad.dtype == dtype
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
        assert_close(loss, lr, rtol=tol, atol=0)
        assert_close(x.grad, xr.grad, rtol=tol, atol=tol * xr.grad.abs().max().item())
        assert_close(mod.pos_grad, ref.pos_grad, rtol=1e-4, atol=1e-9)
        assert_close(mod.neg_grad, ref.neg_grad, rtol=1e-4, atol=1e-9)


def test_torch_compile_fullgraph():
    c = 17
    eager = ltkernels.EqualizedQualityFocalLoss(c)
    compiled_mod = ltkernels.EqualizedQualityFocalLoss(c)

    def step(mod, x, labels, quality):
        return mod(x, labels, quality)

    compiled = torch.compile(step, fullgraph=True)
    for _ in range(3):
        logits, labels, quality = make_batch(120, c, dtype=torch.float32)
        quality = quality.float()
        x1 = logits.clone().requires_grad_()
        x2 = logits.clone().requires_grad_()
        l1 = step(eager, x1, labels, quality)
        (2.0 * l1).backward()
        l2 = compiled(compiled_mod, x2, labels, quality)
        (2.0 * l2).backward()
        torch.testing.assert_close(l1, l2)
        torch.testing.assert_close(x1.grad, x2.grad)
        for name in ("pos_grad", "neg_grad", "pos_neg"):
            torch.testing.assert_close(getattr(eager, name), getattr(compiled_mod, name))
    assert (compiled_mod.pos_neg < 1).any()


def test_opcheck():
    c = 5
    logits, labels, quality = make_batch(20, c, dtype=torch.float32)
    quality = quality.float()
    x = logits.requires_grad_()
    pos_neg = torch.rand(c)
    norm = torch.tensor(3.0)
    torch.library.opcheck(torch.ops.ltkernels.equalized_quality_focal_loss,
                          (x, labels, quality, pos_neg, norm, 2.0, 8.0, -1.0, -1))
    torch.library.opcheck(torch.ops.ltkernels._equalized_quality_focal_loss_backward,
                          (torch.tensor(1.5), logits.detach(), labels, quality, pos_neg, norm, 2.0, 8.0, -1.0, -1))
    torch.library.opcheck(torch.ops.ltkernels._equalized_quality_focal_loss_fused,
                          (x, labels, quality, pos_neg, norm, 2.0, 8.0, -1.0, -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_pass_step_equals_forward_and_backward(dtype):
    """The training step's one pass gives the forward's loss and the backward's gradient and statistics for
    d(loss) = 1 (its registrations: test_opcheck)."""
    c = 23
    logits, labels, quality = make_batch(120, c, dtype=dtype)
    quality = quality.to(dtype)
    pos_neg = torch.rand(c)
    norm = torch.tensor(5.0)
    args = (labels, quality, pos_neg, norm, 2.0, 8.0, -1.0, -1)
    loss, grad, pos, neg = torch.ops.ltkernels._equalized_quality_focal_loss_fused(logits, *args)
    want_grad, want_pos, want_neg = torch.ops.ltkernels._equalized_quality_focal_loss_backward(
        torch.ones((), dtype=loss.dtype), logits, *args)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(loss, torch.ops.ltkernels.equalized_quality_focal_loss(logits, *args), rtol=tol,
                               atol=0)
    assert torch.equal(grad, want_grad)
    torch.testing.assert_close(pos, want_pos, rtol=tol, atol=0)
    torch.testing.assert_close(neg, want_neg, rtol=tol, atol=0)


def test_state_dict_and_resume(tmp_path):
    c = 10
    batches = [make_batch(80, c, dtype=torch.float32, seed=s) for s in range(4)]

    def train(mod, chunk):
        for logits, labels, quality in chunk:
            mod(logits.clone().requires_grad_(), labels, quality.float()).backward()

    full = ltkernels.EqualizedQualityFocalLoss(c)
    train(full, batches)
    first = ltkernels.EqualizedQualityFocalLoss(c)
    train(first, batches[:2])
    torch.save(first.state_dict(), tmp_path / "eqfl.pt")
    resumed = ltkernels.EqualizedQualityFocalLoss(c)
    resumed.load_state_dict(torch.load(tmp_path / "eqfl.pt"))
    train(resumed, batches[2:])
    for name in ("pos_grad", "neg_grad", "pos_neg"):
        assert torch.equal(getattr(full, name), getattr(resumed, name)), name


# ---- bad input ---------------------------------------------------------------------------------------------------

def test_bad_quality():
    c = 4
    logits, labels, quality = make_batch(10, c, p_ignore=0.0)
    labels[3], labels[4] = 2, 0
    with pytest.raises(ValueError, match="quality must have 10 entries"):
        ltkernels.equalized_quality_focal_loss(logits, labels, quality[:9])
    with pytest.raises(TypeError, match="quality must have dtype"):
        ltkernels.equalized_quality_focal_loss(logits, labels, (quality > 0.5).long())
    for bad in (1.5, -0.1, float("nan")):
        q = quality.clone()
        q[3] = bad
        with pytest.raises(ValueError, match=r"quality of the positive rows must lie in \[0, 1\]"):
            ltkernels.equalized_quality_focal_loss(logits, labels, q)
        with pytest.raises(RuntimeError, match=r"quality must lie in \[0, 1\] on positive rows"):  # the kernel's
            torch.ops.ltkernels.equalized_quality_focal_loss(logits, labels, q, torch.ones(c), torch.tensor(1.0),
                                                             2.0, 8.0, -1.0, -1)
    q = quality.clone()
    q[4] = 7.0  # a background row's quality is not read
    loss = ltkernels.equalized_quality_focal_loss(logits, labels, q)
    q[4] = 0.3
    assert torch.equal(loss, ltkernels.equalized_quality_focal_loss(logits, labels, q))


def test_bad_arguments_shared_with_efl():
    c = 4
    mod = ltkernels.EqualizedQualityFocalLoss(c)
    logits, labels, quality = make_batch(10, c)
    with pytest.raises(ValueError, match="logits have 5 classes but the loss was built for num_classes=4"):
        mod(torch.randn(10, 5), labels, quality)
    with pytest.raises(ValueError, match="normalizer must be > 0"):
        mod(logits, labels, quality, normalizer=0.0)
    with pytest.raises(ValueError, match="alpha must lie in"):
        ltkernels.equalized_quality_focal_loss(logits, labels, quality, alpha=1.5)
    with pytest.raises(ValueError, match="ignore_index must not be a label"):
        ltkernels.EqualizedQualityFocalLoss(c, ignore_index=0)


# ---- CUDA --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_matches_cpu(cuda_side, dtype):
    c = 203
    logits, labels, quality = make_batch(601, c, dtype=dtype, spread=2.0)

    def run(side):
        mod = ltkernels.EqualizedQualityFocalLoss(c).to(side.device)
        with side:
            for _ in range(2):
                x = side.put(logits).requires_grad_()
                loss = mod(x, side.put(labels), side.put(quality.float()))
                (1.7 * loss).backward()
        return loss, x.grad, mod.pos_grad, mod.neg_grad, mod.pos_neg

    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for a, b in zip(run(CudaSide("cpu")), run(cuda_side)):
        torch.testing.assert_close(b.cpu().double(), a.double(), rtol=tol, atol=tol * a.abs().max().item())
