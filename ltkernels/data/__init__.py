"""LVIS's published category statistics of the train splits (v0.5: 1230 classes, v1: 1203): id, name, synset,
frequency ('r' / 'c' / 'f'), image_count and instance_count per category. They build the real BAGS groups and
frequency splits without the dataset: `BalancedGroups.from_lvis("v1")`."""
from __future__ import annotations

import json
from functools import cache, lru_cache
from pathlib import Path

LVIS_VERSIONS = ("v0.5", "v1")


def lvis_categories_path(version: str) -> Path:
    """The bundled statistics file of an LVIS version ("v0.5" or "v1")."""
    if version not in LVIS_VERSIONS:
        raise ValueError(f"LVIS version must be one of {LVIS_VERSIONS}, got {version!r}")
    return Path(__file__).resolve().parent / f"lvis_{version}_categories.json"


@cache
def _load(version: str) -> tuple:
    with open(lvis_categories_path(version)) as f:
        return tuple(json.load(f)["categories"])


def lvis_categories(version: str) -> list[dict]:
    """The category dicts of an LVIS version, ordered by id (a fresh copy each call)."""
    return [dict(c) for c in _load(version)]
