"""Balanced Group Softmax at the LVIS v0.5 two-stage size: N = 8192 RoIs (16 images x 512), K = 1236 logits
(1230 classes in 4 groups). `group_softmax_loss` forward + backward with others sampling (ratio 8), and the
inference merge `group_softmax_scores`. Peers: the eager reference (same sampling, one log_softmax per group,
autograd), the official-style per-group loop (np.random.choice, .item() syncs) and torch.compile of the reference;
for the scores the eager per-group merge and its torch.compile."""

import pytest
import torch

import ltkernels
from ltkernels._ext import has_op
from ltkernels.data import lvis_categories_path
from ltkernels.reference.group_softmax import (
    group_softmax_loss_eager,
    group_softmax_scores_reference,
    official_group_softmax_loss,
)

pytestmark = pytest.mark.skipif(not has_op("group_softmax_loss"), reason="group_softmax not built")

N = 8192
GROUPS = ltkernels.BalancedGroups.from_lvis(lvis_categories_path("v0.5"))  # groups of 294, 453, 302, 181 classes
K = GROUPS.num_logits
SIZE = f"{N}x{K}"


def dtypes(device):
    return [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])


def make_inputs(device, dtype):
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(1, GROUPS.num_classes + 1, (N,), generator=gen)
    labels[torch.rand(N, generator=gen) < 0.75] = 0  # 25% foreground RoIs, as the two-stage sampler gives
    logits = (torch.randn(N, K, generator=gen) * 2).to(device=device, dtype=dtype).requires_grad_()
    return logits, labels.to(device)


def loss_bytes(logits):
    # the floor of forward + backward: read the logits once, write their gradient once (labels negligible)
    return 2 * logits.numel() * logits.element_size() + N * 8


def _run(run_bench, device, dtype, impl, step, logits, op="group_softmax_loss", pass_="fwd+bwd", nbytes=None):
    rounds = 3 if (device == "cpu" and impl != "ltkernels") else None
    run_bench(step, op=op, impl=impl, size=SIZE, dtype=str(dtype).replace("torch.", ""), device=device,
              pass_=pass_, bytes_moved=nbytes if nbytes is not None else loss_bytes(logits), rounds=rounds)


def _loss_step(fn, logits, labels):
    def step():
        logits.grad = None
        loss = fn(logits, labels, GROUPS)
        loss.backward()
        return loss
    return step


IMPLS = {
    "ltkernels": lambda: ltkernels.group_softmax_loss,
    "eager": lambda: group_softmax_loss_eager,
    "official": lambda: official_group_softmax_loss,
    "compile": lambda: torch.compile(group_softmax_loss_eager),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_group_softmax_loss(run_bench, device, dtype, impl):
    if dtype not in dtypes(device):
        pytest.skip("bfloat16 benchmarked on CUDA only")
    torch._dynamo.reset()
    logits, labels = make_inputs(device, dtype)
    _run(run_bench, device, dtype, impl, _loss_step(IMPLS[impl](), logits, labels), logits)


SCORES_IMPLS = {
    "ltkernels": lambda: ltkernels.group_softmax_scores,
    "eager": lambda: group_softmax_scores_reference,
    "compile": lambda: torch.compile(group_softmax_scores_reference),
}


@pytest.mark.parametrize("impl", list(SCORES_IMPLS))
def test_group_softmax_scores(run_bench, device, impl):
    dtype = torch.float32
    torch._dynamo.reset()
    logits, _ = make_inputs(device, dtype)
    x = logits.detach()
    fn = SCORES_IMPLS[impl]()
    nbytes = x.numel() * x.element_size() + N * (GROUPS.num_classes + 1) * x.element_size()
    _run(run_bench, device, dtype, impl, lambda: fn(x, GROUPS), x, op="group_softmax_scores", pass_="fwd",
         nbytes=nbytes)
