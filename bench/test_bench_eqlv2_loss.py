"""EQL v2, forward + backward with the statistics update, at the two-stage LVIS v1 size (8192 RoIs, C = 1203
classes + the background column). Peers: the eager reference in float32 (loss by autograd, statistics by a second
pass), the port of the authors' EQLv2 module, and torch.compile of the reference."""
import pytest
import torch
from test_bench_seesaw_loss import C, _step, make_rois, run

import ltkernels
from ltkernels._ext import has_op
from ltkernels.reference import eqlv2_loss as ref
from ltkernels.testing.official_ports import EQLv2, to_official_labels

pytestmark = pytest.mark.skipif(not has_op("eqlv2_loss"), reason="eqlv2_loss not built")

OP = "eqlv2_loss"


def _buffers(device):
    return torch.zeros(C, device=device), torch.zeros(C, device=device), torch.full((C,), float("inf"), device=device)


def test_eqlv2_ltkernels(run_bench, device):
    logits, labels = make_rois(device, C + 1)
    mod = ltkernels.EQLv2Loss(C).to(device)
    run(run_bench, device, "ltkernels", _step(logits, lambda: mod(logits, labels)), logits, op=OP)


def _reference_step(logits, labels, stats, loss_fn, stats_fn):
    pos_grad, neg_grad, pos_neg = stats

    def fn():
        loss = loss_fn(logits, labels, pos_neg)
        pos, neg = stats_fn(logits.detach(), labels, pos_neg)
        pos_grad.add_(pos)
        neg_grad.add_(neg)
        pos_neg.copy_(pos_grad / (neg_grad + 1e-10))
        return loss

    return fn


def test_eqlv2_eager(run_bench, device):
    logits, labels = make_rois(device, C + 1)
    fn = _reference_step(logits, labels, _buffers(device), ref.eqlv2_loss, ref.eqlv2_statistics)
    run(run_bench, device, "eager", _step(logits, fn), logits, op=OP)


def test_eqlv2_official(run_bench, device):
    logits, labels = make_rois(device, C + 1)
    mod = EQLv2(C)
    off, _ = to_official_labels(labels, C)
    run(run_bench, device, "official", _step(logits, lambda: mod(logits, off)), logits, op=OP)


def test_eqlv2_compile(run_bench, device):
    logits, labels = make_rois(device, C + 1)
    fn = _reference_step(logits, labels, _buffers(device), torch.compile(ref.eqlv2_loss, fullgraph=True),
                         torch.compile(ref.eqlv2_statistics, fullgraph=True))
    run(run_bench, device, "compile", _step(logits, fn), logits, op=OP)
