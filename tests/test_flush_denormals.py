"""The float32 CPU loss kernels flush subnormals to zero while they run (csrc/cpu/flush_denormals.h): on inputs whose
power term and gradient pass through the subnormal range they stay within the float32 tolerance of the float64
reference, and the calling thread's floating-point mode is what it was before, after a success and after an error."""
import pytest
import torch

import ltkernels
from ltkernels.reference.equalized_focal_loss import equalized_focal_loss as ref_loss

SUBNORMAL = 1e-40  # representable only as a float32 subnormal


def _subnormals_survive() -> bool:
    return float(torch.tensor([SUBNORMAL]) * torch.tensor([1.0])) != 0.0


def _underflowing_batch(n=400, c=300):
    """Logits whose negatives sit at -log(1 - p_t) ~ 8..14: at gamma = 10 the power (1 - p_t)^gamma underflows
    through the subnormals, and 1 / normalizer pushes small gradients below 2^-126."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(n, c, generator=gen, dtype=torch.float64) * 2 - 10
    labels = torch.randint(0, c + 1, (n,), generator=gen)
    return logits, labels


def test_the_underflowing_range_matches_the_float64_reference():
    logits, labels = _underflowing_batch()
    pos_neg = torch.zeros(logits.shape[1])  # gamma = 2 + 8 = 10 for every class
    x32 = logits.float().requires_grad_()
    loss = ltkernels.equalized_focal_loss(x32, labels, pos_neg=pos_neg, normalizer=1e4)
    loss.backward()
    x64 = logits.clone().requires_grad_()
    want = ref_loss(x64, labels, pos_neg.double(), normalizer=1e4)
    want.backward()
    assert (x64.grad.abs() < 1.2e-38).any() and (x64.grad.abs() > 0).any(), "the batch must reach the subnormals"
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-5 * x64.grad.abs().max().item())


@pytest.mark.parametrize("flush", [False, True])
def test_the_callers_mode_is_restored(flush):
    if flush and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        before = _subnormals_survive()
        assert before == (not flush)
        logits, labels = _underflowing_batch(64, 50)
        x = logits.float().requires_grad_()
        ltkernels.equalized_focal_loss(x, labels, pos_neg=torch.zeros(50)).backward()
        assert _subnormals_survive() == before
        groups = ltkernels.BalancedGroups.from_instance_counts([1, 5, 50, 500] * 3)
        ltkernels.group_softmax_scores(torch.randn(8, groups.num_logits), groups)
        assert _subnormals_survive() == before
        with pytest.raises(Exception, match="labels"):
            ltkernels.equalized_focal_loss(x, torch.full((64,), 999), validate=False)
        assert _subnormals_survive() == before
    finally:
        torch.set_flush_denormal(False)
