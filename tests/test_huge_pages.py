"""Large fresh CPU outputs are asked for transparent huge pages before their first write (csrc/cpu/huge_pages.h):
the output's mapping then holds huge pages where the system's THP mode is "madvise" (with "always" it would anyway,
with "never" it cannot). Checked in a fresh process: in a long one the allocator may hand out memory whose pages
were faulted in before (no first touch left to speed up)."""
import json
import os
import re
import subprocess
import sys

import pytest

THP = "/sys/kernel/mm/transparent_hugepage/enabled"

SCRIPT = r'''
import json, re, sys
import torch
import ltkernels

def anon_huge_kib(t):
    ptr = t.data_ptr() + t.nbytes // 2  # the advised range starts at the first 2 MiB boundary inside the tensor
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if head:
                inside = int(head.group(1), 16) <= ptr < int(head.group(2), 16)
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return -1

name = sys.argv[1]
if name == "paste_masks":
    masks, boxes = torch.rand(60, 28, 28), torch.tensor([[0.0, 0.0, 1300.0, 790.0]]).repeat(60, 1)
    out = ltkernels.paste_masks(masks, boxes, (800, 1333))  # 64 MB of bool
elif name == "equalized_focal_loss":
    logits = torch.randn(9000, 1203, requires_grad=True)  # a 43 MB gradient
    out = torch.autograd.grad(ltkernels.equalized_focal_loss(logits, torch.randint(0, 1204, (9000,))), logits)[0]
elif name == "group_softmax_scores":
    groups = ltkernels.BalancedGroups.from_instance_counts([1, 5, 50, 500] * 300)
    out = ltkernels.group_softmax_scores(torch.randn(8192, groups.num_logits), groups)
plain = torch.empty(out.nbytes, dtype=torch.uint8)  # the control: an ordinary allocation of that size
plain.fill_(1)
print(json.dumps({"bytes": out.nbytes, "output": anon_huge_kib(out), "plain": anon_huge_kib(plain)}))
'''


def _thp_mode():
    try:
        with open(THP) as f:
            return re.search(r"\[(\w+)\]", f.read()).group(1)
    except (OSError, AttributeError):
        return None


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps") or _thp_mode() != "madvise",
                    reason="needs Linux with transparent huge pages in 'madvise' mode")
@pytest.mark.parametrize("name", ["paste_masks", "equalized_focal_loss", "group_softmax_scores"])
def test_large_fresh_outputs_get_huge_pages(name):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, name], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["bytes"] > 32 << 20
    assert got["output"] >= 2048, f"{name}: its output holds no huge page ({got})"
    assert got["plain"] == 0, f"the control allocation holds huge pages: the check cannot tell ({got})"
