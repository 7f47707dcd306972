"""Worker of tests/test_training.py::test_torchrun_two_processes_gloo (run under torchrun, CPU, gloo):
trains the one-stage EFL detector for a few iterations and dumps this rank's EFL buffers and weights."""
import os
import sys

import torch
import torch.distributed as dist

from ltkernels.models.configs import get_config, merge
from ltkernels.models.engine import trainer


def main():
    ann, images, out = sys.argv[1:4]
    cfg = merge(get_config("one_stage_efl"), {"data": {"min_size": 64, "max_size": 64},
                                              "solver": {"max_iter": 4, "batch_size": 2, "warmup_iters": 1},
                                              "train": {"eval": False}})
    seen = []
    stream_next = trainer.BatchStream.next

    def spy(self):
        images_, targets = stream_next(self)
        seen.append([int(t["image_id"]) for t in targets])
        return images_, targets

    trainer.BatchStream.next = spy
    res = trainer.train(cfg, ann, images, out, device="cpu", progress=False)
    efl = res["model"].cls_loss_fn
    state = {k: getattr(efl, k).clone() for k in ("pos_grad", "neg_grad", "pos_neg")}
    state["weights"] = {k: p.detach().clone() for k, p in res["model"].named_parameters()}
    state["world_size"] = dist.get_world_size()
    state["first_images"] = seen[0]
    torch.save(state, os.path.join(out, f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
