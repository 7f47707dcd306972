"""Detectors, LVIS data, training and evaluation built on ltkernels (installed as `ltkernels.models`)."""
