"""torchrun worker for tests/test_equalized_focal_loss.py::test_distributed_two_ranks (gloo, CPU).

Each rank trains an EqualizedFocalLoss on its half of a fixed sequence of batches (default normalizer, i.e. the
positives summed over ranks / world size) and saves its buffers to <out>/rank<r>.pt; rank 0 also saves the full
batches so the test can replay them in one process.

With a second argument "sparse" each rank instead runs EFL and EQFL on steps with 0 and 1 positive rows in total
(fewer than the ranks) and saves its losses, gradients and the batches to <out>/sparse<r>.pt: the default
normalizer must be the official max(positives summed over ranks, 1) / world size.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import ltkernels


def sparse(out: Path, rank: int, world: int) -> None:
    gen = torch.Generator().manual_seed(99 + rank)
    n, c = 40, 5
    results = []
    for total_pos in (0, 1):
        labels = torch.zeros(n, dtype=torch.long)
        labels[::7] = -1
        if total_pos == 1 and rank == 0:
            labels[3] = 2
        logits = torch.randn(n, c, generator=gen, dtype=torch.float64) * 2
        quality = torch.rand(n, generator=gen, dtype=torch.float64)
        step = {"labels": labels, "logits": logits, "quality": quality, "total_pos": total_pos}
        for name, mod, extra in (("efl", ltkernels.EqualizedFocalLoss(c).double(), ()),
                                 ("eqfl", ltkernels.EqualizedQualityFocalLoss(c).double(), (quality,))):
            x = logits.clone().requires_grad_()
            loss = mod(x, labels, *extra)
            loss.backward()
            step[name] = {"loss": loss.detach(), "grad": x.grad, "pos_grad": mod.pos_grad.clone(),
                          "neg_grad": mod.neg_grad.clone()}
        results.append(step)
    torch.save(results, out / f"sparse{rank}.pt")


def main(out: Path, mode: str = "") -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if mode == "sparse":
        sparse(out, rank, world)
        dist.barrier()
        dist.destroy_process_group()
        return
    gen = torch.Generator().manual_seed(1234)
    n, c = 2 * 90, 12
    batches = []
    for _ in range(3):
        labels = torch.randint(1, c + 1, (n,), generator=gen)
        r = torch.rand(n, generator=gen)
        labels[r < 0.6] = 0
        labels[r < 0.1] = -1
        logits = torch.randn(n, c, generator=gen, dtype=torch.float64) * 3 - 1
        batches.append((logits, labels))
    mod = ltkernels.EqualizedFocalLoss(c).double()
    per_rank = n // world
    for logits, labels in batches:
        sl = slice(rank * per_rank, (rank + 1) * per_rank)
        x = logits[sl].clone().requires_grad_()
        loss = mod(x, labels[sl])
        loss.backward()
    torch.save({k: v.clone() for k, v in mod.state_dict().items()}, out / f"rank{rank}.pt")
    if rank == 0:
        torch.save(batches, out / "batches.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
