"""Seesaw loss (docs/spec.md §9): the float64 reference against a port of mmdetection's code, then the public API
(`ltkernels.seesaw_loss`, `ltkernels.seesaw_scores`, `ltkernels.SeesawLoss`) against both."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ltkernels
from ltkernels._validate import ArgumentTypeError, ArgumentValueError
from ltkernels.reference.seesaw_loss import seesaw_counts, seesaw_factors
from ltkernels.reference.seesaw_loss import seesaw_loss as ref_loss
from ltkernels.reference.seesaw_loss import seesaw_scores as ref_scores
from ltkernels.testing.official_ports import (
    MMDetSeesawLoss,
    mmdet_avg_factor,
    official_scores_to_ours,
    to_official_labels,
)

from conftest import CudaSide, cuda_devices, devices

HERE = Path(__file__).resolve().parent


def make_batch(n, c, device="cpu", dtype=torch.float64, p_ignore=0.1, p_bg=0.4, spread=2.5):
    """Long-tailed labels (class k drawn with probability ~ k^-1.2, so the mitigation factors are not all 1) and
    logits [n, c + 2], drawn on the CPU and then moved (the same values on every device)."""
    freq = 1.0 / torch.arange(1, c + 1, dtype=torch.float64) ** 1.2
    labels = torch.multinomial(freq, n, replacement=True) + 1 if n else torch.zeros(0, dtype=torch.long)
    r = torch.rand(n)
    labels[r < p_bg] = 0
    labels[r < p_ignore] = -1
    logits = torch.randn(n, c + 2, dtype=torch.float64) * spread
    return logits.to(device=device, dtype=dtype), labels.to(device)


def assert_close(a, b, rtol=1e-9, atol=1e-12):
    torch.testing.assert_close(a.detach().double().cpu(), b.detach().double().cpu(), rtol=rtol, atol=atol)


def port_step(port, logits, labels, c, weight=1.0):
    """One step of the mmdet port on ltkernels-layout inputs: ignored rows become background rows of weight 0 and
    avg_factor is mmdet's max(#rows of weight > 0, 1). Returns (loss, dloss/dlogits)."""
    off, label_weights = to_official_labels(labels.cpu(), c)
    x = logits.detach().cpu().double().clone().requires_grad_()
    losses = port(x, off, label_weights, avg_factor=mmdet_avg_factor(label_weights))
    loss = losses["loss_cls_classes"] + losses["loss_cls_objectness"]
    (g,) = torch.autograd.grad(weight * loss, x)
    return loss.detach(), g


# ---- the reference against the mmdetection port (runs without the kernels) -----------------------------------

@pytest.mark.parametrize("n,c", [(37, 11), (128, 5), (1, 3), (61, 1), (203, 40)])
@pytest.mark.parametrize("p,q,eps", [(0.8, 2.0, 1e-2), (0.0, 2.0, 1e-2), (0.8, 0.0, 1e-2), (1.5, 0.7, 0.1)])
def test_port_mmdet_equals_reference_over_three_steps(n, c, p, q, eps):
    """Loss and gradient of mmdet's SeesawLoss equal the reference's in float64 at each of three steps, with the
    counts accumulated by mmdet's own loop and by `seesaw_counts`."""
    port = MMDetSeesawLoss(c, p, q, eps, dtype=torch.float64)
    cum = torch.zeros(c + 1, dtype=torch.float64)
    ignored = 0
    for step in range(3):
        logits, labels = make_batch(n, c, p_ignore=0.1 if n > 1 else 0.0)
        cum += seesaw_counts(labels, c)
        ignored += int((labels == -1).sum())
        x = logits.clone().requires_grad_()
        loss = ref_loss(x, labels, cum, None, p, q, eps)
        (g,) = torch.autograd.grad(loss, x)
        lp, gp = port_step(port, logits, labels, c)
        assert_close(loss, lp)
        assert_close(g, gp)
        # mmdet keeps background last and counts a zero-weight row under its label (here background)
        assert torch.equal(port.cum_samples[:c], cum[1:])
        assert port.cum_samples[c] == cum[0] + ignored
        if n > 30 and c > 1:  # the factors are not all 1: the loss differs from plain cross-entropy
            plain = ref_loss(logits, labels, cum, None, 0.0, 0.0, eps)
            assert (loss - plain).abs() > 1e-6


def test_port_mmdet_equals_reference_with_explicit_normalizer_and_no_positives():
    c = 7
    logits, labels = make_batch(50, c)
    counts = seesaw_counts(labels, c)
    cum = 3 * counts
    port = MMDetSeesawLoss(c, dtype=torch.float64)
    port.cum_samples.copy_(torch.cat([2 * counts[1:], 2 * counts[:1]]))  # its forward adds this batch's counts
    off, lw = to_official_labels(labels, c)
    x = logits.clone().requires_grad_()
    lp = sum(port(x, off, lw, avg_factor=7.5).values())
    assert_close(ref_loss(logits, labels, cum, 7.5), lp)
    # a batch of background and ignored rows only: the objectness term alone
    labels = torch.where(labels > 0, torch.zeros_like(labels), labels)
    port = MMDetSeesawLoss(c, dtype=torch.float64)
    off, lw = to_official_labels(labels, c)
    lp = sum(port(logits, off, lw, avg_factor=mmdet_avg_factor(lw)).values())
    assert_close(ref_loss(logits, labels, seesaw_counts(labels, c)), lp)


def test_reference_gradient_is_softmax_of_shifted_logits_minus_onehot():
    """§9's closed form: softmax(z) - onehot over the class columns of positive rows, softmax - onehot over the two
    objectness columns of every non-ignored row, over the normalizer; the factors are constants."""
    n, c = 80, 9
    logits, labels = make_batch(n, c)
    cum = seesaw_counts(labels, c) + torch.randint(0, 50, (c + 1,)).double()
    x = logits.clone().requires_grad_()
    (g,) = torch.autograd.grad(ref_loss(x, labels, cum, 4.0), x)
    expected = torch.zeros_like(logits)
    pos = labels > 0
    lab = labels[pos] - 1
    z = logits[pos, :c] + seesaw_factors(logits[pos, :c], lab, cum).log()
    expected[pos, :c] = torch.softmax(z, 1) - torch.nn.functional.one_hot(lab, c)
    valid = labels != -1
    t = (labels[valid] == 0).long()
    expected[valid, c:] = torch.softmax(logits[valid, c:], 1) - torch.nn.functional.one_hot(t, 2)
    assert_close(g, expected / 4.0)
    assert (g[~valid] == 0).all()


def test_reference_mitigation_uses_clamped_counts():
    """N_j = max(cum_samples[j + 1], 1): a class never seen weighs like one seen once."""
    c = 4
    sigma_free = torch.zeros(3, c)  # equal logits: no compensation
    lab = torch.tensor([0, 1, 3])
    cum = torch.tensor([5.0, 100.0, 10.0, 0.0, 1.0], dtype=torch.float64)
    f = seesaw_factors(sigma_free.double(), lab, cum, p=0.8, q=2.0)
    n = torch.tensor([100.0, 10.0, 1.0, 1.0], dtype=torch.float64)
    expected = torch.where(n[None, :] < n[lab][:, None], (n[None, :] / n[lab][:, None]) ** 0.8,
                           torch.ones(3, c, dtype=torch.float64))
    assert_close(f, expected)
    assert f[2, 2] == 1.0 and f[0, 2] == pytest.approx(0.01 ** 0.8)


def test_port_mmdet_activation_equals_reference_scores():
    c = 13
    logits, _ = make_batch(40, c)
    port = MMDetSeesawLoss(c, dtype=torch.float64)
    assert_close(ref_scores(logits), official_scores_to_ours(port.get_activation(logits)))
    assert_close(ref_scores(logits).sum(1), torch.ones(40, dtype=torch.float64))


# ---- the public API against the reference and the port ---------------------------------------------------------

@pytest.mark.parametrize("device", devices())
def test_module_matches_float64_reference_and_mmdet_over_steps(device):
    """SeesawLoss adds each step's counts to its float32 `cum_samples` before the loss; loss and gradient (any
    upstream weight) equal the float64 reference and mmdet's port at every step."""
    n, c = 37, 11
    mod = ltkernels.SeesawLoss(c).to(device)
    assert mod.cum_samples.dtype == torch.float32 and mod.cum_samples.shape == (c + 1,)
    assert (mod.cum_samples == 0).all()
    port = MMDetSeesawLoss(c, dtype=torch.float64)
    cum = torch.zeros(c + 1, dtype=torch.float64)
    for weight in (1.0, 2.5, 0.3):
        logits, labels = make_batch(n, c)
        x = logits.to(device, copy=True).requires_grad_()
        loss = mod(x, labels.to(device))
        (weight * loss).backward()
        cum += seesaw_counts(labels, c)
        xr = logits.clone().requires_grad_()
        lr = ref_loss(xr, labels, cum)
        (gr,) = torch.autograd.grad(weight * lr, xr)
        lp, gp = port_step(port, logits, labels, c, weight)
        assert_close(mod.cum_samples, cum, rtol=0, atol=0)
        assert_close(loss, lr)
        assert_close(x.grad, gr)
        assert_close(loss, lp)
        assert_close(x.grad, gp)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("p,q,eps", [(0.8, 2.0, 1e-2), (0.0, 2.0, 1e-2), (0.8, 0.0, 1e-2), (2.0, 0.5, 0.2)])
def test_function_with_given_counts_matches_reference(device, p, q, eps):
    """The functional form takes cum_samples as given (it does not update it), with zero counts clamped to 1."""
    n, c = 37, 11
    logits, labels = make_batch(n, c)
    cum = torch.randint(0, 300, (c + 1,)).float()
    cum[3] = 0
    cum_dev = cum.to(device)
    for normalizer in (None, 6.5, torch.tensor(3.0)):
        x = logits.to(device, copy=True).requires_grad_()
        loss = ltkernels.seesaw_loss(x, labels.to(device), cum_dev, normalizer=normalizer, p=p, q=q, eps=eps)
        loss.backward()
        xr = logits.clone().requires_grad_()
        lr = ref_loss(xr, labels, cum.double(), normalizer, p, q, eps)
        lr.backward()
        assert_close(loss, lr)
        assert_close(x.grad, xr.grad)
    assert torch.equal(cum_dev.cpu(), cum)


@pytest.mark.parametrize("device", devices())
def test_float32_within_tolerance_of_float64_reference(device):
    n, c = 37, 11
    mod = ltkernels.SeesawLoss(c).to(device)
    cum = torch.zeros(c + 1, dtype=torch.float64)
    for _ in range(2):
        logits, labels = make_batch(n, c, dtype=torch.float32)
        x = logits.to(device, copy=True).requires_grad_()
        loss = mod(x, labels.to(device))
        loss.backward()
        cum += seesaw_counts(labels, c)
        xr = logits.double().requires_grad_()
        lr = ref_loss(xr, labels, cum)
        lr.backward()
        assert loss.dtype == torch.float32 and x.grad.dtype == torch.float32
        assert_close(loss, lr, rtol=1e-5, atol=1e-6)
        assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-6)


def test_gradcheck():
    """With q = 0: the compensation factors are constants of the detached logits (§9), so with them on the
    analytic gradient is, by design, not the numerical derivative of the loss; the mitigation factors (from the
    counts) are truly constant."""
    c = 4
    logits, labels = make_batch(9, c, p_ignore=0.2, spread=1.5)
    labels[0], labels[1] = 1, 0
    cum = torch.tensor([6.0, 40.0, 3.0, 0.0, 11.0])
    x = logits.clone().requires_grad_()
    fn = lambda t: ltkernels.seesaw_loss(t, labels, cum, normalizer=3.0, p=0.8, q=0.0)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


def test_opcheck():
    c = 5
    logits, labels = make_batch(20, c, dtype=torch.float32)
    cum = seesaw_counts(labels, c).float() + 2
    norm = torch.tensor(3.0)
    torch.library.opcheck(torch.ops.ltkernels.seesaw_loss,
                          (logits.clone().requires_grad_(), labels, cum, norm, 0.8, 2.0, 0.01, -1))
    torch.library.opcheck(torch.ops.ltkernels.seesaw_loss_accumulate, (cum.clone(), labels, -1))
    _, grad = torch.ops.ltkernels.seesaw_loss(logits, labels, cum, norm, 0.8, 2.0, 0.01, -1)  # d(loss) = 1
    x = logits.double().requires_grad_()
    (want,) = torch.autograd.grad(ref_loss(x, labels, cum.double(), normalizer=3.0), x)
    assert_close(grad, want, rtol=1e-5, atol=1e-6)


def test_torch_compile_fullgraph_training_step():
    """A compiled training step (forward with its count update, backward) gives the eager loss, gradient and
    counts at every step."""
    c = 17
    eager = ltkernels.SeesawLoss(c)
    compiled_mod = ltkernels.SeesawLoss(c)

    def step(mod, x, labels):
        return mod(x, labels)

    compiled = torch.compile(step, fullgraph=True)
    for _ in range(3):
        logits, labels = make_batch(120, c, dtype=torch.float32)
        x1 = logits.clone().requires_grad_()
        x2 = logits.clone().requires_grad_()
        (2.0 * step(eager, x1, labels)).backward()
        l2 = compiled(compiled_mod, x2, labels)
        (2.0 * l2).backward()
        torch.testing.assert_close(l2, ref_loss(logits.double(), labels, eager.cum_samples.double()).float())
        torch.testing.assert_close(x1.grad, x2.grad)
        assert torch.equal(eager.cum_samples, compiled_mod.cum_samples)
    assert compiled_mod.cum_samples.sum() > 0


def test_checkpoint_resume_continues_counts(tmp_path):
    c = 10
    batches = [make_batch(80, c, dtype=torch.float32) for _ in range(6)]

    def train(mod, chunk):
        out = []
        for logits, labels in chunk:
            x = logits.clone().requires_grad_()
            loss = mod(x, labels)
            loss.backward()
            out.append((loss.detach(), x.grad))
        return out

    full = ltkernels.SeesawLoss(c)
    full_out = train(full, batches)
    first = ltkernels.SeesawLoss(c)
    train(first, batches[:3])
    assert set(first.state_dict()) == {"cum_samples"}
    torch.save(first.state_dict(), tmp_path / "seesaw.pt")
    resumed = ltkernels.SeesawLoss(c)
    resumed.load_state_dict(torch.load(tmp_path / "seesaw.pt"))
    resumed_out = train(resumed, batches[3:])
    assert torch.equal(full.cum_samples, resumed.cum_samples)
    for (a, ga), (b, gb) in zip(full_out[3:], resumed_out):
        assert torch.equal(a, b) and torch.equal(ga, gb)


@pytest.mark.parametrize("device", devices())
def test_empty_batch(device):
    c = 5
    mod = ltkernels.SeesawLoss(c).to(device)
    x = torch.randn(0, c + 2, device=device, requires_grad=True)
    loss = mod(x, torch.zeros(0, dtype=torch.long, device=device))
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad.shape == (0, c + 2)
    assert (mod.cum_samples == 0).all()


@pytest.mark.parametrize("device", devices())
def test_all_rows_ignored(device):
    c = 5
    mod = ltkernels.SeesawLoss(c).to(device)
    mod.cum_samples.fill_(3.0)
    logits, _ = make_batch(12, c, device=device)
    x = logits.clone().requires_grad_()
    loss = mod(x, torch.full((12,), -1, dtype=torch.long, device=device))
    assert loss.item() == 0.0
    loss.backward()
    assert (x.grad == 0).all()
    assert (mod.cum_samples == 3.0).all()


def test_other_ignore_index():
    c = 6
    logits, labels = make_batch(60, c)
    cum = seesaw_counts(labels, c).float() + 1
    other = torch.where(labels == -1, torch.full_like(labels, -100), labels)
    a = ltkernels.seesaw_loss(logits, labels, cum)
    b = ltkernels.seesaw_loss(logits, other, cum, ignore_index=-100)
    assert_close(a, b)
    assert_close(a, ref_loss(logits, labels, cum.double()))


def test_int32_labels_and_noncontiguous_logits():
    c = 6
    logits, labels = make_batch(50, c)
    wide = torch.randn(50, 2 * (c + 2), dtype=torch.float64)
    wide[:, ::2] = logits
    x = wide[:, ::2]
    assert not x.is_contiguous()
    cum = seesaw_counts(labels, c).float() * 5
    assert_close(ltkernels.seesaw_loss(x, labels.int(), cum), ref_loss(logits, labels, cum.double()))


@pytest.mark.parametrize("device", devices())
def test_scores_equal_mmdet_activation_background_first(device):
    c = 11
    logits, _ = make_batch(37, c)
    port = MMDetSeesawLoss(c, dtype=torch.float64)
    expected = official_scores_to_ours(port.get_activation(logits))
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        s = ltkernels.seesaw_scores(logits.to(device=device, dtype=dtype))
        assert s.shape == (37, c + 1) and s.dtype == dtype
        assert_close(s, expected, rtol=tol, atol=tol)
    assert_close(expected, ref_scores(logits))


# ---- bad input ---------------------------------------------------------------------------------------------------

def test_labels_out_of_range_raise():
    c = 4
    logits, labels = make_batch(10, c)
    cum = torch.ones(c + 1)
    for bad in (c + 1, -2):
        labels[3] = bad
        with pytest.raises(ArgumentValueError, match=f"labels must lie in 0..{c}"):
            ltkernels.seesaw_loss(logits, labels, cum)
        with pytest.raises(ArgumentValueError, match=f"labels must lie in 0..{c}"):
            ltkernels.SeesawLoss(c)(logits, labels)


def test_bad_shapes_and_types_raise():
    c = 4
    mod = ltkernels.SeesawLoss(c)
    logits, labels = make_batch(10, c)
    cum = torch.ones(c + 1)
    with pytest.raises(ArgumentValueError, match="logits must be 2-D"):
        mod(logits.flatten(), labels)
    with pytest.raises(ArgumentValueError, match=r"(?=.*num_classes)(?=.*\b5\b)"):  # num_classes, the count got
        mod(torch.randn(10, c + 1, dtype=torch.float64), labels)
    with pytest.raises(ArgumentValueError, match="labels must have 10 entries"):
        mod(logits, labels[:9])
    with pytest.raises(ArgumentTypeError, match="labels must be int64 or int32"):
        mod(logits, labels.float())
    with pytest.raises(ArgumentTypeError, match="logits must have dtype"):
        mod(logits.long(), labels)
    with pytest.raises(ArgumentValueError, match="cum_samples"):
        ltkernels.seesaw_loss(logits, labels, torch.ones(c))
    with pytest.raises(ArgumentValueError, match="normalizer must be > 0"):
        ltkernels.seesaw_loss(logits, labels, cum, normalizer=0.0)
    with pytest.raises(ArgumentValueError, match="normalizer must be a number or a one-element tensor"):
        mod(logits, labels, normalizer=torch.ones(2))


# ---- CUDA --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", cuda_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(side, dtype):
    side = CudaSide(side)
    n, c = (37, 11) if side.emulated else (3001, 1203)
    batches = [make_batch(n, c, dtype=dtype) for _ in range(2)]

    def run(s):
        mod = ltkernels.SeesawLoss(c).to(s.device)
        with s:
            for logits, labels in batches:
                x = s.put(logits).requires_grad_()
                loss = mod(x, s.put(labels))
                (1.7 * loss).backward()
            scores = ltkernels.seesaw_scores(s.put(batches[-1][0]))
        return loss, x.grad, mod.cum_samples, scores

    tol = {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]
    for a, b in zip(run(CudaSide("cpu")), run(side)):
        torch.testing.assert_close(b.detach().cpu().double(), a.detach().double(), rtol=tol,
                                   atol=tol * max(a.abs().max().item(), 1e-30))


# ---- distributed -------------------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(tmp_path, mode):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(HERE / "dist_loss_worker.py"), str(tmp_path), mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(tmp_path / f"{mode}{r}.pt") for r in range(2)]


@pytest.mark.distributed
def test_distributed_two_ranks_count_the_whole_batch(tmp_path):
    """torchrun, 2 CPU processes on gloo, each on its half of every batch: after each step both ranks'
    cum_samples equal the counts of the whole batches so far, and each rank's loss and gradient are the
    reference's with those counts and its own rows (normalizer: its own non-ignored rows)."""
    ranks = run_workers(tmp_path, "seesaw")
    batches = ranks[0]["batches"]
    c = batches[0][0].shape[1] - 2
    cum = torch.zeros(c + 1, dtype=torch.float64)
    for step, (logits, labels) in enumerate(batches):
        cum += seesaw_counts(labels, c)
        half = logits.shape[0] // 2
        for r, out in enumerate(ranks):
            s = out["steps"][step]
            assert_close(s["cum_samples"], cum, rtol=0, atol=0)
            sl = slice(r * half, (r + 1) * half)
            x = logits[sl].clone().requires_grad_()
            expected = ref_loss(x, labels[sl], cum)
            (g,) = torch.autograd.grad(expected, x)
            assert_close(s["loss"], expected)
            assert_close(s["grad"], g)
    # the counts of one rank alone would differ: the all-reduce is really tested
    assert not torch.equal(seesaw_counts(batches[0][1][:half], c), seesaw_counts(batches[0][1], c))
