"""RoIAlign at the Mask R-CNN box-head size: 2 images x 512 RoIs, 256 channels, one FPN level of [2, 256, 50, 68]
(stride 16 of an 800 x 1088 batch), 7 x 7 output, sampling_ratio 2, aligned=True; forward and forward + backward.
Peers: torchvision.ops.roi_align, and the pure-PyTorch reference ("eager", on CUDA only: on CPU its dense
per-RoI weight matrices take seconds per call at this size).

bytes_moved is a floor, not a traffic count: RoIAlign gathers, so it is not bandwidth-bound, but every feature pixel
some sample touches must be read once, the boxes read and the output written; the backward adds the output gradient
read and the whole input gradient written. The touched pixels are counted exactly from the boxes (their union per
image x channels).
"""
import pytest
import torch
import torchvision

import ltkernels
from ltkernels._ext import has_op
from ltkernels.models.benchmarking import quick_mode
from ltkernels.reference.roi_align import _axis_weights, roi_align_reference

pytestmark = pytest.mark.skipif(not has_op("roi_align"), reason="roi_align not built")

OP = "roi_align"
N, C, H, W, STRIDE = 2, 256, 50, 68, 16
OUT, SAMPLING, ALIGNED = 7, 2, True


def rois_per_image():
    return 64 if quick_mode() else 512


def make_inputs(device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    k = rois_per_image() * N
    img = torch.tensor([W * STRIDE, H * STRIDE], dtype=torch.float32)
    centre = torch.rand(k, 2, generator=gen) * img
    size = (torch.rand(k, 2, generator=gen) * 0.3 + 0.05) * img.mean() / 2  # 20 to 150 px: the level-4 range
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    batch = torch.arange(k).div(rois_per_image(), rounding_mode="floor").float()
    rois = torch.cat([batch[:, None], boxes], dim=1).to(device)
    x = torch.randn(N, C, H, W, generator=gen).to(device=device, dtype=dtype)
    return x, rois


def size_str():
    return f"{N}x{rois_per_image()}rois,{C}x{H}x{W}->{OUT}x{OUT}"


def bytes_moved(x, rois, pass_):
    """Touched feature pixels (read once) + boxes + output; fwd+bwd adds grad output read and grad input written."""
    r = rois.double().cpu()
    scale, off = 1.0 / STRIDE, 0.5 if ALIGNED else 0.0
    start_w, start_h = r[:, 1] * scale - off, r[:, 2] * scale - off
    bin_w = (r[:, 3] * scale - off - start_w) / OUT
    bin_h = (r[:, 4] * scale - off - start_h) / OUT
    grid = torch.full((r.shape[0],), SAMPLING, dtype=torch.long)
    rows = _axis_weights(start_h, bin_h, grid, OUT, H).ne(0).any(1)  # [K, H]
    cols = _axis_weights(start_w, bin_w, grid, OUT, W).ne(0).any(1)  # [K, W]
    touched = torch.zeros(N, H, W, dtype=torch.bool)
    for n in range(N):
        sel = r[:, 0] == n
        touched[n] = (rows[sel, :, None] & cols[sel, None, :]).any(0)
    elt = x.element_size()
    out_bytes = r.shape[0] * C * OUT * OUT * elt
    fwd = int(touched.sum()) * C * elt + rois.numel() * rois.element_size() + out_bytes
    return fwd if pass_ == "fwd" else fwd + out_bytes + x.numel() * elt


IMPLS = {
    "ltkernels": ltkernels.roi_align,
    "torchvision": torchvision.ops.roi_align,
    "eager": lambda x, rois, *a: roi_align_reference(x, rois, *a, compute_dtype=None),
}


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_roi_align(run_bench, device, impl, pass_):
    if impl == "eager" and device == "cpu":
        pytest.skip("the eager reference takes seconds per call on CPU at this size")
    x, rois = make_inputs(device)
    fn = IMPLS[impl]
    args = (OUT, 1.0 / STRIDE, SAMPLING, ALIGNED)
    if pass_ == "fwd":
        step = lambda: fn(x, rois, *args)  # noqa: E731
    else:
        x.requires_grad_()
        grad = torch.randn(rois.shape[0], C, OUT, OUT, device=device)

        def step():
            x.grad = None
            out = fn(x, rois, *args)
            out.backward(grad)
            return out
    # torchvision's CPU kernel is single-threaded and takes seconds for fwd+bwd: a few rounds suffice
    rounds = 3 if (device == "cpu" and impl != "ltkernels") else None
    out = run_bench(step, op=OP, impl=impl, size=size_str(), dtype="float32", device=device, pass_=pass_,
                    bytes_moved=bytes_moved(x, rois, pass_), rounds=rounds)
    if impl != "ltkernels" and out is not None:  # the timed peers computed the same thing
        torch.testing.assert_close(out, ltkernels.roi_align(x.detach(), rois, *args), rtol=1e-4, atol=1e-4)
