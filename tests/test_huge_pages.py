"""Large fresh CPU outputs are asked for transparent huge pages before their first write (csrc/cpu/huge_pages.h):
the output's mapping then holds huge pages where the system's THP mode is "madvise" (with "always" it would anyway,
with "never" it cannot)."""
import os
import re

import pytest
import torch

import ltkernels

THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode():
    try:
        with open(THP) as f:
            return re.search(r"\[(\w+)\]", f.read()).group(1)
    except (OSError, AttributeError):
        return None


def _anon_huge_kib(ptr: int) -> int:
    """AnonHugePages of the mapping of this process that holds address `ptr`."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if head:
                inside = int(head.group(1), 16) <= ptr < int(head.group(2), 16)
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    raise AssertionError(f"no mapping holds {ptr:#x}")


def _outputs():
    n, c = 9000, 1203  # 43 MB of float32: above the 32 MiB threshold
    logits, labels = torch.randn(n, c), torch.randint(0, c + 1, (n,))
    masks, boxes = torch.rand(60, 28, 28), torch.tensor([[0.0, 0.0, 1300.0, 790.0]]).repeat(60, 1)
    groups = ltkernels.BalancedGroups.from_instance_counts([1, 5, 50, 500] * 300)
    bags_logits = torch.randn(8192, groups.num_logits)
    return {
        "paste_masks": lambda: ltkernels.paste_masks(masks, boxes, (800, 1333)),  # 64 MB of bool
        "equalized_focal_loss backward": lambda: torch.autograd.grad(
            ltkernels.equalized_focal_loss(logits.requires_grad_(), labels), logits)[0],
        "group_softmax_scores": lambda: ltkernels.group_softmax_scores(bags_logits, groups),
    }


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps") or _thp_mode() != "madvise",
                    reason="needs Linux with transparent huge pages in 'madvise' mode")
@pytest.mark.parametrize("name", list(_outputs()))
def test_large_fresh_outputs_get_huge_pages(name):
    out = _outputs()[name]()
    assert out.nbytes > 32 << 20
    # the advised range starts at the first 2 MiB boundary inside the output: look in its middle
    assert _anon_huge_kib(out.data_ptr() + out.nbytes // 2) >= 2048, f"{name}: its output holds no huge page"
    if os.environ.get("THP_MEM_ALLOC_ENABLE") != "1":  # the control: a plain allocation of that size has none
        plain = torch.empty(out.nbytes, dtype=torch.uint8)
        plain.fill_(1)
        assert _anon_huge_kib(plain.data_ptr() + plain.nbytes // 2) == 0
