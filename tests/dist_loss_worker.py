"""torchrun worker for the distributed tests of tests/test_seesaw_loss.py and tests/test_eqlv2_loss.py (gloo, CPU).

Usage: dist_loss_worker.py <out> <mode>, mode "seesaw" or "eqlv2". Both ranks draw the same fixed sequence of
float64 batches; each trains a fresh module (SeesawLoss / EQLv2Loss) on its half of every batch with the default
normalizer and saves to <out>/<mode><rank>.pt the batches and, per step, its loss, its gradient and the module's
buffers after the step, so the test can replay the whole batches in one process.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import ltkernels


def make_batches(c: int, cols: int, n: int, steps: int = 3):
    gen = torch.Generator().manual_seed(4321)
    freq = 1.0 / torch.arange(1, c + 1, dtype=torch.float64) ** 1.2
    batches = []
    for _ in range(steps):
        labels = torch.multinomial(freq, n, replacement=True, generator=gen) + 1
        r = torch.rand(n, generator=gen)
        labels[r < 0.5] = 0
        labels[r < 0.1] = -1
        logits = torch.randn(n, cols, generator=gen, dtype=torch.float64) * 2.5
        batches.append((logits, labels))
    return batches


def main(out: Path, mode: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    c, n = 9, 2 * 45
    if mode == "seesaw":
        mod = ltkernels.SeesawLoss(c)
        batches = make_batches(c, c + 2, n)
    elif mode == "eqlv2":
        mod = ltkernels.EQLv2Loss(c).double()
        batches = make_batches(c, c + 1, n)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    per_rank = n // world
    steps = []
    for logits, labels in batches:
        sl = slice(rank * per_rank, (rank + 1) * per_rank)
        x = logits[sl].clone().requires_grad_()
        loss = mod(x, labels[sl])
        loss.backward()
        steps.append({"loss": loss.detach(), "grad": x.grad,
                      **{k: v.clone() for k, v in mod.state_dict().items()}})
    torch.save({"batches": batches, "steps": steps}, out / f"{mode}{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
