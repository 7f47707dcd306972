"""LVIS-format data: dataset and transforms (`lvis`), samplers (`samplers`), synthetic long-tail set (`synthetic`)."""
from .lvis import DetectionTransform, LVISDetection, LVISFormatError, collate_detection
from .samplers import BiLevelClassSampler, RepeatFactorSampler, repeat_factors
from .synthetic import write_synthetic_lvis

__all__ = ["LVISDetection", "DetectionTransform", "LVISFormatError", "collate_detection", "BiLevelClassSampler",
           "RepeatFactorSampler", "repeat_factors", "write_synthetic_lvis"]
