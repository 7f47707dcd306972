"""Named training configs (plain dicts). `ltk train --config NAME` takes one of these, or a JSON file with the
same layout; `--set section.key=value` and the dedicated flags override single values.

Sections: `model` (detector, see `ltkernels.models.detectors`), `data` (resizing, flips, repeat factor sampling),
`solver` (SGD schedule; `steps` given as fractions of `max_iter` when < 1), `train` (stage, seed, checkpoints).
Stages: "base" trains a detector; "bags" and "simcal" are the decoupled second stages on a trained baseline
(`--base CKPT`)."""
from __future__ import annotations

import copy
import json
import os

from .schema import ConfigError, known_keys, resolve, unknown_key_error

__all__ = ["CONFIGS", "ConfigError", "UnknownConfigError", "get_config", "merge", "resolve", "set_value"]


class UnknownConfigError(ConfigError, KeyError):
    """`--config NAME` names neither a known config nor a file."""

    def __str__(self):
        return str(self.args[0])

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# ------------------------------------------------------------------------- synthetic long-tail set (the demo)
_SYNTH_MODEL = {
    "backbone": "tiny", "widths": [16, 24, 32, 48, 64], "fpn_channels": 32, "levels": [2, 3, 4],
    "anchor_scales": [4], "anchor_ratios": [0.5, 1.0, 2.0],
    "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300,
    "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 150, "rpn_batch_size_per_image": 128,
    "pool_size": 7, "canonical_scale": 112, "representation_size": 256, "batch_size_per_image": 64,
    "positive_fraction": 0.25, "score_thresh": 1e-4, "nms_thresh": 0.5, "detections_per_img": 300,
}
_SYNTH_DATA = {"min_size": 160, "max_size": 160, "flip_prob": 0.5, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
               "repeat_threshold": None}
_SYNTH_SOLVER = {"lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 8, "max_iter": 600,
                 "warmup_iters": 50, "warmup_factor": 0.001, "steps": [0.75, 0.9], "gamma": 0.1, "clip_grad": 10.0,
                 "amp": True}
_TRAIN = {"stage": "base", "seed": 0, "ckpt_every": 500, "log_every": 100, "workers": 0, "eval": True}


def _cfg(model=None, data=None, solver=None, train=None, base_model=_SYNTH_MODEL, base_data=_SYNTH_DATA,
         base_solver=_SYNTH_SOLVER):
    return {"model": {**base_model, **(model or {})}, "data": {**base_data, **(data or {})},
            "solver": {**base_solver, **(solver or {})}, "train": {**_TRAIN, **(train or {})}}


_ONE_STAGE_SYNTH = {"type": "one_stage", "levels": [3, 4, 5], "anchor_scales": [2, 2.83], "head_convs": 2,
                    "score_thresh": 0.01, "topk_candidates": 1000, "fg_iou": 0.5, "bg_iou": 0.4}

CONFIGS = {
    "two_stage_softmax": _cfg({"type": "two_stage", "cls_loss": "softmax"}),
    "two_stage_bags": _cfg({"type": "two_stage", "cls_loss": "bags", "bags_bounds": [10, 100, 1000],
                            "bags_others_ratio": 8.0},
                           solver={"max_iter": 200, "warmup_iters": 0},
                           train={"stage": "bags"}),
    "two_stage_simcal": _cfg({"type": "two_stage", "cls_loss": "softmax", "simcal_tail_threshold": 100},
                             solver={"max_iter": 200, "warmup_iters": 0, "batch_size": 16},
                             train={"stage": "simcal"}),
    # the other LVIS classification losses, trained end to end like the softmax baseline
    "two_stage_seesaw": _cfg({"type": "two_stage", "cls_loss": "seesaw", "seesaw_p": 0.8, "seesaw_q": 2.0}),
    "two_stage_eqlv2": _cfg({"type": "two_stage", "cls_loss": "eqlv2", "eqlv2_gamma": 12.0, "eqlv2_mu": 0.8,
                             "eqlv2_alpha": 4.0}),
    "two_stage_federated": _cfg({"type": "two_stage", "cls_loss": "federated", "fed_loss_num_classes": 50,
                                 "fed_loss_power": 0.5}),
    "one_stage_focal": _cfg({**_ONE_STAGE_SYNTH, "cls_loss": "focal"}, solver={"lr": 0.01}),
    "one_stage_efl": _cfg({**_ONE_STAGE_SYNTH, "cls_loss": "efl", "efl_scale": 8.0, "efl_gamma_b": 2.0},
                          solver={"lr": 0.01}),
}

# The EFL paper's improved one-stage baseline (ATSS, IoU branch, GIoU, two anchor scales per location, k = 18,
# longer warm-up, gradient clipping at 35). On the synthetic set the anchor scales are the paper's {6, 8} times
# the image-size ratio (160 px images, objects of 16-56 px, against 800 px for LVIS): {1.5, 2}.
_ATSS_SYNTH = {"type": "atss", "levels": [3, 4, 5], "anchor_scales": [1.5, 2.0], "anchor_ratios": [1.0],
               "head_convs": 2, "atss_topk": 18, "score_thresh": 0.01, "topk_candidates": 1000,
               "efl_scale": 8.0, "efl_gamma_b": 2.0}
_ATSS_SOLVER = {"lr": 0.01, "warmup_iters": 100, "clip_grad": 35.0}
for _loss in ("focal", "efl", "qfl", "eqfl"):
    CONFIGS[f"atss_{_loss}"] = _cfg({**_ATSS_SYNTH, "cls_loss": _loss}, solver=_ATSS_SOLVER)

# ------------------------------------------------------------------------- LVIS v0.5 / v1 (ResNet-50 FPN)
_LVIS_MODEL = {
    "backbone": "resnet50", "pretrained_backbone": None, "trainable_layers": 3, "fpn_channels": 256,
    "anchor_scales": [8], "anchor_ratios": [0.5, 1.0, 2.0],
    "rpn_pre_nms_top_n_train": 2000, "rpn_post_nms_top_n_train": 2000,
    "rpn_pre_nms_top_n_test": 1000, "rpn_post_nms_top_n_test": 1000, "rpn_batch_size_per_image": 256,
    "pool_size": 7, "canonical_scale": 224, "representation_size": 1024, "batch_size_per_image": 512,
    "positive_fraction": 0.25, "score_thresh": 1e-4, "nms_thresh": 0.5, "detections_per_img": 300,
}
_LVIS_DATA = {"min_size": 800, "max_size": 1333, "flip_prob": 0.5, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
              "repeat_threshold": 0.001}
_LVIS_SOLVER = {"lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 16, "max_iter": 90000,
                "warmup_iters": 1000, "warmup_factor": 0.001, "steps": [60000, 80000], "gamma": 0.1,
                "clip_grad": 35.0, "amp": True}
_LVIS_ONE_STAGE = {"type": "one_stage", "anchor_scales": [4, 5.04, 6.35], "head_convs": 4, "score_thresh": 0.05,
                   "topk_candidates": 1000, "fg_iou": 0.5, "bg_iou": 0.4}


def _lvis(model=None, data=None, solver=None, train=None):
    return _cfg(model, data, solver, {"ckpt_every": 5000, "log_every": 20, **(train or {})}, _LVIS_MODEL,
                _LVIS_DATA, _LVIS_SOLVER)


for _v in ("lvis_v0.5", "lvis_v1"):
    CONFIGS.update({
        f"{_v}_two_stage_softmax": _lvis({"type": "two_stage", "cls_loss": "softmax"}),
        # BAGS: 12 epochs of classifier-only retraining in the paper; SimCal: a short calibration schedule.
        f"{_v}_two_stage_bags": _lvis({"type": "two_stage", "cls_loss": "bags", "bags_bounds": [10, 100, 1000],
                                       "bags_others_ratio": 8.0},
                                      solver={"max_iter": 20000, "steps": [13000, 18000], "warmup_iters": 500},
                                      train={"stage": "bags"}),
        f"{_v}_two_stage_simcal": _lvis({"type": "two_stage", "cls_loss": "softmax", "simcal_tail_threshold": 100},
                                        solver={"max_iter": 10000, "steps": [0.8], "warmup_iters": 0,
                                                "batch_size": 64, "lr": 0.01},
                                        train={"stage": "simcal"}),
        f"{_v}_one_stage_focal": _lvis({**_LVIS_ONE_STAGE, "cls_loss": "focal"},
                                       solver={"lr": 0.01, "max_iter": 180000, "steps": [120000, 160000]}),
        f"{_v}_one_stage_efl": _lvis({**_LVIS_ONE_STAGE, "cls_loss": "efl", "efl_scale": 8.0, "efl_gamma_b": 2.0},
                                     solver={"lr": 0.01, "max_iter": 180000, "steps": [120000, 160000]}),
    })

# LVIS v1, the other classification losses on the same Faster R-CNN R50-FPN 1x (Seesaw's mmdetection config adds
# RFS, a normalised linear classifier and 2x; EQL v2's and the federated loss's papers train 1x like this).
CONFIGS.update({
    "lvis_v1_two_stage_seesaw": _lvis({"type": "two_stage", "cls_loss": "seesaw", "seesaw_p": 0.8,
                                       "seesaw_q": 2.0}),
    "lvis_v1_two_stage_eqlv2": _lvis({"type": "two_stage", "cls_loss": "eqlv2", "eqlv2_gamma": 12.0,
                                      "eqlv2_mu": 0.8, "eqlv2_alpha": 4.0}),
    "lvis_v1_two_stage_federated": _lvis({"type": "two_stage", "cls_loss": "federated",
                                          "fed_loss_num_classes": 50, "fed_loss_power": 0.5}),
})

# LVIS v1, the EFL paper's setting: ATSS R50-FPN, anchor scales {6, 8}, k = 18, 2x schedule (24 epochs at 16
# images per iteration), repeat factor sampling (t = 0.001), warm-up 6000 iterations, gradient clipping at 35.
_LVIS_ATSS = {"type": "atss", "anchor_scales": [6, 8], "anchor_ratios": [1.0], "head_convs": 4, "atss_topk": 18,
              "score_thresh": 0.05, "topk_candidates": 1000, "efl_scale": 8.0, "efl_gamma_b": 2.0}
for _loss in ("focal", "efl", "qfl", "eqfl"):
    CONFIGS[f"lvis_v1_atss_{_loss}"] = _lvis({**_LVIS_ATSS, "cls_loss": _loss},
                                            solver={"lr": 0.01, "max_iter": 180000, "steps": [120000, 160000],
                                                    "warmup_iters": 6000, "clip_grad": 35.0})

# ------------------------------------------------------------------------- Mask R-CNN (instance segmentation)
# The two-stage configs with the mask branch (model.mask_head); the BAGS / SimCal stages retrain the classifier of
# a trained mask baseline (--base) and keep its mask head frozen, as in the papers. Evaluation adds mask AP.
for _name, _new in (("two_stage_{}", "two_stage_mask_{}"), ("lvis_v0.5_two_stage_{}", "lvis_v0.5_mask_rcnn_{}"),
                    ("lvis_v1_two_stage_{}", "lvis_v1_mask_rcnn_{}")):
    for _cls in ("softmax", "bags", "simcal"):
        _base = copy.deepcopy(CONFIGS[_name.format(_cls)])
        # 256 channels at LVIS scale (detectron2's head); half the FPN width on the 160-pixel synthetic images,
        # where the head runs on 300 detections per image and would otherwise cost more than the whole detector
        _channels = 256 if _name.startswith("lvis") else _base["model"]["fpn_channels"] // 2
        _base["model"].update(mask_head=True, mask_head_channels=_channels)
        CONFIGS[_new.format(_cls)] = _base


def get_config(name_or_path: str) -> dict:
    """A complete, checked copy (see `schema.resolve`) of a named config, or of the config in a JSON file
    (merged over the named config it names in an optional `"base"` key). Unknown keys are errors."""
    if name_or_path in CONFIGS:
        return resolve(copy.deepcopy(CONFIGS[name_or_path]))
    if os.path.isfile(name_or_path):
        try:
            with open(name_or_path) as f:
                user = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {name_or_path}: {err}") from None
        if not isinstance(user, dict):
            raise ConfigError(f"config file {name_or_path}: a config is a JSON object")
        cfg = get_config(user.pop("base", "two_stage_softmax"))
        try:
            return resolve(merge(cfg, user))
        except ConfigError as err:
            raise ConfigError(f"config file {name_or_path}: {err}") from None
    raise UnknownConfigError(f"unknown config {name_or_path!r} (neither a named config nor a file); named configs: "
                             f"{', '.join(sorted(CONFIGS))}")


def merge(cfg: dict, override: dict) -> dict:
    """Recursively update `cfg` with `override` (in place; returns cfg)."""
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            merge(cfg[k], v)
        else:
            cfg[k] = copy.deepcopy(v)
    return cfg


def set_value(cfg: dict, dotted: str, value: str) -> None:
    """`--set solver.lr=0.01`: values are parsed as JSON when they parse, else kept as strings; the key must be
    declared and the value of its type (ConfigError, with the closest known key)."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    parts = dotted.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {dotted}={value}: the key is SECTION.KEY, SECTION one of "
                          f"{', '.join(known_keys())}")
    section, key = parts
    if section not in known_keys():
        raise unknown_key_error(section, known_keys())
    if key not in known_keys(section):
        raise unknown_key_error(dotted, known_keys(section))
    trial = copy.deepcopy(cfg)
    trial.setdefault(section, {})[key] = parsed
    cfg.update(resolve(trial))
