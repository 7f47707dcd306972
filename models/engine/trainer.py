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

from ..configs import resolve
from ..data.lvis import collate_detection
from ..detectors import build_model
from . import distributed as du
from . import run
from .checkpoint import CheckpointError, check_keys, load_checkpoint, rng_state, save_checkpoint, set_rng_state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class DatasetError(ValueError):
    """The images or annotations cannot be used for this job (none found, ...)."""


def build_dataset(ann_file: str, image_root: str, data_cfg: dict, train: bool, masks: bool = False):
    from ..data.lvis import DetectionTransform, LVISDetection

    if not os.path.isdir(image_root):
        raise DatasetError(f"--images {image_root}: no such folder")
    tf = DetectionTransform(data_cfg["min_size"], data_cfg["max_size"], data_cfg["flip_prob"] if train else 0.0,
                            data_cfg["mean"], data_cfg["std"])
    dataset = LVISDetection(ann_file, image_root, transforms=tf, masks=masks)
    if len(dataset) == 0:
        missing = dataset.skipped.get("missing_image", 0)
        raise DatasetError(f"--images {image_root}: none of the {missing} images of {ann_file} is there (first "
                           f"expected: {dataset.missing_paths[0]})" if missing else
                           f"{ann_file}: no images")
    return dataset


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
                                                          collate_fn=collate_detection))
        else:
            self._iter = (collate_detection([self.items[i] for i in b]) for b in batches)

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
            "image_counts": [int(n) for n in getattr(dataset, "image_counts", dataset_instance_counts(dataset))],
            "stage": cfg["train"]["stage"],
            "category_ids": [int(dataset.label_to_category_id[k]) for k in range(1, dataset.num_classes + 1)]}


def load_pretrained_backbone(model, state: dict, source: str) -> None:
    """`--pretrained-backbone`: ImageNet weights (read with `load_checkpoint`) for a ResNet backbone."""
    if not hasattr(model.backbone, "load_pretrained"):
        raise ValueError(f"--pretrained-backbone {source}: the {type(model.backbone).__name__} backbone takes no "
                         "ImageNet weights (use model.backbone=resnet50)")
    model.backbone.load_pretrained(state, source)


def build_from_checkpoint(ckpt: dict, device="cpu", source: str = "checkpoint"):
    meta = ckpt["meta"]
    model = build_model(ckpt["config"]["model"], meta["num_classes"], meta["instance_counts"], meta.get("image_counts"))
    _load_weights(model, ckpt["model"], source)
    return model.to(device).eval()


def _load_weights(model, state: dict, source: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # missing / unexpected keys, shape mismatches
        first = str(err).strip().splitlines()
        raise CheckpointError(f"{source}: its weights do not fit this model: {' '.join(first[:3])[:600]}") from None


def _check_compatible(ckpt: dict, meta: dict, cfg: dict, source: str) -> None:
    """A resumed checkpoint must be of this run: same classes, model and stage."""
    old = ckpt["meta"]
    if int(old["num_classes"]) != meta["num_classes"]:
        raise CheckpointError(f"{source}: trained for {old['num_classes']} classes, the annotations have "
                              f"{meta['num_classes']}")
    try:  # a checkpoint of an older version holds the config without the defaults of later keys
        theirs = resolve({"model": ckpt["config"]["model"]})["model"]
    except ValueError as err:
        raise CheckpointError(f"{source}: its model config does not fit this version ({err})") from None
    diff = sorted(k for k in cfg["model"] if theirs.get(k) != cfg["model"][k] and k != "pretrained_backbone")
    if diff:
        raise CheckpointError(f"{source}: written by a run with another model config (differs in "
                              f"{', '.join(f'model.{k}' for k in diff)})")
    if old.get("stage", cfg["train"]["stage"]) != cfg["train"]["stage"]:
        raise CheckpointError(f"{source}: a {old['stage']!r} run, this config trains {cfg['train']['stage']!r}")


def _efl_summary(model) -> dict:
    loss = getattr(model, "cls_loss_fn", None)
    if loss is None or not hasattr(loss, "pos_neg"):
        return {}
    pn = loss.pos_neg.detach().float()
    return {"efl_pos_neg_mean": float(pn.mean()), "efl_pos_neg_min": float(pn.min()),
            "efl_pos_neg_max": float(pn.max())}


def _peak_memory_mb(dev) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2 ** 20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except ImportError:
        return float("nan")


def train(cfg: dict, train_ann: str, image_root: str, out_dir: str, val_ann: str | None = None,
          val_images: str | None = None, resume: str | None = None, base: str | None = None,
          device: str = "auto", progress: bool = True, log=print, trust_checkpoint: bool = False,
          overwrite: bool = False) -> dict:
    """Train one config; returns {"model", "history" (this call's iterations), "metrics", "checkpoint",
    "train_time", "meta"}. `out_dir` is checked first (see `run.prepare`: `resume="auto"` continues from its
    newest checkpoint, an existing run is refused unless `overwrite`). Checkpoints (`resume`, `base`,
    `model.pretrained_backbone`) load without running code from them unless `trust_checkpoint` (see
    `checkpoint.load_checkpoint`); all are read before any other work."""
    cfg = resolve(cfg)
    dev = du.init_from_env(device)
    solver, tcfg = cfg["solver"], cfg["train"]
    stage = tcfg["stage"]
    resume = run.prepare(out_dir, resume, overwrite, main=du.is_main())
    du.barrier()
    resumed = check_keys(load_checkpoint(resume, trust=trust_checkpoint), resume, "resume") if resume else None
    base_state = None
    if base and not resume:
        base_state = check_keys(load_checkpoint(base, trust=trust_checkpoint), base, "model")["model"]
    pretrained = cfg["model"].get("pretrained_backbone") if not resume else None
    pretrained_state = load_checkpoint(pretrained, trust=trust_checkpoint) if pretrained else None
    seed_everything(tcfg["seed"])  # identical initial weights on every rank
    dataset = build_dataset(train_ann, image_root, cfg["data"], train=True,
                            masks=bool(cfg["model"].get("mask_head")))
    meta = _model_meta(dataset, cfg)
    if resumed is not None:
        _check_compatible(resumed, meta, cfg, resume)
    model = build_model(cfg["model"], meta["num_classes"], meta["instance_counts"], meta.get("image_counts"))
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
    start, best, elapsed = 0, {}, 0.0
    if resumed is not None:
        ckpt = resumed
        _load_weights(model, ckpt["model"], resume)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"{resume}: its optimizer / scheduler state does not fit this run ({err})") \
                from None
        stream.load_state_dict(ckpt["sampler"])
        start, best, elapsed = int(ckpt["iteration"]), dict(ckpt.get("best", {})), float(ckpt.get("elapsed", 0))
        if len(ckpt["rng"]) != du.world_size():
            raise CheckpointError(f"{resume}: written by {len(ckpt['rng'])} processes, this run has "
                                  f"{du.world_size()}: an exact resume needs the same number")
        set_rng_state(ckpt["rng"][du.rank()])
    else:
        seed_everything(tcfg["seed"] + 1000 * du.rank())
    net = model
    if du.is_dist():
        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                      find_unused_parameters=tcfg.get("find_unused_parameters", False))
    rlog = run.RunLog(out_dir, start, enabled=du.is_main(), console=log if progress else None,
                      tensorboard=tcfg.get("tensorboard", True))
    if du.is_main():
        run.write_text_atomic(os.path.join(out_dir, "config.json"), json.dumps(cfg, indent=1) + "\n")
    rlog.info(f"[{stage}] resumed from {resume} at iteration {start}/{solver['max_iter']}" if resume else
              f"[{stage}] training {solver['max_iter']} iterations on {len(dataset)} images, {meta['num_classes']}"
              f" classes, {du.world_size()} process(es) on {dev.type}; run folder {out_dir}")
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    t0 = time.time()

    def checkpoint(iteration: int, name: str, pointer: bool = True):
        rngs = du.gather_objects(rng_state())
        if du.is_main():
            rlog.sync()
            save_checkpoint(os.path.join(out_dir, name), {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "sampler": stream.state_dict(),
                "iteration": iteration, "rng": rngs, "config": cfg, "meta": meta, "best": best,
                "elapsed": elapsed + time.time() - t0})
            if pointer:
                run.write_text_atomic(os.path.join(out_dir, run.LAST), name + "\n")
        du.barrier()

    val_set = {}

    def validate(iteration: int):
        if "ds" not in val_set:
            val_set["ds"] = build_dataset(val_ann, val_images or image_root, cfg["data"], train=False)
        m = evaluate(model, val_ann, val_images or image_root, cfg["data"], dev, out_dir=out_dir,
                     batch_size=solver["batch_size"], dataset=val_set["ds"], category_ids=meta["category_ids"])
        net.train()
        if du.is_main():
            scalars = {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}
            rlog.record({"iter": iteration, "type": "eval", **scalars}, prefix="eval")
            rlog.info(f"[{stage}] eval at iteration {iteration}: " + format_metrics(m))
        ap = du.gather_objects(m["AP"] if du.is_main() else None)[0]
        if ap is not None and ap == ap and ap >= 0 and ap > best.get("AP", -1.0):
            best.update(AP=float(ap), iteration=iteration)
            checkpoint(iteration, "model_best.pt", pointer=False)
        return m

    do_eval = bool(tcfg.get("eval", True) and val_ann)
    history = []
    net.train()
    bar = tqdm(total=solver["max_iter"], initial=start, desc=f"train[{stage}]", dynamic_ncols=True,
               disable=not (progress and du.is_main() and sys.stderr.isatty()))
    for it in range(start, solver["max_iter"]):
        t_iter = time.perf_counter()
        images, targets = stream.next()
        images = [im.to(dev, non_blocking=True) for im in images]
        targets = _to_device(targets, dev)
        data_time = time.perf_counter() - t_iter
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
        rec = {"iter": it + 1, "type": "train", "loss": float(loss.detach()), "lr": optimizer.param_groups[0]["lr"],
               **{k: float(v.detach()) for k, v in losses.items()}, **_efl_summary(model),
               "data_time": data_time, "time": time.perf_counter() - t_iter, "peak_mem_mb": _peak_memory_mb(dev)}
        if not math.isfinite(rec["loss"]):
            raise FloatingPointError(f"loss is {rec['loss']} at iteration {it + 1}: {rec}")
        history.append(rec)
        rlog.record(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.4g}")
        every = tcfg.get("log_every", 0)
        if every and ((it + 1) % every == 0 or it + 1 == solver["max_iter"]):
            line = (f"[{stage}] iter {it + 1}/{solver['max_iter']}  loss {rec['loss']:.3f}  lr {rec['lr']:.4g}  "
                    f"{rec['time']:.3f}s/it (data {data_time:.3f}s)  {rec['peak_mem_mb']:.0f} MB  "
                    f"({time.time() - t0:.0f}s)")
            if bar.disable:
                rlog.info(line)
            else:
                rlog.logger.info(line)
        every = tcfg.get("eval_every", 0)
        if do_eval and every and (it + 1) % every == 0 and it + 1 < solver["max_iter"]:
            validate(it + 1)
        every = tcfg.get("ckpt_every", 0)
        if every and (it + 1) % every == 0 and it + 1 < solver["max_iter"]:
            checkpoint(it + 1, f"checkpoint_{it + 1:07d}.pt")
    bar.close()
    train_time = time.time() - t0
    checkpoint(solver["max_iter"], "checkpoint.pt")
    metrics = validate(solver["max_iter"]) if do_eval else None
    if du.is_main():
        records = run.read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
        run.write_text_atomic(os.path.join(out_dir, "train_log.json"), json.dumps({
            "config": cfg, "history": [r for r in records if r.get("type") == "train"],
            "evaluations": [r for r in records if r.get("type") == "eval"], "best": best,
            "train_time": elapsed + train_time, "metrics": _jsonable(metrics)}, indent=1))
        rlog.info(f"[{stage}] done: {ckpt_path}" + (f", best AP {100 * best['AP']:.1f} at iteration "
                                                     f"{best['iteration']} (model_best.pt)" if best else ""))
    rlog.close()
    return {"model": model, "history": history, "metrics": metrics, "checkpoint": ckpt_path,
            "train_time": train_time, "meta": meta}


def format_metrics(m: dict) -> str:
    """`AP 23.1  AP50 ...`; a metric without ground truth to measure it (-1 in the LVIS API) prints n/a."""
    keys = ["AP", "AP50", "AP75", "APr", "APc", "APf", "AP1", "AP2", "AP3", "AP4"]

    def fmt(prefix):
        return "  ".join(f"{k} {100 * m[prefix + k]:.1f}" if m[prefix + k] == m[prefix + k] and m[prefix + k] >= 0
                         else f"{k} n/a" for k in keys if prefix + k in m)
    line = fmt("")
    if "mask_AP" in m:  # Mask R-CNN: the mask metrics after the box metrics
        line = f"box {line}  |  mask {fmt('mask_')}"
    return line


@torch.no_grad()
def predict(model, dataset, device, batch_size: int = 8, progress: bool = False) -> list:
    """Detections of this rank's share of `dataset`, boxes in original image coordinates; a Mask R-CNN's masks
    pasted at the original image size and encoded as RLE ("segmentations", one per box, see
    `data.masks.paste_to_rle`)."""
    from ..data.masks import paste_to_rle

    model.eval()
    out = []
    indices = list(range(du.rank(), len(dataset), du.world_size()))
    for s in tqdm(range(0, len(indices), batch_size), desc="eval", disable=not (progress and sys.stderr.isatty())):
        images, targets = collate_detection([dataset[i] for i in indices[s: s + batch_size]])
        dets = model([im.to(device) for im in images])
        for d, t in zip(dets, targets):
            boxes = d["boxes"].float() / float(t.get("scale", 1.0))
            det = {"image_id": int(t["image_id"]), "boxes": boxes.cpu(), "scores": d["scores"].float().cpu(),
                   "labels": d["labels"].cpu()}
            if "masks" in d:
                det["segmentations"] = paste_to_rle(d["masks"], boxes, tuple(t["orig_size"]))
            out.append(det)
    return out


def evaluate(model, ann_file: str, image_root: str, data_cfg: dict, device, out_dir: str | None = None,
             batch_size: int = 8, backend: str = "lvis", dataset=None, category_ids=None) -> dict | None:
    """Predict on every image of `ann_file` (sharded over ranks) and evaluate on rank 0 with the official LVIS API
    (`backend="lvis"`) or faster-coco-eval's LVIS mode (`backend="faster-coco-eval"`). `category_ids[l - 1]` is
    the category id of the model's label l (the training file's categories; default: label == id)."""
    from ..evaluation.lvis_eval import evaluate_detections

    if dataset is None:
        dataset = build_dataset(ann_file, image_root, data_cfg, train=False)
    if dataset.skipped.get("missing_image"):
        raise DatasetError(f"--images {image_root}: {dataset.skipped['missing_image']} of the images of {ann_file} "
                           f"are not there (first: {dataset.missing_paths[0]}); an evaluation without them "
                           "would count their objects as missed")
    mapping = {k + 1: int(c) for k, c in enumerate(category_ids)} if category_ids is not None else None
    dets = [d for part in du.gather_objects(predict(model, dataset, device, batch_size)) for d in part]
    metrics = None
    if du.is_main():
        metrics = evaluate_detections(ann_file, dets, out_dir=out_dir, max_dets=300, backend=backend,
                                      label_to_category_id=mapping,
                                      segm=getattr(model, "mask_head", None) is not None)
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
