import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import ltkernels
from ltkernels._ext import has_op
from ltkernels.reference.equalized_focal_loss import EqualizedFocalLossReference, efl_statistics, efl_targets
from ltkernels.reference.equalized_focal_loss import equalized_focal_loss as ref_loss
from ltkernels.testing import cuda_emulation as emulation

from conftest import EMULATION, CudaSide, devices

pytestmark = pytest.mark.skipif(not has_op("equalized_focal_loss"), reason="equalized_focal_loss not built")

HERE = Path(__file__).resolve().parent


def make_batch(n, c, device="cpu", dtype=torch.float64, p_ignore=0.1, p_bg=0.6, spread=3.0):
    labels = torch.randint(1, c + 1, (n,), device=device)
    r = torch.rand(n, device=device)
    labels[r < p_bg] = 0
    labels[r < p_ignore] = -1
    logits = (torch.randn(n, c, device=device, dtype=torch.float64) * spread - 1.0).to(dtype)
    return logits, labels


def assert_close(a, b, rtol=1e-9, atol=1e-12):
    torch.testing.assert_close(a.double().cpu(), b.double().cpu(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", devices())
def test_matches_float64_reference_over_steps(device):
    """Loss, gradient and the three buffers equal a float64 oracle that accumulates the statistics by hand."""
    n, c = 257, 13
    mod = ltkernels.EqualizedFocalLoss(c, gamma_b=2.0, scale=8.0, alpha=0.25).double().to(device)
    pos_grad = torch.zeros(c, dtype=torch.float64)
    neg_grad = torch.zeros(c, dtype=torch.float64)
    pos_neg = torch.ones(c, dtype=torch.float64)
    for step, weight in enumerate((1.0, 2.5, 0.3, 1.0)):
        logits, labels = make_batch(n, c, device)
        x = logits.clone().requires_grad_()
        loss = mod(x, labels)
        (weight * loss).backward()
        # oracle
        xr = logits.detach().cpu().clone().requires_grad_()
        lr = ref_loss(xr, labels.cpu(), pos_neg, None, 2.0, 8.0, 0.25)
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
    assert (pos_neg < 1).any() and (pos_neg > 0).all()  # the statistics really moved g_j


@pytest.mark.parametrize("device", devices())
def test_ignored_rows_take_no_part(device):
    c = 7
    logits, labels = make_batch(64, c, device, p_ignore=0.3)
    x = logits.clone().requires_grad_()
    mod = ltkernels.EqualizedFocalLoss(c).double().to(device)
    loss = mod(x, labels)
    loss.backward()
    keep = labels != -1
    x2 = logits[keep].clone().requires_grad_()
    mod2 = ltkernels.EqualizedFocalLoss(c).double().to(device)
    loss2 = mod2(x2, labels[keep])
    loss2.backward()
    assert_close(loss, loss2)
    assert (x.grad[~keep] == 0).all()
    assert_close(x.grad[keep], x2.grad)
    assert_close(mod.pos_grad, mod2.pos_grad)
    assert_close(mod.neg_grad, mod2.neg_grad)


def test_upstream_scale_scales_statistics():
    c = 9
    logits, labels = make_batch(100, c)
    mods = []
    for w in (1.0, 4.0):
        mod = ltkernels.EqualizedFocalLoss(c).double()
        x = logits.clone().requires_grad_()
        (w * mod(x, labels)).backward()
        mods.append(mod)
    assert mods[0].pos_grad.sum() > 0 and mods[0].neg_grad.sum() > 0
    assert_close(mods[1].pos_grad, 4.0 * mods[0].pos_grad)
    assert_close(mods[1].neg_grad, 4.0 * mods[0].neg_grad)
    assert_close(mods[1].pos_neg, mods[0].pos_neg)  # the ratio does not see the scale


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.25), (1.5, 0.5), (0.0, 0.25), (2.0, -1.0)])
def test_scale0_is_torchvision_sigmoid_focal_loss(device, gamma, alpha):
    c = 11
    logits, labels = make_batch(200, c, device, p_ignore=0.0)
    x = logits.clone().requires_grad_()
    loss = ltkernels.equalized_focal_loss(x, labels, normalizer=7.0, gamma_b=gamma, scale=0.0, alpha=alpha)
    loss.backward()
    xt = logits.clone().requires_grad_()
    onehot = efl_targets(labels, c)[0].to(torch.float64)
    expected = torchvision.ops.sigmoid_focal_loss(xt, onehot, alpha=alpha, gamma=gamma, reduction="sum") / 7.0
    expected.backward()
    assert_close(loss, expected, rtol=1e-7)
    assert_close(x.grad, xt.grad, rtol=1e-7, atol=1e-10)


def test_gradcheck():
    c = 5
    logits, labels = make_batch(12, c, p_ignore=0.2, spread=2.0)
    pos_neg = torch.rand(c, dtype=torch.float64)
    x = logits.clone().requires_grad_()
    fn = lambda t: ltkernels.equalized_focal_loss(t, labels, pos_neg, normalizer=3.0, scale=4.0, alpha=0.3)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_logits(dtype):
    c = 31
    logits, labels = make_batch(300, c, dtype=dtype)
    mod = ltkernels.EqualizedFocalLoss(c)
    ref = EqualizedFocalLossReference(c, dtype=torch.float64)
    for _ in range(2):
        logits, labels = make_batch(300, c, dtype=dtype)
        x = logits.clone().requires_grad_()
        loss = mod(x, labels)
        loss.backward()
        xr = logits.double().requires_grad_()
        lr = ref(xr, labels)
        lr.backward()
        assert loss.dtype == torch.float32 and x.grad.dtype == dtype
        assert mod.pos_grad.dtype == torch.float32
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
        assert_close(loss, lr, rtol=tol, atol=0)
        assert_close(x.grad, xr.grad, rtol=tol, atol=tol * xr.grad.abs().max().item())
        # the statistics are summed from the float32 gradient before it is rounded to the logits' dtype
        assert_close(mod.pos_grad, ref.pos_grad, rtol=1e-4, atol=1e-9)
        assert_close(mod.neg_grad, ref.neg_grad, rtol=1e-4, atol=1e-9)


def test_int32_labels_and_noncontiguous_logits():
    c = 6
    logits, labels = make_batch(50, c)
    wide = torch.randn(50, 2 * c, dtype=torch.float64)
    wide[:, ::2] = logits
    x = wide[:, ::2].requires_grad_(False)
    assert not x.is_contiguous()
    a = ltkernels.equalized_focal_loss(x, labels.int(), scale=2.0)
    b = ref_loss(logits, labels, None, None, 2.0, 2.0, 0.25)
    assert_close(a, b)


def test_forward_uses_its_own_pos_neg_when_backwards_are_batched():
    """Two forwards, then one backward through both: each gradient uses the g_j of its forward, and the buffers
    receive both steps' statistics."""
    c = 8
    mod = ltkernels.EqualizedFocalLoss(c).double()
    mod.pos_neg.copy_(torch.rand(c, dtype=torch.float64))
    g0 = mod.pos_neg.clone()
    batches = [make_batch(40, c) for _ in range(2)]
    xs = [b[0].clone().requires_grad_() for b in batches]
    losses = [mod(x, b[1]) for x, b in zip(xs, batches)]
    (losses[0] + losses[1]).backward()
    pos = torch.zeros(c, dtype=torch.float64)
    neg = torch.zeros(c, dtype=torch.float64)
    for x, (logits, labels) in zip(xs, batches):
        xr = logits.clone().requires_grad_()
        (gr,) = torch.autograd.grad(ref_loss(xr, labels, g0), xr)
        assert_close(x.grad, gr)
        p, q = efl_statistics(gr, labels)
        pos, neg = pos + p, neg + q
    assert_close(mod.pos_grad, pos)
    assert_close(mod.neg_grad, neg)


def test_deterministic_statistics():
    c = 40
    logits, labels = make_batch(3000, c, dtype=torch.float32)
    out = []
    for _ in range(2):
        mod = ltkernels.EqualizedFocalLoss(c)
        x = logits.clone().requires_grad_()
        loss = mod(x, labels)
        loss.backward()
        out.append((loss, x.grad, mod.pos_grad.clone(), mod.neg_grad.clone()))
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph():
    c = 17
    eager = ltkernels.EqualizedFocalLoss(c)
    compiled_mod = ltkernels.EqualizedFocalLoss(c)

    def step(mod, x, labels):
        return mod(x, labels)

    compiled = torch.compile(step, fullgraph=True)
    for _ in range(3):
        logits, labels = make_batch(120, c, dtype=torch.float32)
        x1 = logits.clone().requires_grad_()
        x2 = logits.clone().requires_grad_()
        l1 = step(eager, x1, labels)
        (2.0 * l1).backward()
        l2 = compiled(compiled_mod, x2, labels)
        (2.0 * l2).backward()
        torch.testing.assert_close(l1, l2)
        torch.testing.assert_close(x1.grad, x2.grad)
        for name in ("pos_grad", "neg_grad", "pos_neg"):
            torch.testing.assert_close(getattr(eager, name), getattr(compiled_mod, name))
    assert (compiled_mod.pos_neg < 1).any()


def test_opcheck():
    c = 5
    logits, labels = make_batch(20, c, dtype=torch.float32)
    x = logits.requires_grad_()
    pos_neg = torch.rand(c)
    norm = torch.tensor(3.0)
    torch.library.opcheck(torch.ops.ltkernels.equalized_focal_loss,
                          (x, labels, pos_neg, norm, 2.0, 8.0, 0.25, -1))
    torch.library.opcheck(torch.ops.ltkernels._equalized_focal_loss_backward,
                          (torch.tensor(1.5), logits.detach(), labels, pos_neg, norm, 2.0, 8.0, 0.25, -1))
    torch.library.opcheck(torch.ops.ltkernels._equalized_focal_loss_fused,
                          (x, labels, pos_neg, norm, 2.0, 8.0, 0.25, -1))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_one_pass_step_equals_forward_and_backward(device, dtype):
    """The training step's one pass (what a loss with grad enabled runs) gives the forward's loss and the backward's
    gradient and statistics for d(loss) = 1 (its registrations: test_opcheck)."""
    c = 37
    logits, labels = make_batch(150, c, device=device, dtype=dtype)
    pos_neg = torch.rand(c, device=device)
    norm = torch.tensor(7.0, device=device)
    args = (labels, pos_neg, norm, 2.0, 8.0, 0.25, -1)
    loss, grad, pos, neg = torch.ops.ltkernels._equalized_focal_loss_fused(logits, *args)
    want_grad, want_pos, want_neg = torch.ops.ltkernels._equalized_focal_loss_backward(
        torch.ones((), device=device, dtype=loss.dtype), logits, *args)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5}[dtype]
    assert_close(loss, torch.ops.ltkernels.equalized_focal_loss(logits, *args), rtol=tol, atol=0)
    assert torch.equal(grad, want_grad)
    assert_close(pos, want_pos, rtol=tol, atol=0)
    assert_close(neg, want_neg, rtol=tol, atol=0)


def test_training_step_equals_inference_loss():
    """With grad enabled the loss is the one-pass step's, under no_grad the forward kernel's: the same value; the
    step's backward updates the statistics."""
    logits, labels = make_batch(40, 6, dtype=torch.float32)
    mod = ltkernels.EqualizedFocalLoss(6)
    x = logits.clone().requires_grad_()
    with torch.no_grad():
        eval_loss = mod(x, labels)
    loss = mod(x, labels)
    assert loss.grad_fn is not None and eval_loss.grad_fn is None
    assert_close(loss.detach(), eval_loss, rtol=1e-6, atol=0)
    loss.backward()
    assert x.grad is not None and (mod.pos_neg < 1).any()


def test_checkpoint_resume_continues_statistics(tmp_path):
    c = 10
    batches = [make_batch(80, c, dtype=torch.float32) for _ in range(6)]

    def train(mod, chunk):
        for logits, labels in chunk:
            x = logits.clone().requires_grad_()
            mod(x, labels).backward()

    full = ltkernels.EqualizedFocalLoss(c)
    train(full, batches)
    first = ltkernels.EqualizedFocalLoss(c)
    train(first, batches[:3])
    torch.save(first.state_dict(), tmp_path / "efl.pt")
    assert set(first.state_dict()) == {"pos_grad", "neg_grad", "pos_neg"}
    resumed = ltkernels.EqualizedFocalLoss(c)
    resumed.load_state_dict(torch.load(tmp_path / "efl.pt"))
    train(resumed, batches[3:])
    for name in ("pos_grad", "neg_grad", "pos_neg"):
        assert torch.equal(getattr(full, name), getattr(resumed, name)), name


# ---- bad input ---------------------------------------------------------------------------------------------------

def test_labels_out_of_range():
    logits, labels = make_batch(10, 4)
    for bad in (5, -2):
        labels[3] = bad
        with pytest.raises(ValueError, match="labels must lie in 0..4"):
            ltkernels.equalized_focal_loss(logits, labels)
        with pytest.raises(RuntimeError, match="labels must lie in 0..4"):  # the kernel's own check
            torch.ops.ltkernels.equalized_focal_loss(logits, labels, torch.ones(4), torch.tensor(1.0), 2.0, 8.0,
                                                     0.25, -1)


def test_bad_shapes_and_types():
    mod = ltkernels.EqualizedFocalLoss(4)
    logits, labels = make_batch(10, 4)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        mod(logits.flatten(), labels)
    with pytest.raises(ValueError, match="logits have 5 classes but the loss was built for num_classes=4"):
        mod(torch.randn(10, 5), labels)
    with pytest.raises(ValueError, match="labels must have 10 entries"):
        mod(logits, labels[:9])
    with pytest.raises(TypeError, match="labels must be int64 or int32"):
        mod(logits, labels.float())
    with pytest.raises(TypeError, match="logits must have dtype"):
        mod(logits.long(), labels)
    with pytest.raises(ValueError, match="pos_neg has 3 entries"):
        ltkernels.equalized_focal_loss(logits, labels, torch.ones(3))
    with pytest.raises(ValueError, match="normalizer must be a number or a one-element tensor"):
        mod(logits, labels, normalizer=torch.ones(2))
    with pytest.raises(ValueError, match="gamma_b must be > 0"):
        ltkernels.EqualizedFocalLoss(4, gamma_b=0.0)


def test_nan_logits_never_reach_the_buffers():
    c = 6
    mod = ltkernels.EqualizedFocalLoss(c)
    logits, labels = make_batch(30, c, dtype=torch.float32)
    x = logits.clone().requires_grad_()
    mod(x, labels).backward()
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    logits[4, 2] = float("nan")
    labels[4] = 1
    x = logits.clone().requires_grad_()
    loss = mod(x, labels)
    assert torch.isnan(loss)  # visible to the caller
    loss.backward()
    assert torch.isnan(x.grad).any()
    for k, v in mod.state_dict().items():
        assert torch.equal(v, before[k]), k  # the step was dropped, no NaN in the statistics
    # and the statistics go on normally afterwards
    logits, labels = make_batch(30, c, dtype=torch.float32)
    x = logits.clone().requires_grad_()
    mod(x, labels).backward()
    assert torch.isfinite(mod.pos_neg).all() and (mod.pos_grad > before["pos_grad"]).any()


@pytest.mark.parametrize("device", devices())
def test_empty_batch(device):
    c = 5
    mod = ltkernels.EqualizedFocalLoss(c).to(device)
    x = torch.randn(0, c, device=device, requires_grad=True)
    loss = mod(x, torch.zeros(0, dtype=torch.long, device=device))
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad.shape == (0, c)
    assert (mod.pos_grad == 0).all() and (mod.neg_grad == 0).all()
    # per the formula pos_neg = clamp(0 / (0 + 1e-10), 0, 1) = 0 after any step without statistics
    assert (mod.pos_neg == 0).all()


# ---- CUDA --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cuda_matches_cpu(cuda_side, dtype):
    c = 1203
    logits, labels = make_batch(3001, c, dtype=dtype, spread=2.0)

    def run(side):
        mod = ltkernels.EqualizedFocalLoss(c).to(side.device)
        with side:
            for step in range(2):
                x = side.put(logits).requires_grad_()
                loss = mod(x, side.put(labels))
                (1.7 * loss).backward()
        return loss, x.grad, mod.pos_grad, mod.neg_grad, mod.pos_neg

    cpu = CudaSide("cpu")
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    for a, b in zip(run(cpu), run(cuda_side)):
        torch.testing.assert_close(b.cpu().double(), a.double(), rtol=tol, atol=tol * a.abs().max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("sms", [2, 132])
def test_cuda_deterministic_statistics_in_every_order(sms):
    """With deterministic algorithms on, the statistics are summed in a fixed order: bit-identical in every thread
    order and SM count of the emulation (the grid, and so the partial sums, depend on the SM count alone)."""
    if not EMULATION:
        pytest.skip("this build has no CUDA emulation")
    c = 97
    logits, labels = make_batch(700, c, dtype=torch.float32, spread=2.0)
    results = []
    torch.use_deterministic_algorithms(True)
    try:
        for order in emulation.ORDERS:
            with emulation.cuda_emulation(order=order, seed=5, sms=sms):
                mod = ltkernels.EqualizedFocalLoss(c)
                x = logits.clone().requires_grad_()
                loss = mod(x, labels)
                loss.backward()
            results.append((loss, x.grad, mod.pos_grad, mod.neg_grad))
    finally:
        torch.use_deterministic_algorithms(False)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.gpu
def test_cuda_no_host_sync():
    c = 64
    mod = ltkernels.EqualizedFocalLoss(c).cuda()
    logits, labels = make_batch(500, c, device="cuda", dtype=torch.float32)
    x = logits.clone().requires_grad_()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = mod(x, labels)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref = EqualizedFocalLossReference(c).cuda()
    xr = logits.clone().requires_grad_()
    ref(xr, labels).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(mod.pos_grad, ref.pos_grad, rtol=1e-4, atol=1e-7)


# ---- distributed -------------------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_distributed_two_ranks(tmp_path):
    """torchrun, 2 CPU processes on gloo: each rank's buffers equal the single-process statistics of the
    concatenated batch (with the distributed normalizer: max(positives summed over ranks, 1) / world size), and each
    other."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(HERE / "dist_efl_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    batches = torch.load(tmp_path / "batches.pt")
    # the same steps in one process, on the concatenated batch
    c = batches[0][0].shape[1]
    mod = ltkernels.EqualizedFocalLoss(c).double()
    for logits, labels in batches:
        norm = (labels > 0).sum().double().clamp(min=1) / 2
        x = logits.clone().requires_grad_()
        mod(x, labels, normalizer=norm).backward()
    for name in ("pos_grad", "neg_grad", "pos_neg"):
        assert torch.equal(r0[name], r1[name]), name
        torch.testing.assert_close(r0[name], getattr(mod, name), rtol=1e-10, atol=1e-14)
    assert (mod.pos_neg < 1).any()


@pytest.mark.distributed
def test_distributed_normalizer_is_the_official_one(tmp_path):
    """2 gloo ranks, steps with 0 and with 1 positive row in total: the default normalizer is the official
    max(positives summed over ranks, 1) / world size = 0.5 (not max(sum / world size, 1) = 1), for EFL and EQFL;
    the statistics are the sums over both ranks."""
    from ltkernels.reference.equalized_quality_focal_loss import equalized_quality_focal_loss as ref_eqfl

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(HERE / "dist_efl_worker.py"), str(tmp_path), "sparse"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"sparse{r}.pt") for r in range(2)]
    for step in range(2):
        total = sum(int((r[step]["labels"] > 0).sum()) for r in ranks)
        assert total == ranks[0][step]["total_pos"]
        norm = max(total, 1) / 2
        assert norm == 0.5
        pos = {k: 0 for k in ("efl", "eqfl")}
        neg = {k: 0 for k in ("efl", "eqfl")}
        for r in ranks:
            s = r[step]
            for name in ("efl", "eqfl"):
                x = s["logits"].clone().requires_grad_()
                if name == "efl":
                    expected = ref_loss(x, s["labels"], None, norm)
                else:
                    expected = ref_eqfl(x, s["labels"], s["quality"], None, norm)
                (g,) = torch.autograd.grad(expected, x)
                assert_close(s[name]["loss"], expected)
                assert_close(s[name]["grad"], g)
                p, q = efl_statistics(g, s["labels"])
                pos[name], neg[name] = pos[name] + p, neg[name] + q
        for name in ("efl", "eqfl"):
            for r in ranks:  # every rank holds the all-reduced sums (one step into fresh modules)
                assert_close(r[step][name]["pos_grad"], pos[name])
                assert_close(r[step][name]["neg_grad"], neg[name])


# ---- argument validation -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", ["efl", "eqfl"])
def test_argument_validation(fn):
    c = 4
    logits, labels = make_batch(10, c)
    quality = torch.rand(10, dtype=torch.float64)

    def call(lab=labels, **kw):
        if fn == "efl":
            return ltkernels.equalized_focal_loss(logits, lab, **kw)
        return ltkernels.equalized_quality_focal_loss(logits, lab, quality, **kw)

    for bad in (0.0, -1.0, float("nan"), torch.tensor(0.0), torch.tensor(float("nan"))):
        with pytest.raises(ValueError, match="normalizer must be > 0"):
            call(normalizer=bad)
    for bad in (1.5, -0.5, float("nan")):
        with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\] \(or be -1"):
            call(alpha=bad)
    call(alpha=-1.0)  # documented: no alpha_t
    with pytest.raises(ValueError, match="scale must be a finite number"):
        call(scale=float("nan"))
    with pytest.raises(ValueError, match="gamma_b must be a finite number"):
        call(gamma_b=float("inf"))
    for bad in (1.5, -0.1, float("nan")):
        pn = torch.full((c,), 0.5)
        pn[1] = bad
        with pytest.raises(ValueError, match=r"pos_neg must lie in \[0, 1\]"):
            call(pos_neg=pn)
    for bad in (0, 2, c):
        with pytest.raises(ValueError, match=rf"ignore_index must not be a label \(0..{c}\)"):
            call(ignore_index=bad)
    cls = ltkernels.EqualizedFocalLoss if fn == "efl" else ltkernels.EqualizedQualityFocalLoss
    with pytest.raises(ValueError, match="ignore_index must not be a label"):
        cls(c, ignore_index=1)
    with pytest.raises(ValueError, match="alpha must lie in"):
        cls(c, alpha=2.0)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        cls(c, scale=float("nan"))
    for ok in (-100, c + 1):  # any value that is not a label is a valid ignore_index
        lab = torch.where(labels == -1, torch.full_like(labels, ok), labels)
        assert torch.equal(call(lab, ignore_index=ok), call())


# ---- mixed precision ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fn", ["efl", "eqfl"])
def test_autocast_matches_float64_reference(dtype, fn):
    """Under autocast the logits reach the loss in float16 / bfloat16: the loss and the statistics are computed and
    accumulated in float32 and match the float64 reference on the same (rounded) logits; the buffers stay
    float32."""
    from ltkernels.reference.equalized_quality_focal_loss import EqualizedQualityFocalLossReference

    c, d = 23, 16
    torch.manual_seed(0)
    layer = torch.nn.Linear(d, c)
    with torch.no_grad():
        layer.bias.fill_(-2.0)
    if fn == "efl":
        mod, ref = ltkernels.EqualizedFocalLoss(c), EqualizedFocalLossReference(c, dtype=torch.float64)
    else:
        mod, ref = ltkernels.EqualizedQualityFocalLoss(c), EqualizedQualityFocalLossReference(c, dtype=torch.float64)
    for _ in range(3):
        feats = torch.randn(400, d)
        _, labels = make_batch(400, c)
        quality = torch.rand(400)
        extra = () if fn == "efl" else (quality,)
        with torch.autocast("cpu", dtype=dtype):
            logits = layer(feats)
            assert logits.dtype == dtype
            x = logits.detach().requires_grad_()
            loss = mod(x, labels, *extra)
        loss.backward()
        xr = x.detach().double().requires_grad_()
        lr = ref(xr, labels, *extra)
        lr.backward()
        assert loss.dtype == torch.float32 and mod.pos_grad.dtype == torch.float32
        tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
        assert_close(loss, lr, rtol=1e-5, atol=0)  # the loss itself is summed in float32
        assert_close(x.grad, xr.grad, rtol=tol, atol=tol * xr.grad.abs().max().item())
        assert_close(mod.pos_grad, ref.pos_grad, rtol=1e-4, atol=1e-9)
        assert_close(mod.neg_grad, ref.neg_grad, rtol=1e-4, atol=1e-9)
        assert_close(mod.pos_neg, ref.pos_neg, rtol=1e-4, atol=1e-7)
    assert (mod.pos_neg < 1).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_amp_training_statistics_track_fp32(dtype):
    """A short training run of a linear classifier with EFL, once in float32 and once under autocast: the
    per-class statistics (pos_neg, hence gamma_j) follow the float32 run closely at every step."""
    c, d, steps, n = 12, 24, 40, 1024
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(steps, n, d, generator=gen)
    freq = 1.0 / torch.arange(1, c + 1, dtype=torch.float64) ** 1.5  # long-tailed classes
    labels = torch.multinomial(freq, steps * n, replacement=True, generator=gen).view(steps, n) + 1
    labels[torch.rand(steps, n, generator=gen) < 0.9] = 0
    centers = torch.randn(c + 1, d, generator=gen)
    feats = feats + 1.5 * centers[labels]  # learnable: the statistics really move

    def run(amp):
        torch.manual_seed(0)
        layer = torch.nn.Linear(d, c)
        with torch.no_grad():
            layer.bias.fill_(-4.0)
        efl = ltkernels.EqualizedFocalLoss(c)
        opt = torch.optim.SGD(layer.parameters(), lr=0.05, momentum=0.9)
        trace = []
        for s in range(steps):
            with torch.autocast("cpu", dtype=dtype, enabled=amp):
                logits = layer(feats[s])
                loss = efl(logits, labels[s])
            opt.zero_grad()
            loss.backward()
            opt.step()
            trace.append(efl.pos_neg.clone())
        return torch.stack(trace), efl

    fp32, _ = run(False)
    amp, efl = run(True)
    assert efl.pos_neg.dtype == torch.float32
    assert fp32[-1].min() < 0.9  # the statistics moved away from their start
    tol = {torch.float16: 0.01, torch.bfloat16: 0.05}[dtype]
    assert (amp - fp32).abs().max() < tol
