"""Seesaw loss, forward + backward with the count update, at the two-stage LVIS v1 size (8192 RoIs of a batch:
16 images x 512, C = 1203 classes + 2 objectness columns). Peers: the eager float64-style reference run in float32,
the port of mmdetection's SeesawLoss (its host syncs included: labels.unique(), avg_factor as a Python float), and
torch.compile of the reference."""
import pytest
import torch

import ltkernels
from ltkernels._ext import has_op
from ltkernels.reference import seesaw_loss as ref
from ltkernels.testing.official_ports import MMDetSeesawLoss, to_official_labels

pytestmark = pytest.mark.skipif(not has_op("seesaw_loss"), reason="seesaw_loss not built")

C = 1203
N = 8192
OP = "seesaw_loss"


def make_rois(device, columns, dtype=torch.float32):
    """N RoIs: 25% foreground (the sampler's positive fraction), classes drawn uniformly; logits [N, columns]."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(1, C + 1, (N,), generator=gen)
    labels[torch.rand(N, generator=gen) >= 0.25] = 0
    # one pass reads the logits and writes the gradient (backward hands the saved gradient over): 2 x N x columns
    logits = (torch.randn(N, columns, generator=gen) * 2).to(device=device, dtype=dtype).requires_grad_()
    return logits, labels.to(device)


def run(run_bench, device, impl, step, logits, op=OP, columns=None):
    """`columns`: the size to report when a peer's layout has another column count (detectron2's extra one)."""
    rounds = {"eager": 3, "official": 3, "compile": 3}.get(impl) if device == "cpu" else None
    columns = logits.shape[1] if columns is None else columns
    run_bench(step, op=op, impl=impl, size=f"{N}x{columns}", dtype="float32", device=device, pass_="fwd+bwd",
              bytes_moved=2 * N * columns * logits.element_size(), rounds=rounds)


def _step(logits, fn):
    def step():
        logits.grad = None
        loss = fn()
        loss.backward()
        return loss

    return step


def test_seesaw_ltkernels(run_bench, device):
    logits, labels = make_rois(device, C + 2)
    mod = ltkernels.SeesawLoss(C).to(device)
    run(run_bench, device, "ltkernels", _step(logits, lambda: mod(logits, labels)), logits)


def test_seesaw_eager(run_bench, device):
    logits, labels = make_rois(device, C + 2)
    cum = torch.zeros(C + 1, device=device)

    def fn():
        cum.add_(ref.seesaw_counts(labels, C).to(cum))
        return ref.seesaw_loss(logits, labels, cum)

    run(run_bench, device, "eager", _step(logits, fn), logits)


def test_seesaw_official(run_bench, device):
    logits, labels = make_rois(device, C + 2)
    mod = MMDetSeesawLoss(C).to(device)
    off, weights = to_official_labels(labels, C)

    def fn():
        avg = max(torch.sum(weights > 0).float().item(), 1.0)
        parts = mod(logits, off, weights, avg_factor=avg)
        return parts["loss_cls_objectness"] + parts["loss_cls_classes"]

    run(run_bench, device, "official", _step(logits, fn), logits)


def test_seesaw_compile(run_bench, device):
    logits, labels = make_rois(device, C + 2)
    cum = torch.zeros(C + 1, device=device)
    # the reference selects the positive rows by a mask (a data-dependent shape): compiled with its graph breaks
    loss_fn = torch.compile(ref.seesaw_loss)

    def fn():
        cum.add_(ref.seesaw_counts(labels, C).to(cum))
        return loss_fn(logits, labels, cum)

    run(run_bench, device, "compile", _step(logits, fn), logits)
