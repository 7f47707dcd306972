"""The config schema: every key of every section declared once, with its type, default and allowed range.
`resolve(cfg)` fills the defaults, checks every value and rejects unknown keys (suggesting the closest known
one); configs stay plain dicts (JSON files, checkpoints), typed and complete after `resolve`."""
from __future__ import annotations

import difflib
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Union


class ConfigError(ValueError):
    """An unknown key, a value of the wrong type or out of range."""


def _f(default, check=None, doc: str = "", choices=None):
    kw = {"default_factory": (lambda d=default: list(d))} if isinstance(default, list) else {"default": default}
    return field(metadata={"check": check, "doc": doc, "choices": choices}, **kw)


POSITIVE = (lambda v: v > 0, "> 0")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")
ALL_POSITIVE = (lambda v: all(x > 0 for x in v), "all > 0")


@dataclass
class ModelConfig:
    type: str = _f("two_stage", choices=("two_stage", "one_stage", "atss"))
    cls_loss: str | None = _f(None, doc="softmax | bags | seesaw | eqlv2 | federated (two-stage), focal | efl "
                                           "(one-stage), focal | efl | qfl | eqfl (atss); None: the type's default",
                                 choices=(None, "softmax", "bags", "seesaw", "eqlv2", "federated", "focal", "efl",
                                          "qfl", "eqfl"))
    backbone: str = _f("tiny", doc="tiny | resnet18/34/50/101")
    pretrained_backbone: str | None = _f(None, doc="ImageNet state_dict of the ResNet")
    trainable_layers: int = _f(3, (lambda v: 0 <= v <= 5, "in 0..5"))
    widths: list[int] = _f([16, 32, 48, 64, 96], ALL_POSITIVE)
    fpn_channels: int | None = _f(None, POSITIVE, doc="None: 64 (tiny), 256 (ResNet)")
    levels: list[int] = _f([2, 3, 4])
    anchor_scales: list[float] = _f([8.0], ALL_POSITIVE)
    anchor_ratios: list[float] = _f([0.5, 1.0, 2.0], ALL_POSITIVE)
    rpn_pre_nms_top_n_train: int = _f(2000, POSITIVE)
    rpn_post_nms_top_n_train: int = _f(2000, POSITIVE)
    rpn_pre_nms_top_n_test: int = _f(1000, POSITIVE)
    rpn_post_nms_top_n_test: int = _f(1000, POSITIVE)
    rpn_batch_size_per_image: int = _f(256, POSITIVE)
    pool_size: int = _f(7, POSITIVE)
    sampling_ratio: int = _f(2)
    canonical_scale: int = _f(224, POSITIVE)
    canonical_level: int = _f(4, POSITIVE)
    representation_size: int = _f(1024, POSITIVE)
    batch_size_per_image: int = _f(512, POSITIVE)
    positive_fraction: float = _f(0.25, FRACTION)
    score_thresh: float | None = _f(None, FRACTION, doc="None: 1e-4 (two-stage), 0.05 (one-stage)")
    nms_thresh: float = _f(0.5, FRACTION)
    detections_per_img: int = _f(300, POSITIVE)
    bags_bounds: list[int] = _f([10, 100, 1000], ALL_POSITIVE)
    bags_others_ratio: float = _f(8.0, NON_NEGATIVE)
    simcal_tail_threshold: int | None = _f(None, POSITIVE)
    seesaw_p: float = _f(0.8, NON_NEGATIVE, doc="Seesaw mitigation exponent")
    seesaw_q: float = _f(2.0, NON_NEGATIVE, doc="Seesaw compensation exponent")
    eqlv2_gamma: float = _f(12.0, NON_NEGATIVE)
    eqlv2_mu: float = _f(0.8)
    eqlv2_alpha: float = _f(4.0, NON_NEGATIVE)
    fed_loss_num_classes: int = _f(50, POSITIVE, doc="federated loss: classes per step (present + sampled)")
    fed_loss_power: float = _f(0.5, NON_NEGATIVE, doc="federated loss: weight = training image count ** power")
    mask_head: bool = _f(False, doc="two-stage: add the Mask R-CNN mask branch (instance segmentation)")
    mask_head_channels: int = _f(256, POSITIVE, doc="channels of the mask head's convolutions")
    head_convs: int = _f(4, NON_NEGATIVE)
    topk_candidates: int = _f(1000, POSITIVE)
    fg_iou: float = _f(0.5, FRACTION)
    bg_iou: float = _f(0.4, FRACTION)
    focal_alpha: float = _f(0.25, FRACTION)
    efl_scale: float = _f(8.0, NON_NEGATIVE)
    efl_gamma_b: float = _f(2.0, POSITIVE)
    atss_topk: int = _f(18, POSITIVE, doc="ATSS candidates per level and ground truth (9 per anchor scale)")
    iou_branch: bool | None = _f(None, doc="ATSS IoU-prediction branch; None: on for focal / efl, off for qfl / "
                                              "eqfl")
    giou_weight: float = _f(2.0, NON_NEGATIVE, doc="ATSS GIoU box loss weight")


@dataclass
class DataConfig:
    min_size: int | list[int] = _f(800, doc="shorter side; a list: one drawn per image")
    max_size: int = _f(1333, POSITIVE)
    flip_prob: float = _f(0.5, FRACTION)
    mean: list[float] = _f([0.485, 0.456, 0.406])
    std: list[float] = _f([0.229, 0.224, 0.225], ALL_POSITIVE)
    repeat_threshold: float | None = _f(None, POSITIVE, doc="repeat factor sampling t (LVIS: 0.001)")


@dataclass
class SolverConfig:
    lr: float = _f(0.02, POSITIVE)
    momentum: float = _f(0.9, FRACTION)
    weight_decay: float = _f(1e-4, NON_NEGATIVE)
    batch_size: int = _f(16, POSITIVE, doc="images per process and iteration")
    max_iter: int = _f(90000, POSITIVE)
    warmup_iters: int = _f(0, NON_NEGATIVE)
    warmup_factor: float = _f(0.001, (lambda v: 0 < v <= 1, "in (0, 1]"))
    steps: list[float] = _f([], (lambda v: all(x > 0 for x in v), "all > 0"),
                            doc="lr x gamma at each; values < 1 are fractions of max_iter")
    gamma: float = _f(0.1, POSITIVE)
    clip_grad: float | None = _f(None, POSITIVE)
    amp: bool = _f(True, doc="float16 autocast on CUDA")


@dataclass
class TrainConfig:
    stage: str = _f("base", choices=("base", "bags", "simcal"))
    seed: int = _f(0, NON_NEGATIVE)
    ckpt_every: int = _f(5000, NON_NEGATIVE, doc="periodic checkpoints (0: only the final one)")
    eval_every: int = _f(0, NON_NEGATIVE, doc="evaluate on --val-ann every N iterations, keep model_best.pt")
    log_every: int = _f(20, NON_NEGATIVE)
    workers: int = _f(0, NON_NEGATIVE)
    eval: bool = _f(True, doc="evaluate on --val-ann at the end")
    tensorboard: bool = _f(True)
    find_unused_parameters: bool = _f(False)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "solver": SolverConfig, "train": TrainConfig}
_TYPE_DEFAULTS = {"two_stage": {"cls_loss": "softmax", "score_thresh": 1e-4},
                  "one_stage": {"cls_loss": "efl", "score_thresh": 0.05},
                  "atss": {"cls_loss": "efl", "score_thresh": 0.05}}


def known_keys(section: str | None = None) -> list:
    if section is None:
        return list(SECTIONS)
    return [f.name for f in fields(SECTIONS[section])]


def unknown_key_error(dotted: str, candidates: list) -> ConfigError:
    *head, key = dotted.split(".")
    prefix = ".".join(head) + "." if head else ""
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known: {', '.join(prefix + c for c in candidates)}"
    return ConfigError(f"unknown config key {dotted!r}{hint}")


def _check_type(value, hint, key: str):
    """`value` as `hint` (int -> float where a float is declared), else ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        errors = []
        for arg in args:
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{key} must be {_type_name(hint)}, got {value!r}")
    if origin in (list, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be {_type_name(hint)}, got {value!r}")
        return [_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key} must be {_type_name(hint)}, got {value!r}")


def _type_name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return " or ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, list):
        return f"a list of {_type_name(args[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def model_config(cfg) -> ModelConfig:
    """The typed model section (from a dict, checked and completed like `resolve`)."""
    if isinstance(cfg, ModelConfig):
        return cfg
    return ModelConfig(**resolve({"model": dict(cfg)})["model"])


def resolve(cfg: dict) -> dict:
    """A new dict: every section complete (defaults filled), every value checked; ConfigError otherwise."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"a config is a JSON object, got {type(cfg).__name__}")
    for name in cfg:
        if name not in SECTIONS:
            raise unknown_key_error(name, known_keys())
    out = {}
    for name, schema in SECTIONS.items():
        section = cfg.get(name, {})
        if not isinstance(section, dict):
            raise ConfigError(f"config section {name!r} must be an object, got {section!r}")
        hints = typing.get_type_hints(schema)
        declared = {f.name: f for f in fields(schema)}
        for key in section:
            if key not in declared:
                raise unknown_key_error(f"{name}.{key}", list(declared))
        resolved = {}
        for key, f in declared.items():
            if key in section:
                value = _check_type(section[key], hints[key], f"{name}.{key}")
            else:
                value = f.default_factory() if f.default is MISSING else f.default
            choices, check = f.metadata["choices"], f.metadata["check"]
            if choices is not None and value not in choices:
                raise ConfigError(f"{name}.{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")
            if check is not None and value is not None and not check[0](value):
                raise ConfigError(f"{name}.{key} must be {check[1]}, got {value!r}")
            resolved[key] = value
        out[name] = resolved
    for key, value in _TYPE_DEFAULTS[out["model"]["type"]].items():
        if out["model"][key] is None:
            out["model"][key] = value
    return out
