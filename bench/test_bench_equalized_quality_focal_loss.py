"""Equalized Quality Focal Loss, forward + backward + statistics update, at the one-stage LVIS v1 size (the EFL
benchmark's inputs plus an IoU per row). Peers: the eager reference (the official code path: soft targets, BCE,
pow, autograd, statistics from the logits' gradient by a hook) and torch.compile of it."""
import pytest
import torch
from test_bench_equalized_focal_loss import C, _run, dtypes, make_inputs

import ltkernels
from ltkernels._ext import has_op
from ltkernels.reference.equalized_focal_loss import efl_statistics
from ltkernels.reference.equalized_quality_focal_loss import EqualizedQualityFocalLossReference
from ltkernels.reference.equalized_quality_focal_loss import equalized_quality_focal_loss as ref_loss

pytestmark = pytest.mark.skipif(not has_op("equalized_quality_focal_loss"), reason="EQFL not built")

OP = "equalized_quality_focal_loss"


def make_quality(logits):
    gen = torch.Generator().manual_seed(1)
    return torch.rand(logits.shape[0], generator=gen).to(logits.device)


def _run_module(run_bench, device, dtype, impl, module_cls):
    if dtype not in dtypes(device):
        pytest.skip("bfloat16 benchmarked on CUDA only")
    logits, labels = make_inputs(device, dtype)
    quality = make_quality(logits)
    mod = module_cls(C).to(device)

    def step():
        logits.grad = None
        loss = mod(logits, labels, quality)
        loss.backward()
        return loss

    _run(run_bench, device, dtype, impl, step, logits, op=OP)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_eqfl_ltkernels(run_bench, device, dtype):
    _run_module(run_bench, device, dtype, "ltkernels", ltkernels.EqualizedQualityFocalLoss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_eqfl_eager(run_bench, device, dtype):
    _run_module(run_bench, device, dtype, "eager", EqualizedQualityFocalLossReference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_eqfl_compile(run_bench, device, dtype):
    if dtype not in dtypes(device):
        pytest.skip("bfloat16 benchmarked on CUDA only")
    logits, labels = make_inputs(device, dtype)
    quality = make_quality(logits)
    mod = EqualizedQualityFocalLossReference(C).to(device)
    loss_fn = torch.compile(ref_loss, fullgraph=True)
    stats_fn = torch.compile(efl_statistics, fullgraph=True)

    def step():
        logits.grad = None
        loss = loss_fn(logits, labels, quality, mod.pos_neg)
        loss.backward()
        pos, neg = stats_fn(logits.grad, labels)
        mod.pos_grad += pos
        mod.neg_grad += neg
        mod.pos_neg.copy_(torch.clamp(mod.pos_grad / (mod.neg_grad + 1e-10), 0, 1))
        return loss

    _run(run_bench, device, dtype, "compile", step, logits, op=OP)
