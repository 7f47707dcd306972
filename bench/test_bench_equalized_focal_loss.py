"""Equalized Focal Loss, forward + backward + statistics update, at the one-stage LVIS v1 size (C = 1203 classes,
N = anchors of a batch: 20k on CPU, 200k on GPU). Peers: the eager reference (the official code path: one-hot,
sigmoid, pow, log, autograd, statistics from the logits' gradient by a hook) and torch.compile of it."""
import pytest
import torch

import ltkernels
from ltkernels._ext import has_op
from ltkernels.reference.equalized_focal_loss import EqualizedFocalLossReference, efl_statistics
from ltkernels.reference.equalized_focal_loss import equalized_focal_loss as ref_loss

pytestmark = pytest.mark.skipif(not has_op("equalized_focal_loss"), reason="equalized_focal_loss not built")

C = 1203
N = {"cpu": 20_000, "cuda": 200_000}
OP = "equalized_focal_loss"


def dtypes(device):
    return [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])


def make_inputs(device, dtype):
    n = N[device]
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(1, C + 1, (n,), generator=gen)
    r = torch.rand(n, generator=gen)
    labels[r < 0.97] = 0  # ~3% positive anchors
    labels[r < 0.05] = -1
    logits = (torch.randn(n, C, generator=gen) * 2 - 4).to(device=device, dtype=dtype).requires_grad_()
    return logits, labels.to(device)


def bytes_moved(logits):
    # a training step must read the logits once and write their gradient once (bench/NOTES.md: each input read once,
    # each output written once); labels are negligible
    return 2 * logits.numel() * logits.element_size() + 2 * logits.shape[0] * 8


def size_str(device):
    return f"{N[device]}x{C}"


def _run(run_bench, device, dtype, impl, step, logits, op=OP):
    # on CPU the eager peer takes seconds per step: one timed round (after the warm-ups) is enough for a 10x gap
    rounds = {"eager": 1, "compile": 3}.get(impl) if device == "cpu" else None
    run_bench(step, op=op, impl=impl, size=size_str(device), dtype=str(dtype).replace("torch.", ""), device=device,
              pass_="fwd+bwd", bytes_moved=bytes_moved(logits), rounds=rounds)


def _run_module(run_bench, device, dtype, impl, module_cls):
    """Forward + backward through a loss module that updates its own statistics (ours and the eager reference)."""
    if dtype not in dtypes(device):
        pytest.skip("bfloat16 benchmarked on CUDA only")
    logits, labels = make_inputs(device, dtype)
    mod = module_cls(C).to(device)

    def step():
        logits.grad = None
        loss = mod(logits, labels)
        loss.backward()
        return loss

    _run(run_bench, device, dtype, impl, step, logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_efl_ltkernels(run_bench, device, dtype):
    _run_module(run_bench, device, dtype, "ltkernels", ltkernels.EqualizedFocalLoss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_efl_eager(run_bench, device, dtype):
    _run_module(run_bench, device, dtype, "eager", EqualizedFocalLossReference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_efl_compile(run_bench, device, dtype):
    if dtype not in dtypes(device):
        pytest.skip("bfloat16 benchmarked on CUDA only")
    logits, labels = make_inputs(device, dtype)
    mod = EqualizedFocalLossReference(C).to(device)
    loss_fn = torch.compile(ref_loss, fullgraph=True)
    stats_fn = torch.compile(efl_statistics, fullgraph=True)

    def step():
        logits.grad = None
        loss = loss_fn(logits, labels, mod.pos_neg)
        loss.backward()
        pos, neg = stats_fn(logits.grad, labels)
        mod.pos_grad += pos
        mod.neg_grad += neg
        mod.pos_neg.copy_(torch.clamp(mod.pos_grad / (mod.neg_grad + 1e-10), 0, 1))
        return loss

    _run(run_bench, device, dtype, "compile", step, logits)


def test_efl_floor(run_bench, device):
    """The compute floor beside the copy-bandwidth floor: what the formula's maths alone cost for the benchmark's
    elements (per element 2 exp, 1 log1p and 1 division for the loss and its gradient, in registers, the kernels'
    own vectorised functions; csrc/cpu/math_floor.cpp). On CPU the loss is bound by these, not by memory."""
    if device != "cpu" or not has_op("_math_floor"):
        pytest.skip("the compute floor is measured on CPU")
    logits, _ = make_inputs(device, torch.float32)
    n = logits.numel()
    _run(run_bench, device, torch.float32, "floor", lambda: torch.ops.ltkernels._math_floor(n, "efl"), logits)
