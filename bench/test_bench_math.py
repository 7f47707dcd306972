"""The vectorised maths of the CPU loss kernels alone: exp (of a non-positive argument) and log1p (of [0, 1]), the
functions that bound the sigmoid losses on CPU, as ltkernels evaluates them (csrc/fast_math.h, in registers on an
L1-resident block: `torch.ops.ltkernels._math_floor`) against ATen's vectorised SLEEF functions (`torch.exp` /
`torch.log1p` over a cache-resident 1 MiB block, out= in place), for the element count of the EFL benchmark."""
import pytest
import torch

from ltkernels._ext import has_op
from ltkernels.models.benchmarking import quick_mode

pytestmark = pytest.mark.skipif(not has_op("_math_floor"), reason="_math_floor not built")

ATEN_BLOCK = 1 << 18  # 1 MiB of float32: cache-resident, few enough calls that their overhead stays small


def elements():
    return (2_000 if quick_mode() else 20_000) * 1203


def aten_loop(fn, n, low, high):
    x = torch.empty(ATEN_BLOCK).uniform_(low, high)
    y = torch.empty_like(x)
    reps = max(1, n // ATEN_BLOCK)

    def step():
        for _ in range(reps):
            fn(x, out=y)
        return y

    return step


@pytest.mark.parametrize("impl", ["ltkernels", "aten"])
@pytest.mark.parametrize("fn", ["exp", "log1p"])
def test_math(run_bench, device, fn, impl):
    if device != "cpu":
        pytest.skip("the CPU kernels' maths")
    n = elements()
    if impl == "ltkernels":
        def step():
            return torch.ops.ltkernels._math_floor(n, fn)
    else:
        step = aten_loop(getattr(torch, fn), n, *((-8.0, 0.0) if fn == "exp" else (0.0, 1.0)))
    run_bench(step, op=fn, impl=impl, size=f"{n}", dtype="float32", device=device, pass_="fwd")
