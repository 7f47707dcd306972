"""The CPU emulation of the CUDA execution model itself: what its intrinsics return, and that every misuse it claims
to catch (races a missing barrier leaves, divergent barriers, bad warp masks, deadlocks, device asserts, invalid
launches) fails with an error that names the kernel, the block, the thread and the source line."""
import pytest
import torch

import ltkernels
from ltkernels.testing import cuda_emulation as emulation

from conftest import EMULATION

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not EMULATION, reason="this build has no CUDA emulation")]


def selftest(name, x=None, order="forward", seed=0):
    x = torch.zeros(64) if x is None else x
    with emulation.cuda_emulation(order=order, seed=seed):
        return torch.ops.ltkernels_emu._selftest(name, x)


@pytest.mark.parametrize("order", emulation.ORDERS)
def test_block_reduction_with_barriers_is_exact_in_every_order(order):
    x = torch.randint(-50, 50, (128,)).float()  # integers: the sum is exact in any association
    assert selftest("block_sum", x, order).item() == x.sum().item()


def test_missing_barriers_are_caught_by_some_order():
    x = torch.randint(-50, 50, (128,)).float()
    results = [selftest("block_sum_no_barriers", x, order, seed=1).item() for order in emulation.ORDERS]
    assert any(r != x.sum().item() for r in results)  # NaN (poisoned shared memory) or a wrong sum


@pytest.mark.parametrize("arg,width", [(1, 32), (3, 32), (5, 8), (17, 32), (2, 4), (0, 16)])
def test_warp_shuffles_and_votes(arg, width):
    x = torch.randn(32)
    out = selftest(f"warp_ops:{arg}:{width}", x, order="random", seed=arg)
    lane = torch.arange(32)
    base = lane // width * width
    idx = base + arg % width
    up = torch.where(lane - arg >= base, lane - arg, lane)
    down = torch.where(lane + arg < base + width, lane + arg, lane)
    xor = torch.where((lane ^ arg) < base + width, lane ^ arg, lane)
    for row, src in enumerate((idx, up, down, xor)):
        assert torch.equal(out[row], x[src]), row
    pos = x > 0
    ballot = int(sum(1 << i for i in range(32) if pos[i]))
    assert (out[4] == ballot & 0xFFFF).all() and (out[5] == ballot >> 16).all()
    assert (out[6] == float(pos.any())).all() and (out[7] == float(pos.all())).all()
    assert (out[8] == pos.sum()).all() and (out[9] == float(pos.any())).all() and (out[10] == float(pos.all())).all()


@pytest.mark.parametrize("name,message", [
    ("divergent_barrier", r"barrier divergence: exited while other threads wait at __syncthreads at "
                          r".*selftest\.cu:\d+"),
    ("early_exit", r"thread \(5,0,0\): barrier divergence: exited"),
    ("mask_leaves_out_caller", r"thread \(0,0,0\): __shfl_xor_sync at .*selftest\.cu:\d+: the mask leaves out"),
    ("mask_names_missing_lane", r"the mask names lane 16, which the block does not have"),
    ("deadlock", r"deadlock: no sync point can complete"),
    ("too_many_threads", r"invalid launch of divergent_barrier_kernel at .*selftest\.cu:\d+: block \(2048,1,1\)"),
    ("zero_grid", r"grid \(0,1,1\) has a zero dimension"),
    ("too_much_shared", r"65536 B of dynamic shared memory exceed 48 KiB"),
])
def test_misuse_is_an_error_naming_kernel_block_thread_line(name, message):
    with pytest.raises(RuntimeError, match=message) as info:
        selftest(name)
    assert "CUDA emulation" in str(info.value)


def test_device_assert_names_condition_and_thread():
    x = torch.zeros(64)
    x[7] = -1
    with pytest.raises(RuntimeError, match=r"block \(0,0,0\), thread \(7,0,0\): device-side assertion "
                                           r"`x\[threadIdx.x\] >= 0 && \"x must be >= 0\"` failed"):
        selftest("assert", x)
    selftest("assert", torch.zeros(64))  # and a passing assert is silent


def test_shared_memory_is_poisoned_before_each_block():
    assert torch.isnan(selftest("dynamic_shared")[:32]).all()


def test_real_kernel_assert_is_caught():
    """A label out of range that bypasses the Python checks reaches the BAGS kernel's device assert."""
    x = torch.randn(4, 6)
    offsets = torch.tensor([0, 2, 6])
    with emulation.cuda_emulation(), pytest.raises(RuntimeError, match="device-side assertion `labels"):
        torch.ops.ltkernels.group_softmax_loss(x, torch.tensor([0, 1, 9, 0]), torch.ones(2, 4, dtype=torch.bool),
                                               torch.ones(2), torch.zeros(4, 2, dtype=torch.int64), offsets)


def test_mode_routes_kernels_and_restores_config():
    before = emulation.stats()["launches"]
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    with emulation.cuda_emulation(order="reverse", seed=4, sms=7):
        assert emulation._require().config() == {"order": "reverse", "seed": 4, "sms": 7}
        keep = ltkernels.nms(boxes, scores, 0.5)
    assert emulation.stats()["launches"] >= before + 2  # the mask and the reduction kernels ran
    assert keep.tolist() == [0, 2]
    assert emulation._require().config()["order"] == "forward"
    ltkernels.nms(boxes, scores, 0.5)  # outside the mode: the CPU kernel, no launch
    assert emulation.stats()["launches"] == before + 2


def test_bad_configuration():
    with pytest.raises(ValueError, match="order must be one of"):
        emulation.cuda_emulation(order="sideways")
    with pytest.raises(ValueError, match="sms must be an int in 1..1024"):
        emulation.cuda_emulation(sms=0)
