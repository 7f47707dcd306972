"""LVIS box and mask evaluation (`lvis_eval`) and plots (`plots`)."""
from .lvis_eval import evaluate_detections

__all__ = ["evaluate_detections"]
