"""The training engine: iteration-based SGD with linear warm-up and step decay, AMP on CUDA, gradient clipping,
repeat factor sampling (or SimCal's bi-level sampling), periodic checkpoints with exact resume, evaluation at the
end with the LVIS API. Runs single-process or under `torchrun` (DistributedDataParallel, NCCL/gloo)."""
from __future__ import annotations

import bisect
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..detectors import build_model
from . import distributed as du
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_dataset(ann_file: str, image_root: str, data_cfg: dict, train: bool):
    from ..data.lvis import DetectionTransform, LVISDetection

    tf = DetectionTransform(data_cfg["min_size"], data_cfg["max_size"], data_cfg["flip_prob"] if train else 0.0,
                            data_cfg["mean"], data_cfg["std"])
    return LVISDetection(ann_file, image_root, transforms=tf)


def dataset_instance_counts(dataset) -> list:
    """Training instances per class, index c - 1 for label c."""
    counts = dataset.instance_counts
    if isinstance(counts, dict):
        return [int(counts.get(c, 0)) for c in range(1, dataset.num_classes + 1)]
    counts = [int(n) for n in counts]
    return counts[1:] if len(counts) == dataset.num_classes + 1 else counts


def lr_factor(solver: dict):
    """Linear warm-up from `warmup_factor`, then x`gamma` at each step (steps < 1 are fractions of max_iter)."""
    max_iter, warm, wf = solver["max_iter"], solver.get("warmup_iters", 0), solver.get("warmup_factor", 0.001)
    steps = sorted(int(round(s * max_iter)) if s < 1 else int(s) for s in solver.get("steps", []))
    gamma = solver.get("gamma", 0.1)

    def factor(it: int) -> float:
        w = 1.0 if it >= warm else wf + (1.0 - wf) * it / warm
        return w * gamma ** bisect.bisect_right(steps, it)

    return factor


def _to_device(targets: list, device: torch.device) -> list:
    return [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]


class _Items(torch.utils.data.Dataset):
    """Dataset view for sampler items: plain image indices, or SimCal's (image index, drawn class) pairs."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        if isinstance(item, (tuple, list)):
            image, target = self.dataset[int(item[0])]
            target["sample_class"] = int(item[1])
            return image, target
        return self.dataset[int(item)]


def _collate(batch):
    return [b[0] for b in batch], [b[1] for b in batch]


class BatchStream:
    """Endless batches: each epoch's order comes from the sampler (`set_epoch(e)`; deterministic in the seed and
    the epoch), cut into batches. The position `{"epoch", "index"}` (index = items of the epoch consumed by this
    rank) is all an exact resume needs."""

    def __init__(self, dataset, sampler, batch_size: int, workers: int = 0, shard: bool = False):
        self.items, self.sampler, self.batch_size, self.workers = _Items(dataset), sampler, batch_size, workers
        self.shard = shard
        self.epoch, self.index, self._iter = 0, 0, None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self._iter = int(state["epoch"]), int(state["index"]), None

    def _start_epoch(self):
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)
        order = list(self.sampler)
        if self.shard:
            order = order[du.rank():: du.world_size()]
        batches = [order[i: i + self.batch_size] for i in range(0, len(order) - self.batch_size + 1, self.batch_size)]
        if not batches:
            raise ValueError(f"an epoch of {len(order)} items holds no batch of {self.batch_size}")
        batches = batches[self.index // self.batch_size:]
        if self.workers > 0:
            self._iter = iter(torch.utils.data.DataLoader(self.items, batch_sampler=batches, num_workers=self.workers,
                                                          collate_fn=_collate))
        else:
            self._iter = (_collate([self.items[i] for i in b]) for b in batches)

    def next(self):
        while True:
            if self._iter is None:
                self._start_epoch()
            batch = next(self._iter, None)
            if batch is not None:
                self.index += self.batch_size
                return batch
            self.epoch, self.index, self._iter = self.epoch + 1, 0, None


def make_sampler(dataset, cfg: dict):
    from ..data.samplers import BiLevelClassSampler, RepeatFactorSampler, repeat_factors

    classes = [dataset.image_classes(i) for i in range(len(dataset))]
    seed = cfg["train"]["seed"]
    if cfg["train"]["stage"] == "simcal":
        n = cfg["solver"]["max_iter"] * cfg["solver"]["batch_size"] * du.world_size()
        return BiLevelClassSampler(classes, n, seed=seed), True
    t = cfg["data"].get("repeat_threshold")
    factors = repeat_factors(classes, threshold=t) if t else [1.0] * len(classes)
    return RepeatFactorSampler(factors, seed=seed, shuffle=True, num_replicas=du.world_size(), rank=du.rank()), False


def _model_meta(dataset, cfg) -> dict:
    return {"num_classes": dataset.num_classes, "instance_counts": dataset_instance_counts(dataset),
            "stage": cfg["train"]["stage"]}


def load_pretrained_backbone(model, state: dict, source: str) -> None:
    """`--pretrained-backbone`: ImageNet weights (read with `load_checkpoint`) for a ResNet backbone."""
    if not hasattr(model.backbone, "load_pretrained"):
        raise ValueError(f"--pretrained-backbone {source}: the {type(model.backbone).__name__} backbone takes no "
                         "ImageNet weights (use model.backbone=resnet50)")
    model.backbone.load_pretrained(state, source)


def build_from_checkpoint(ckpt: dict, device="cpu"):
    meta = ckpt["meta"]
    model = build_model(ckpt["config"]["model"], meta["num_classes"], meta["instance_counts"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def train(cfg: dict, train_ann: str, image_root: str, out_dir: str, val_ann: str | None = None,
          val_images: str | None = None, resume: str | None = None, base: str | None = None,
          device: str = "auto", progress: bool = True, log=print, trust_checkpoint: bool = False) -> dict:
    """Train one config; returns {"model", "history", "metrics", "checkpoint", "train_time"}. Checkpoints
    (`resume`, `base`, `model.pretrained_backbone`) load without running code from them unless
    `trust_checkpoint` (see `checkpoint.load_checkpoint`); all are read before any other work."""
    dev = du.init_from_env(device)
    solver, tcfg = cfg["solver"], cfg["train"]
    stage = tcfg["stage"]
    resumed = load_checkpoint(resume, trust=trust_checkpoint) if resume else None
    base_state = load_checkpoint(base, trust=trust_checkpoint)["model"] if base and not resume else None
    pretrained = cfg["model"].get("pretrained_backbone") if not resume else None
    pretrained_state = load_checkpoint(pretrained, trust=trust_checkpoint) if pretrained else None
    seed_everything(tcfg["seed"])  # identical initial weights on every rank
    dataset = build_dataset(train_ann, image_root, cfg["data"], train=True)
    meta = _model_meta(dataset, cfg)
    model = build_model(cfg["model"], meta["num_classes"], meta["instance_counts"])
    if pretrained_state is not None:
        load_pretrained_backbone(model, pretrained_state, pretrained)
    if stage != "base":
        if base_state is None and resumed is None:
            raise ValueError(f"stage {stage!r} retrains a trained baseline: pass --base CKPT")
        if base_state is not None:
            model.init_stage_from_base(base_state)
        model.freeze_for_stage(stage)
    model.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=solver["lr"], momentum=solver.get("momentum", 0.9),
                                weight_decay=solver.get("weight_decay", 1e-4))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(solver))
    amp = bool(solver.get("amp", True)) and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    sampler, shard = make_sampler(dataset, cfg)
    stream = BatchStream(dataset, sampler, solver["batch_size"], tcfg.get("workers", 0), shard)
    start = 0
    if resumed is not None:
        ckpt = resumed
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        stream.load_state_dict(ckpt["sampler"])
        start = int(ckpt["iteration"])
        set_rng_state(ckpt["rng"][du.rank() % len(ckpt["rng"])])  # same world size: exact
    else:
        seed_everything(tcfg["seed"] + 1000 * du.rank())
    net = model
    if du.is_dist():
        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                      find_unused_parameters=tcfg.get("find_unused_parameters", False))
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")

    def checkpoint(iteration: int, path: str):
        rngs = du.gather_objects(rng_state())
        if du.is_main():
            save_checkpoint(path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "sampler": stream.state_dict(),
                "iteration": iteration, "rng": rngs, "config": cfg, "meta": meta})
        du.barrier()

    history = []
    net.train()
    t0 = time.time()
    bar = tqdm(total=solver["max_iter"], initial=start, desc=f"train[{stage}]", dynamic_ncols=True,
               disable=not (progress and du.is_main() and sys.stderr.isatty()))
    for it in range(start, solver["max_iter"]):
        images, targets = stream.next()
        images = [im.to(dev, non_blocking=True) for im in images]
        targets = _to_device(targets, dev)
        with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
            losses = net(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if solver.get("clip_grad"):
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, solver["clip_grad"])
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        rec = {"iter": it + 1, "loss": float(loss.detach()), "lr": optimizer.param_groups[0]["lr"],
               **{k: float(v.detach()) for k, v in losses.items()}}
        if not math.isfinite(rec["loss"]):
            raise FloatingPointError(f"loss is {rec['loss']} at iteration {it + 1}: {rec}")
        history.append(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.4g}")
        every = tcfg.get("log_every", 0)
        if bar.disable and progress and every and du.is_main() and ((it + 1) % every == 0 or it + 1 == solver["max_iter"]):
            log(f"  [{stage}] iter {it + 1}/{solver['max_iter']}  loss {rec['loss']:.3f}  lr {rec['lr']:.4g}  "
                f"({time.time() - t0:.0f}s)")
        every = tcfg.get("ckpt_every", 0)
        if every and (it + 1) % every == 0 and it + 1 < solver["max_iter"]:
            checkpoint(it + 1, os.path.join(out_dir, f"checkpoint_{it + 1:07d}.pt"))
    bar.close()
    train_time = time.time() - t0
    checkpoint(solver["max_iter"], ckpt_path)
    metrics = None
    if tcfg.get("eval", True) and val_ann:
        metrics = evaluate(model, val_ann, val_images or image_root, cfg["data"], dev,
                           out_dir=out_dir, batch_size=solver["batch_size"])
    if du.is_main():
        with open(os.path.join(out_dir, "train_log.json"), "w") as f:
            json.dump({"config": cfg, "history": history, "train_time": train_time, "metrics": _jsonable(metrics)},
                      f, indent=1)
    return {"model": model, "history": history, "metrics": metrics, "checkpoint": ckpt_path,
            "train_time": train_time, "meta": meta}


@torch.no_grad()
def predict(model, dataset, device, batch_size: int = 8, progress: bool = False) -> list:
    """Detections of this rank's share of `dataset`, boxes in original image coordinates."""
    model.eval()
    out = []
    indices = list(range(du.rank(), len(dataset), du.world_size()))
    for s in tqdm(range(0, len(indices), batch_size), desc="eval", disable=not (progress and sys.stderr.isatty())):
        images, targets = _collate([dataset[i] for i in indices[s: s + batch_size]])
        dets = model([im.to(device) for im in images])
        for d, t in zip(dets, targets):
            boxes = d["boxes"].float().cpu() / float(t.get("scale", 1.0))
            out.append({"image_id": int(t["image_id"]), "boxes": boxes, "scores": d["scores"].float().cpu(),
                        "labels": d["labels"].cpu()})
    return out


def evaluate(model, ann_file: str, image_root: str, data_cfg: dict, device, out_dir: str | None = None,
             batch_size: int = 8, backend: str = "lvis") -> dict | None:
    """Predict on every image of `ann_file` (sharded over ranks) and evaluate on rank 0 with the official LVIS API
    (`backend="lvis"`) or faster-coco-eval's LVIS mode (`backend="faster-coco-eval"`)."""
    from ..evaluation.lvis_eval import evaluate_detections

    dataset = build_dataset(ann_file, image_root, data_cfg, train=False)
    dets = [d for part in du.gather_objects(predict(model, dataset, device, batch_size)) for d in part]
    metrics = None
    if du.is_main():
        metrics = evaluate_detections(ann_file, dets, out_dir=out_dir, max_dets=300, backend=backend)
    du.barrier()
    return metrics


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if torch.is_tensor(obj):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj
