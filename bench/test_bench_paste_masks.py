"""Mask pasting at LVIS inference size: 300 detections with 28 x 28 mask probabilities pasted into an 800 x 1333
image (bool output). Peers: torchvision's `paste_masks_in_image` (a Python loop over masks: one interpolate, one
float image and one copy per mask, then a stack) followed by the threshold, and `ltkernels.paste_masks` into a
caller's preallocated buffer ("ltkernels-out", no fresh allocation). Boxes: LVIS-like sizes (8 to 400 px), some
crossing the border.

bytes_moved: the output written (K x H x W bytes) plus the masks and boxes read: pasting is bound by the write.
"""
import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

import ltkernels
from ltkernels._ext import has_op
from ltkernels.models.benchmarking import quick_mode

pytestmark = pytest.mark.skipif(not has_op("paste_masks"), reason="paste_masks not built")

OP = "paste_masks"
M, H, W = 28, 800, 1333


def num_masks():
    return 50 if quick_mode() else 300


def make_inputs(device):
    gen = torch.Generator().manual_seed(0)
    k = num_masks()
    centre = torch.rand(k, 2, generator=gen) * torch.tensor([W, H])
    size = torch.exp(torch.empty(k, 2).uniform_(2.0, 6.0, generator=gen))  # 7 to 400 px
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    masks = torch.rand(k, M, M, generator=gen)
    return masks.to(device), boxes.to(device)


def size_str():
    return f"{num_masks()}x{M}x{M}->{H}x{W}"


def bytes_moved(masks, boxes):
    return masks.shape[0] * H * W + masks.numel() * masks.element_size() + boxes.numel() * boxes.element_size()


@pytest.mark.parametrize("impl", ["ltkernels", "ltkernels-out", "torchvision"])
def test_paste_masks(run_bench, device, impl):
    masks, boxes = make_inputs(device)
    if impl == "ltkernels":
        fn = lambda: ltkernels.paste_masks(masks, boxes, (H, W), 0.5)  # noqa: E731
    elif impl == "ltkernels-out":
        buffer = torch.empty(masks.shape[0], H, W, dtype=torch.bool, device=device)
        fn = lambda: ltkernels.paste_masks(masks, boxes, (H, W), 0.5, out=buffer)  # noqa: E731
    else:
        fn = lambda: paste_masks_in_image(masks[:, None], boxes, (H, W))[:, 0] > 0.5  # noqa: E731
    out = run_bench(fn, op=OP, impl=impl, size=size_str(), dtype="float32", device=device, pass_="fwd",
                    bytes_moved=bytes_moved(masks, boxes), rounds=3 if impl == "torchvision" else None)
    if impl == "ltkernels":
        ref = paste_masks_in_image(masks[:, None], boxes, (H, W))[:, 0] > 0.5
        assert (out != ref).float().mean() < 1e-6  # only rounding at the threshold may differ
