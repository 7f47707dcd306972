"""Repeat factor sampling (LVIS paper) and SimCal's bi-level class-balanced sampler.

Repeat factors: f_c = (number of images containing c) / (number of images), r_c = max(1, sqrt(t / f_c)),
an image's factor r_i = max over its classes (1 for an image without annotations), t = 0.001.  Each epoch
repeats image i floor(r_i) times plus once more with probability r_i - floor(r_i) (stochastic rounding with a
generator seeded by seed + epoch), shuffles, pads to a multiple of the number of replicas (repeating the
beginning, like `DistributedSampler`) and gives replica k the indices k, k + R, k + 2R, ...
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["repeat_factors", "RepeatFactorSampler", "BiLevelClassSampler"]


def _dist_info(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    if num_replicas is None or rank is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ws, rk = torch.distributed.get_world_size(), torch.distributed.get_rank()
        else:
            ws, rk = 1, 0
        num_replicas = ws if num_replicas is None else num_replicas
        rank = rk if rank is None else rank
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"invalid rank {rank} for {num_replicas} replicas")
    return int(num_replicas), int(rank)


def repeat_factors(image_classes: Sequence[Iterable[int]], num_images_per_class: dict[int, int] | None = None,
                   threshold: float = 0.001) -> torch.Tensor:
    """Per-image repeat factors (float64 tensor [num_images]).

    `image_classes[i]` is the set of classes in image i.  `num_images_per_class` (class -> number of images
    containing it) defaults to counting over `image_classes`; the fraction f_c divides it by len(image_classes).
    """
    sets = [set(int(c) for c in s) for s in image_classes]
    n = len(sets)
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    if num_images_per_class is None:
        num_images_per_class = {}
        for s in sets:
            for c in s:
                num_images_per_class[c] = num_images_per_class.get(c, 0) + 1
    r_class = {}
    for c, cnt in num_images_per_class.items():
        f = cnt / float(n)
        r_class[int(c)] = max(1.0, math.sqrt(threshold / f)) if f > 0 else 1.0
    out = torch.ones(n, dtype=torch.float64)
    for i, s in enumerate(sets):
        if s:
            out[i] = max(r_class[c] for c in s)
    return out


class RepeatFactorSampler(Sampler):
    """Sampler over dataset indices with per-epoch stochastic rounding of the repeat factors.

    Call `set_epoch(e)` before each epoch.  `len(sampler)` is the number of indices this rank yields in the
    current epoch (it changes from epoch to epoch).  `state_dict()` -> {"epoch", "index", "seed"} where index
    counts the indices of the current epoch already yielded; `load_state_dict` makes the next iteration resume
    right after them (once; later iterations start the epoch from the beginning).
    """

    def __init__(self, repeat_factors, seed: int = 0, shuffle: bool = True, num_replicas: int | None = None,
                 rank: int | None = None):
        self.repeat_factors = torch.as_tensor(repeat_factors, dtype=torch.float64).flatten()
        if (self.repeat_factors < 0).any():
            raise ValueError("repeat factors must be non-negative")
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.num_replicas, self.rank = _dist_info(num_replicas, rank)
        self.epoch = 0
        self._index = 0          # indices yielded so far in the current epoch (by the running iterator)
        self._resume_from = 0    # start offset of the next iteration (set by load_state_dict)
        self._cache: tuple[int, list[int]] | None = None

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self._resume_from = 0
        self.epoch = int(epoch)
        self._index = 0

    def _epoch_indices(self) -> list[int]:
        """All indices of this rank for the current epoch (deterministic in seed and epoch)."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        r = self.repeat_factors
        whole = torch.floor(r)
        rep = whole + (torch.rand(len(r), generator=g, dtype=torch.float64) < (r - whole)).double()
        idx = torch.repeat_interleave(torch.arange(len(r)), rep.long())
        if self.shuffle:
            idx = idx[torch.randperm(len(idx), generator=g)]
        idx = idx.tolist()
        if self.num_replicas > 1 and idx:
            total = int(math.ceil(len(idx) / self.num_replicas)) * self.num_replicas
            pad = total - len(idx)
            idx = idx + (idx * (pad // len(idx) + 1))[:pad]
            idx = idx[self.rank:total:self.num_replicas]
        self._cache = (self.epoch, idx)
        return idx

    def __len__(self) -> int:
        return len(self._epoch_indices())

    def __iter__(self) -> Iterator[int]:
        idx = self._epoch_indices()
        start = self._resume_from
        self._resume_from = 0
        self._index = start
        for i in idx[start:]:
            self._index += 1
            yield i

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self._index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if "seed" in state and int(state["seed"]) != self.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, this sampler has seed {self.seed}")
        self.epoch = int(state["epoch"])
        self._index = int(state["index"])
        self._resume_from = int(state["index"])


class BiLevelClassSampler(Sampler):
    """SimCal bi-level sampling: a class uniformly (with replacement) among the classes present in at least one
    image, then an image uniformly among those containing it.  Yields `num_samples` (image_index, class_id)
    pairs; the same seed (and epoch, see `set_epoch`) gives the same sequence."""

    def __init__(self, image_classes: Sequence[Iterable[int]], num_samples: int, seed: int = 0):
        by_class: dict[int, list[int]] = {}
        for i, s in enumerate(image_classes):
            for c in sorted(set(int(c) for c in s)):
                by_class.setdefault(c, []).append(i)
        if not by_class:
            raise ValueError("no image contains any class")
        self.classes: list[int] = sorted(by_class)
        self.images_per_class = {c: torch.tensor(v, dtype=torch.int64) for c, v in by_class.items()}
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator()
        g.manual_seed(self.seed + 1_000_003 * self.epoch)
        cls = torch.randint(len(self.classes), (self.num_samples,), generator=g).tolist()
        u = torch.rand(self.num_samples, generator=g, dtype=torch.float64).tolist()
        for k, ui in zip(cls, u):
            c = self.classes[k]
            imgs = self.images_per_class[c]
            j = min(int(ui * len(imgs)), len(imgs) - 1)
            yield int(imgs[j]), c
