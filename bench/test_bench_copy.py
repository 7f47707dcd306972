"""The bandwidth reference: a large device-local `tensor.copy_`, bytes read + written. `ltk bench` divides each op's
achieved GB/s by this figure from the same run on the same device (the "% copy BW" column)."""
import torch

from ltkernels.models.benchmarking import quick_mode


def test_copy(run_bench, device):
    # Far larger than the L2 (H100: 50 MB) or a server CPU's last-level cache, so the copy streams from memory.
    mib = {"cuda": 256, "cpu": 128}[device] // (4 if quick_mode() else 1)
    src = torch.empty(mib << 18, dtype=torch.float32, device=device).uniform_()  # never time zeros
    dst = torch.empty_like(src)
    run_bench(lambda: dst.copy_(src), op="copy", impl="torch", size=f"{mib}MiB", dtype="float32", device=device,
              pass_="fwd", bytes_moved=2 * src.nbytes)
    assert torch.equal(dst, src)
