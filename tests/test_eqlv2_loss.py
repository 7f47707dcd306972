"""EQL v2 (docs/spec.md §10): the float64 reference against a port of the authors' code, then the public API
(`ltkernels.eqlv2_loss`, `ltkernels.eqlv2_scores`, `ltkernels.EQLv2Loss`) against both."""
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ltkernels
from ltkernels._validate import ArgumentTypeError, ArgumentValueError
from ltkernels.reference.eqlv2_loss import eqlv2_loss as ref_loss
from ltkernels.reference.eqlv2_loss import eqlv2_scores as ref_scores
from ltkernels.reference.eqlv2_loss import eqlv2_statistics, eqlv2_targets, eqlv2_update, eqlv2_weights
from ltkernels.testing.official_ports import EQLv2, official_scores_to_ours, to_official_labels

from conftest import CudaSide, cuda_devices, devices

HERE = Path(__file__).resolve().parent
INF = float("inf")


def make_batch(n, c, device="cpu", dtype=torch.float64, p_ignore=0.1, p_bg=0.5, spread=2.5):
    """Long-tailed labels (class k with probability ~ k^-1.2) and logits [n, c + 1] (column c background), drawn on
    the CPU and then moved."""
    freq = 1.0 / torch.arange(1, c + 1, dtype=torch.float64) ** 1.2
    labels = torch.multinomial(freq, n, replacement=True) + 1 if n else torch.zeros(0, dtype=torch.long)
    r = torch.rand(n)
    labels[r < p_bg] = 0
    labels[r < p_ignore] = -1
    logits = torch.randn(n, c + 1, dtype=torch.float64) * spread - 1.0
    return logits.to(device=device, dtype=dtype), labels.to(device)


def assert_close(a, b, rtol=1e-9, atol=1e-12):
    torch.testing.assert_close(a.detach().double().cpu(), b.detach().double().cpu(), rtol=rtol, atol=atol)


class Oracle:
    """The §10 state kept by hand with the float64 reference: one step = loss and gradient with the pos_neg of
    before the step, then the statistics added."""

    def __init__(self, c, gamma=12.0, mu=0.8, alpha=4.0):
        self.args = (gamma, mu, alpha)
        self.pos_grad = torch.zeros(c, dtype=torch.float64)
        self.neg_grad = torch.zeros(c, dtype=torch.float64)
        self.pos_neg = torch.full((c,), INF, dtype=torch.float64)

    def step(self, logits, labels, weight=1.0, normalizer=None):
        x = logits.detach().cpu().double().clone().requires_grad_()
        loss = ref_loss(x, labels.cpu(), self.pos_neg, normalizer, *self.args)
        (g,) = torch.autograd.grad(weight * loss, x)
        pos, neg = eqlv2_statistics(x, labels.cpu(), self.pos_neg, *self.args)
        self.pos_grad, self.neg_grad, self.pos_neg = eqlv2_update(self.pos_grad, self.neg_grad, pos, neg)
        return loss.detach(), g


def port_step(port, logits, labels, c, weight=1.0):
    """One step of the authors' EQLv2 on the non-ignored rows (it has no ignored rows; its n_i is their number).
    Returns (loss, dloss/dlogits of all rows, ignored rows 0)."""
    off, keep = to_official_labels(labels.cpu(), c, drop_ignored=True)
    x = logits.detach().cpu().double().clone().requires_grad_()
    if not bool(keep.any()):  # the official n_i = 0 gives 0 / 0; the statistics are still collected (zeros)
        port(x[keep].detach(), off)
        return torch.zeros((), dtype=torch.float64), torch.zeros_like(x)
    loss = port(x[keep], off)
    (g,) = torch.autograd.grad(weight * loss, x)
    return loss.detach(), g


# ---- the reference against the authors' code (runs without the kernels) ----------------------------------------

@pytest.mark.parametrize("n,c", [(37, 11), (128, 5), (1, 3), (61, 1), (301, 40)])
@pytest.mark.parametrize("gamma,mu,alpha", [(12.0, 0.8, 4.0), (6.0, 0.3, 1.0), (12.0, 0.8, 0.0)])
def test_port_eqlv2_equals_reference_over_three_steps(n, c, gamma, mu, alpha):
    """Loss, gradient and the statistics (pos_grad, neg_grad, pos_neg) of the authors' EQLv2 equal the reference's
    in float64 over three steps: the first with all weights 1, the later ones weighted by the gradient ratio."""
    port = EQLv2(c, gamma, mu, alpha)
    oracle = Oracle(c, gamma, mu, alpha)
    for step in range(3):
        logits, labels = make_batch(n, c, p_ignore=0.1 if n > 1 else 0.0)
        before = oracle.pos_neg.clone()
        loss, g = oracle.step(logits, labels)
        lp, gp = port_step(port, logits, labels, c)
        assert_close(loss, lp)
        assert_close(g, gp)
        assert (g[labels == -1] == 0).all()
        assert_close(port._pos_grad, oracle.pos_grad)
        assert_close(port._neg_grad, oracle.neg_grad)
        assert_close(port.pos_neg, oracle.pos_neg)
        if step == 0:
            assert torch.isinf(before).all()
            plain = F.binary_cross_entropy_with_logits(logits[labels != -1], eqlv2_targets(labels, c)[0][
                labels != -1].double(), reduction="sum") / max(int((labels != -1).sum()), 1)
            assert_close(loss, plain)  # first step: every weight 1
        elif n > 30 and c > 1:
            w = eqlv2_weights(eqlv2_targets(labels, c)[0], before, gamma, mu, alpha)
            assert (w - 1).abs().max() > 1e-3  # the weights really moved
    assert torch.isfinite(oracle.pos_neg).all() and (oracle.pos_neg >= 0).all()


def test_reference_statistics_are_weighted_gradients_before_normalisation():
    """pos_step / neg_step are the sums of w_ij |p_ij - t_ij| over target 1 / 0: the gradient of the unnormalised
    loss, per element, with its weight; the background column is left out."""
    n, c = 90, 7
    logits, labels = make_batch(n, c)
    pos_neg = torch.rand(c, dtype=torch.float64) * 1.5
    x = logits.clone().requires_grad_()
    (g,) = torch.autograd.grad(ref_loss(x, labels, pos_neg, normalizer=1.0), x)
    targets, valid = eqlv2_targets(labels, c)
    pos, neg = eqlv2_statistics(logits, labels, pos_neg)
    assert_close(pos, (g.abs() * targets).sum(0)[:c])
    assert_close(neg, (g.abs() * (~targets & valid[:, None])).sum(0)[:c])
    # and the weights are those of §10
    f = 1 / (1 + torch.exp(-12.0 * (pos_neg - 0.8)))
    w = eqlv2_weights(targets, pos_neg)
    t = targets.double()
    assert_close(w[:, :c], (1 + 4.0 * (1 - f)) * t[:, :c] + f * (1 - t[:, :c]))
    assert (w[:, c] == 1).all()


def test_port_eqlv2_activation_equals_reference_scores():
    c = 13
    logits, _ = make_batch(40, c)
    port = EQLv2(c)
    assert_close(ref_scores(logits), official_scores_to_ours(port.get_activation(logits.clone())))


# ---- the public API against the reference and the authors' code ------------------------------------------------

@pytest.mark.parametrize("device", devices())
def test_module_matches_float64_reference_and_authors_code_over_steps(device):
    """EQLv2Loss: loss and gradient (any upstream weight) equal the reference and the authors' code at every
    step; the buffers hold the same statistics, which do not see the upstream weight (the official statistics are
    the per-element gradients before normalisation)."""
    n, c = 37, 11
    mod = ltkernels.EQLv2Loss(c).double().to(device)
    assert set(mod.state_dict()) == {"pos_grad", "neg_grad", "pos_neg"}
    assert (mod.pos_grad == 0).all() and (mod.neg_grad == 0).all() and torch.isinf(mod.pos_neg).all()
    oracle = Oracle(c)
    port = EQLv2(c)
    for weight in (1.0, 2.5, 0.3, 1.0):
        logits, labels = make_batch(n, c)
        x = logits.to(device, copy=True).requires_grad_()
        loss = mod(x, labels.to(device))
        (weight * loss).backward()
        lr, gr = oracle.step(logits, labels, weight)
        lp, gp = port_step(port, logits, labels, c, weight)
        assert_close(loss, lr)
        assert_close(x.grad, gr)
        assert_close(loss, lp)
        assert_close(x.grad, gp)
        assert_close(mod.pos_grad, oracle.pos_grad)
        assert_close(mod.neg_grad, oracle.neg_grad)
        assert_close(mod.pos_neg, oracle.pos_neg)
        assert_close(mod.pos_neg, port.pos_neg)
    assert (oracle.pos_neg < 0.8).any()  # some weights are far from 1


@pytest.mark.parametrize("device", devices())
def test_function_weights_from_given_pos_neg(device):
    """The functional form with a given pos_neg (finite and +inf entries), and None = all +inf = plain BCE."""
    n, c = 37, 11
    logits, labels = make_batch(n, c)
    pos_neg = torch.rand(c, dtype=torch.float64) * 1.6
    pos_neg[2] = INF
    for pn, normalizer in ((pos_neg, None), (pos_neg, 4.5), (None, None), (None, torch.tensor(2.0))):
        x = logits.to(device, copy=True).requires_grad_()
        loss = ltkernels.eqlv2_loss(x, labels.to(device), None if pn is None else pn.to(device),
                                    normalizer=normalizer)
        loss.backward()
        xr = logits.clone().requires_grad_()
        lr = ref_loss(xr, labels, pn, normalizer)
        lr.backward()
        assert_close(loss, lr)
        assert_close(x.grad, xr.grad)
    valid = labels != -1
    plain = F.binary_cross_entropy_with_logits(logits[valid], eqlv2_targets(labels, c)[0][valid].double(),
                                               reduction="sum") / int(valid.sum())
    assert_close(ltkernels.eqlv2_loss(logits.to(device), labels.to(device)), plain)


@pytest.mark.parametrize("device", devices())
def test_function_with_buffers_updates_them_in_its_forward(device):
    """§10 (the official forward): the loss and gradient use the pos_neg of before the call; the buffers hold
    the step's statistics as soon as the forward returns, and the backward changes them no more."""
    n, c = 37, 11
    logits, labels = make_batch(n, c)
    pos_grad = torch.rand(c, dtype=torch.float64, device=device)
    neg_grad = torch.rand(c, dtype=torch.float64, device=device) * 10
    pos_neg = (pos_grad / (neg_grad + 1e-10)).clone()
    start = (pos_grad.cpu().clone(), neg_grad.cpu().clone(), pos_neg.cpu().clone())
    x = logits.to(device, copy=True).requires_grad_()
    loss = ltkernels.eqlv2_loss(x, labels.to(device), pos_neg, pos_grad=pos_grad, neg_grad=neg_grad)
    pos, neg = eqlv2_statistics(logits, labels, start[2])
    expected = eqlv2_update(start[0], start[1], pos, neg)
    for got, want in zip((pos_grad, neg_grad, pos_neg), expected):
        assert_close(got, want)
    loss.backward()
    for got, want in zip((pos_grad, neg_grad, pos_neg), expected):
        assert_close(got, want)
    xr = logits.clone().requires_grad_()
    (gr,) = torch.autograd.grad(ref_loss(xr, labels, start[2]), xr)
    assert_close(x.grad, gr)


def test_second_forward_before_a_backward_uses_the_first_ones_update():
    """Two forwards, then one backward through both (the official order of events): the second forward weighs
    with the pos_neg the first one left, each gradient is that of its own weights, and the buffers hold both
    steps' statistics."""
    c = 8
    mod = ltkernels.EQLv2Loss(c).double()
    mod.pos_grad.copy_(torch.rand(c, dtype=torch.float64))
    mod.neg_grad.copy_(torch.rand(c, dtype=torch.float64) * 5)
    mod.pos_neg.copy_(mod.pos_grad / (mod.neg_grad + 1e-10))
    pos_grad, neg_grad, pos_neg = [t.clone() for t in (mod.pos_grad, mod.neg_grad, mod.pos_neg)]
    batches = [make_batch(40, c) for _ in range(2)]
    xs = [b[0].clone().requires_grad_() for b in batches]
    losses = [mod(x, b[1]) for x, b in zip(xs, batches)]
    (losses[0] + losses[1]).backward()
    for x, (logits, labels) in zip(xs, batches):
        xr = logits.clone().requires_grad_()
        (gr,) = torch.autograd.grad(ref_loss(xr, labels, pos_neg), xr)
        assert_close(x.grad, gr)
        p, q = eqlv2_statistics(logits, labels, pos_neg)
        pos_grad, neg_grad, pos_neg = eqlv2_update(pos_grad, neg_grad, p, q)
    assert_close(mod.pos_grad, pos_grad)
    assert_close(mod.neg_grad, neg_grad)
    assert_close(mod.pos_neg, pos_neg)


def test_statistics_do_not_depend_on_upstream_weight_or_normalizer():
    c = 9
    logits, labels = make_batch(100, c)
    mods = []
    for w, norm in ((1.0, None), (4.0, None), (1.0, 17.0)):
        mod = ltkernels.EQLv2Loss(c).double()
        for _ in range(2):
            x = logits.clone().requires_grad_()
            (w * mod(x, labels, normalizer=norm)).backward()
        mods.append(mod)
    assert mods[0].pos_grad.sum() > 0 and mods[0].neg_grad.sum() > 0
    for other in mods[1:]:
        for name in ("pos_grad", "neg_grad", "pos_neg"):
            assert_close(getattr(other, name), getattr(mods[0], name))


def test_forward_without_backward_leaves_statistics():
    """§10: a forward that cannot be back-propagated (no_grad: an evaluation loss) changes no statistics."""
    c = 6
    mod = ltkernels.EQLv2Loss(c).double()
    logits, labels = make_batch(30, c)
    with torch.no_grad():
        loss = mod(logits, labels)
    assert_close(loss, ref_loss(logits, labels))
    assert (mod.pos_grad == 0).all() and (mod.neg_grad == 0).all() and torch.isinf(mod.pos_neg).all()


@pytest.mark.parametrize("device", devices())
def test_float32_within_tolerance_of_float64_reference(device):
    n, c = 37, 11
    mod = ltkernels.EQLv2Loss(c).to(device)
    assert mod.pos_grad.dtype == torch.float32
    oracle = Oracle(c)
    for _ in range(3):
        logits, labels = make_batch(n, c, dtype=torch.float32)
        x = logits.to(device, copy=True).requires_grad_()
        loss = mod(x, labels.to(device))
        loss.backward()
        lr, gr = oracle.step(logits, labels)
        assert loss.dtype == torch.float32 and x.grad.dtype == torch.float32
        assert_close(loss, lr, rtol=1e-5, atol=1e-6)
        assert_close(x.grad, gr, rtol=1e-4, atol=1e-6)
        assert_close(mod.pos_grad, oracle.pos_grad, rtol=1e-4, atol=1e-6)
        assert_close(mod.neg_grad, oracle.neg_grad, rtol=1e-4, atol=1e-6)
        assert_close(mod.pos_neg, oracle.pos_neg, rtol=1e-4, atol=1e-7)


def test_gradcheck():
    c = 4
    logits, labels = make_batch(10, c, p_ignore=0.2, spread=1.5)
    pos_neg = torch.tensor([0.3, 0.9, INF, 0.0], dtype=torch.float64)
    x = logits.clone().requires_grad_()
    fn = lambda t: ltkernels.eqlv2_loss(t, labels, pos_neg, normalizer=3.0, gamma=6.0, mu=0.5, alpha=2.0)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


def test_opcheck():
    c = 5
    logits, labels = make_batch(20, c, dtype=torch.float32)
    pos_neg = torch.rand(c) * 2
    pos_neg[1] = INF
    norm = torch.tensor(3.0)
    torch.library.opcheck(torch.ops.ltkernels.eqlv2_loss,
                          (logits.clone().requires_grad_(), labels, pos_neg, norm, 12.0, 0.8, 4.0, -1))
    torch.library.opcheck(torch.ops.ltkernels.eqlv2_loss_accumulate,
                          (torch.rand(c), torch.rand(c), torch.rand(c), torch.rand(c), torch.rand(c)))
    # the op's other outputs: dL/dlogits (with d(loss) = 1) and the step's statistics
    _, grad, pos_step, neg_step = torch.ops.ltkernels.eqlv2_loss(logits, labels, pos_neg, norm, 12.0, 0.8, 4.0, -1)
    x = logits.double().requires_grad_()
    (want,) = torch.autograd.grad(ref_loss(x, labels, pos_neg.double(), normalizer=3.0), x)
    assert_close(grad, want, rtol=1e-5, atol=1e-6)
    pos, neg = eqlv2_statistics(logits.double(), labels, pos_neg.double())
    assert grad.shape == logits.shape and pos_step.shape == neg_step.shape == (c,)
    assert_close(pos_step, pos, rtol=1e-5, atol=1e-6)
    assert_close(neg_step, neg, rtol=1e-5, atol=1e-6)


def test_torch_compile_fullgraph_training_step():
    c = 17
    eager = ltkernels.EQLv2Loss(c)
    compiled_mod = ltkernels.EQLv2Loss(c)

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
    assert torch.isfinite(compiled_mod.pos_neg).all() and (compiled_mod.pos_grad > 0).any()


def test_checkpoint_resume_continues_statistics(tmp_path):
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

    full = ltkernels.EQLv2Loss(c)
    full_out = train(full, batches)
    first = ltkernels.EQLv2Loss(c)
    train(first, batches[:3])
    torch.save(first.state_dict(), tmp_path / "eqlv2.pt")
    resumed = ltkernels.EQLv2Loss(c)
    resumed.load_state_dict(torch.load(tmp_path / "eqlv2.pt"))
    resumed_out = train(resumed, batches[3:])
    for name in ("pos_grad", "neg_grad", "pos_neg"):
        assert torch.equal(getattr(full, name), getattr(resumed, name)), name
    for (a, ga), (b, gb) in zip(full_out[3:], resumed_out):  # the resumed weights are the continued ones
        assert torch.equal(a, b) and torch.equal(ga, gb)


def test_nan_logits_never_reach_the_buffers():
    c = 6
    mod = ltkernels.EQLv2Loss(c)
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
        assert torch.equal(v, before[k]), k  # the step was dropped
    logits, labels = make_batch(30, c, dtype=torch.float32)
    x = logits.clone().requires_grad_()
    mod(x, labels).backward()
    assert torch.isfinite(mod.pos_neg).all() and (mod.pos_grad > before["pos_grad"]).any()


@pytest.mark.parametrize("device", devices())
def test_empty_batch(device):
    c = 5
    mod = ltkernels.EQLv2Loss(c).to(device)
    x = torch.randn(0, c + 1, device=device, requires_grad=True)
    loss = mod(x, torch.zeros(0, dtype=torch.long, device=device))
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad.shape == (0, c + 1)
    assert (mod.pos_grad == 0).all() and (mod.neg_grad == 0).all()
    # the formula (and the authors' code): pos_neg = 0 / (0 + 1e-10) = 0 after a step without statistics
    assert (mod.pos_neg == 0).all()


@pytest.mark.parametrize("device", devices())
def test_all_rows_ignored(device):
    c = 5
    mod = ltkernels.EQLv2Loss(c).to(device)
    logits, _ = make_batch(12, c, device=device, dtype=torch.float32)
    x = logits.clone().requires_grad_()
    loss = mod(x, torch.full((12,), -1, dtype=torch.long, device=device))
    assert loss.item() == 0.0
    loss.backward()
    assert (x.grad == 0).all()
    assert (mod.pos_grad == 0).all() and (mod.neg_grad == 0).all()


def test_other_ignore_index_and_int32_labels():
    c = 6
    logits, labels = make_batch(60, c)
    pos_neg = torch.rand(c, dtype=torch.float64)
    other = torch.where(labels == -1, torch.full_like(labels, -100), labels).int()
    a = ltkernels.eqlv2_loss(logits, labels, pos_neg)
    b = ltkernels.eqlv2_loss(logits, other, pos_neg, ignore_index=-100)
    assert_close(a, b)
    assert_close(a, ref_loss(logits, labels, pos_neg))


@pytest.mark.parametrize("device", devices())
def test_scores_equal_authors_activation_background_first(device):
    c = 11
    logits, _ = make_batch(37, c)
    expected = official_scores_to_ours(EQLv2(c).get_activation(logits.clone()))
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        s = ltkernels.eqlv2_scores(logits.to(device=device, dtype=dtype))
        assert s.shape == (37, c + 1) and s.dtype == dtype
        assert_close(s, expected, rtol=tol, atol=tol)


# ---- bad input ---------------------------------------------------------------------------------------------------

def test_labels_out_of_range_raise():
    c = 4
    logits, labels = make_batch(10, c)
    for bad in (c + 1, -2):
        labels[3] = bad
        with pytest.raises(ArgumentValueError, match=f"labels must lie in 0..{c}"):
            ltkernels.eqlv2_loss(logits, labels)
        with pytest.raises(ArgumentValueError, match=f"labels must lie in 0..{c}"):
            ltkernels.EQLv2Loss(c).double()(logits, labels)


def test_bad_shapes_and_types_raise():
    c = 4
    mod = ltkernels.EQLv2Loss(c).double()
    logits, labels = make_batch(10, c)
    with pytest.raises(ArgumentValueError, match="logits must be 2-D"):
        mod(logits.flatten(), labels)
    with pytest.raises(ArgumentValueError, match=r"(?=.*num_classes)(?=.*\b4\b)"):  # num_classes, the count got
        mod(torch.randn(10, c, dtype=torch.float64), labels)
    with pytest.raises(ArgumentValueError, match="labels must have 10 entries"):
        mod(logits, labels[:9])
    with pytest.raises(ArgumentTypeError, match="labels must be int64 or int32"):
        mod(logits, labels.float())
    with pytest.raises(ArgumentTypeError, match="logits must have dtype"):
        mod(logits.long(), labels)
    with pytest.raises(ArgumentValueError, match="pos_neg"):
        ltkernels.eqlv2_loss(logits, labels, torch.ones(c + 1))
    with pytest.raises(ArgumentValueError, match="normalizer must be > 0"):
        ltkernels.eqlv2_loss(logits, labels, normalizer=0.0)


# ---- CUDA --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", cuda_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(side, dtype):
    side = CudaSide(side)
    n, c = (37, 11) if side.emulated else (3001, 1203)
    batches = [make_batch(n, c, dtype=dtype) for _ in range(2)]

    def run(s):
        mod = ltkernels.EQLv2Loss(c).to(device=s.device, dtype=dtype)
        with s:
            for logits, labels in batches:
                x = s.put(logits).requires_grad_()
                loss = mod(x, s.put(labels))
                (1.7 * loss).backward()
            scores = ltkernels.eqlv2_scores(s.put(batches[-1][0]))
        return loss, x.grad, mod.pos_grad, mod.neg_grad, mod.pos_neg, scores

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
def test_distributed_two_ranks_share_the_statistics(tmp_path):
    """torchrun, 2 CPU processes on gloo, each on its half of every batch: after each step both ranks hold the
    statistics of the whole batches (as one process training on the concatenated batches), and each rank's loss
    and gradient are the reference's on its own rows with the shared pos_neg (normalizer: its own rows)."""
    ranks = run_workers(tmp_path, "eqlv2")
    batches = ranks[0]["batches"]
    c = batches[0][0].shape[1] - 1
    oracle = Oracle(c)
    single = ltkernels.EQLv2Loss(c).double()
    for step, (logits, labels) in enumerate(batches):
        half = logits.shape[0] // 2
        before = oracle.pos_neg.clone()
        for r, out in enumerate(ranks):
            s = out["steps"][step]
            sl = slice(r * half, (r + 1) * half)
            x = logits[sl].clone().requires_grad_()
            expected = ref_loss(x, labels[sl], before)
            (g,) = torch.autograd.grad(expected, x)
            assert_close(s["loss"], expected)
            assert_close(s["grad"], g)
        oracle.step(logits, labels)
        x = logits.clone().requires_grad_()
        single(x, labels).backward()
        for name in ("pos_grad", "neg_grad", "pos_neg"):
            assert torch.equal(ranks[0]["steps"][step][name], ranks[1]["steps"][step][name]), name
            assert_close(ranks[0]["steps"][step][name], getattr(oracle, name), rtol=1e-10, atol=1e-14)
            assert_close(ranks[0]["steps"][step][name], getattr(single, name), rtol=1e-10, atol=1e-14)
    assert math.isfinite(float(oracle.pos_neg.max())) and (oracle.pos_neg < 0.8).any()
