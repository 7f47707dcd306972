"""Thin long-tail detectors on top of ltkernels: Faster R-CNN FPN (softmax / BAGS / SimCal), a RetinaNet-style
one-stage detector (focal loss / EFL) and the EFL paper's improved one-stage baseline, ATSS with an IoU branch
(focal loss / EFL / QFL / EQFL)."""
from ..configs.schema import model_config
from .atss import ATSSDetector
from .backbone import build_backbone
from .one_stage import OneStageDetector
from .two_stage import TwoStageDetector

__all__ = ["build_model", "build_backbone", "TwoStageDetector", "OneStageDetector", "ATSSDetector"]


def build_model(model_cfg, num_classes: int, instance_counts, image_counts=None):
    """`model_cfg` (the config's `model` section, a dict or a `ModelConfig`): `type` "two_stage", "one_stage" or "atss";
    `instance_counts[c - 1]` = training instances of class c; `image_counts[c - 1]` = training images of class c
    (the federated loss's weights; default: the instance counts)."""
    model_cfg = model_config(model_cfg)
    kind = model_cfg.type
    if kind == "two_stage":
        return TwoStageDetector(model_cfg, num_classes, instance_counts, image_counts)
    if kind == "one_stage":
        return OneStageDetector(model_cfg, num_classes, instance_counts)
    if kind == "atss":
        return ATSSDetector(model_cfg, num_classes, instance_counts)
    raise ValueError(f"unknown model type {kind!r}")
