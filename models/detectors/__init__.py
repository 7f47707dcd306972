"""Thin long-tail detectors on top of ltkernels: Faster R-CNN FPN (softmax / BAGS / SimCal) and a RetinaNet-style
one-stage detector (focal loss / EFL)."""
from .backbone import build_backbone
from .one_stage import OneStageDetector
from .two_stage import TwoStageDetector

__all__ = ["build_model", "build_backbone", "TwoStageDetector", "OneStageDetector"]


def build_model(model_cfg: dict, num_classes: int, instance_counts):
    """`model_cfg["type"]`: "two_stage" or "one_stage"; `instance_counts[c - 1]` = training instances of class c."""
    kind = model_cfg.get("type", "two_stage")
    if kind == "two_stage":
        return TwoStageDetector(model_cfg, num_classes, instance_counts)
    if kind == "one_stage":
        return OneStageDetector(model_cfg, num_classes, instance_counts)
    raise ValueError(f"unknown model type {kind!r}")
