"""Balanced Group Softmax (BAGS, docs/spec.md §1): the group layout, the training loss and the inference scores.

Data flow of the loss (no host synchronisation, no Python loop over groups):

1. Sampling, `group_softmax_selection` (plain torch ops on the logits' device): the label -> group table gives every
   row its group; the per-group positive counts (one scatter_add), the number of `others` to draw
   k_g = min(floor(ratio * n_pos_g), n_eligible_g) and the draw itself (uniform without replacement: the first k_g
   eligible rows of g in one random permutation of all (group, row) pairs, ranked with one cumsum, no sort) all stay
   on the device. The result is a [G + 1, N] bool mask of the rows that take part in each group, and the
   per-group normalisers 1 / (n_pos_g + k_g) (0 for a group without positives), known without reading the mask.
2. One fused kernel, `torch.ops.ltkernels.group_softmax_loss`, reads the logits once and computes, for every row and
   group, the in-group log-sum-exp, the normalised cross-entropy and the gradient `(softmax - onehot) / count_g`
   (zero for (row, group) pairs not selected), writing the gradient once. Backward only scales that saved
   gradient by the incoming gradient (and on CPU, when that is exactly 1, hands it over without a pass).

The score merge is one kernel too: `torch.ops.ltkernels.group_softmax_scores`.
"""
from __future__ import annotations

import bisect
import json
import os
from collections.abc import Sequence
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .._ext import has_op
from .._validate import (
    ArgumentTypeError,
    ArgumentValueError,
    acc_dtype,
    background_last,
    can_read_values,
    check_labels,
    check_tensor,
    floating_dtypes,
    refuse_double_backward,
    to_background_first,
)
from ..data import LVIS_VERSIONS, lvis_categories

__all__ = ["BalancedGroups", "GroupTables", "GroupSoftmaxLoss", "group_softmax_loss", "group_softmax_scores",
           "group_softmax_selection"]


class GroupTables:  # compiled by TorchScript when first used (no import-time compilation)
    """TorchScript's type of a group layout: the sizes and tables of :class:`BalancedGroups` that the loss and
    the scores read. A `BalancedGroups` is accepted wherever a scripted function takes a `GroupTables` (TorchScript
    copies these attributes from it); annotate TorchScript code's layout arguments with this class."""

    def __init__(self, num_classes: int, num_groups: int, num_logits: int, label_group: Tensor,
                 label_position: Tensor, score_column: Tensor, group_offsets: Tensor, label_targets: Tensor):
        self.num_classes = num_classes
        self.num_groups = num_groups
        self.num_logits = num_logits
        self.label_group = label_group
        self.label_position = label_position
        self.score_column = score_column
        self.group_offsets = group_offsets
        self.label_targets = label_targets


# --------------------------------------------------------------------------------------------------------------
# The layout
# --------------------------------------------------------------------------------------------------------------
class BalancedGroups:
    """The BAGS logit layout for C foreground classes split into G groups.

    Columns: group 0 = ``[background, foreground]``; then for every group g = 1..G ``[others, its classes in
    ascending label order]``, so ``num_logits == 2 + G + C`` (1236 on LVIS v0.5: the official head's
    ``num_classes + num_bins`` = 1231 + 5). Labels: 0 = background, 1..C = classes.

    Build it with :meth:`from_instance_counts` (``counts[c - 1]`` is the training instance count of label c) or
    :meth:`from_lvis` (an LVIS annotation / category-statistics file, its parsed dict, or a list of category
    dicts). Empty groups are dropped and the remaining ones renumbered 1..G.

    Tensors (int64, on CPU; :meth:`tables` gives cached copies on any device):
    ``label_group`` [C + 1] (group of each label, 0 for background), ``label_position`` [C + 1] (column of the label
    inside its group, 1-based after ``others``; 0 for background -> target 0 of group 0), ``score_column`` [C + 1]
    (logit column of each label; 0 for background), ``group_offsets`` [G + 2] (first column of groups 0..G, then
    ``num_logits``), ``column_label`` [K] (label of each column; -1 for ``others`` and ``foreground``, 0 for
    ``background``).
    """

    def __init__(self, class_groups: Sequence[int], bounds: Sequence[float] | None = None):
        """`class_groups[c - 1]` is the group (1-based) of label c; group numbers need not be contiguous: empty
        groups are dropped and the rest renumbered in increasing order."""
        groups = [int(g) for g in class_groups]
        if len(groups) == 0:
            raise ArgumentValueError("class_groups must hold at least one class")
        if min(groups) < 1:
            raise ArgumentValueError(f"class_groups must be >= 1 (group 0 is background-vs-foreground), got "
                                     f"{min(groups)}")
        used = sorted(set(groups))
        renumber = {g: i + 1 for i, g in enumerate(used)}
        groups = [renumber[g] for g in groups]
        self.bounds = None if bounds is None else tuple(bounds)
        self.num_classes = len(groups)
        self.num_groups = len(used)
        self.num_logits = self.num_classes + 2 + self.num_groups  # (C + 1) + (G + 1): 1236 on LVIS v0.5

        members = [[] for _ in range(self.num_groups + 1)]
        for label, g in enumerate(groups, start=1):
            members[g].append(label)
        self._members = [torch.tensor(m, dtype=torch.int64) for m in members]
        self.group_sizes = tuple(len(m) for m in members[1:])

        offsets = [0, 2]
        for size in self.group_sizes:
            offsets.append(offsets[-1] + 1 + size)
        label_group = [0] * (self.num_classes + 1)
        label_position = [0] * (self.num_classes + 1)
        score_column = [0] * (self.num_classes + 1)
        column_label = [-1] * self.num_logits
        column_label[0] = 0
        for g in range(1, self.num_groups + 1):
            for pos, label in enumerate(members[g], start=1):
                label_group[label] = g
                label_position[label] = pos
                score_column[label] = offsets[g] + pos
                column_label[offsets[g] + pos] = label
        self.group_offsets = torch.tensor(offsets, dtype=torch.int64)
        self.label_group = torch.tensor(label_group, dtype=torch.int64)
        self.label_position = torch.tensor(label_position, dtype=torch.int64)
        self.score_column = torch.tensor(score_column, dtype=torch.int64)
        self.column_label = torch.tensor(column_label, dtype=torch.int64)
        # [C + 1, G + 1]: target column of each label in every group (group 0: 0 = bg, 1 = fg)
        targets = torch.zeros(self.num_classes + 1, self.num_groups + 1, dtype=torch.int64)
        targets[1:, 0] = 1
        targets[torch.arange(1, self.num_classes + 1), self.label_group[1:]] = self.label_position[1:]
        self.label_targets = targets
        self._offsets_list = offsets
        self._cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    # ---- constructors ---------------------------------------------------------------------------------------
    @classmethod
    def from_instance_counts(cls, counts, bounds: Sequence[float] = (10, 100, 1000)) -> BalancedGroups:
        """Group of label c = 1 + bisect_right(bounds, counts[c - 1]); empty groups are dropped."""
        if isinstance(counts, torch.Tensor):
            counts = counts.tolist()
        counts = list(counts)
        if not counts:
            raise ArgumentValueError("counts must hold the instance count of at least one class")
        bounds = tuple(bounds)
        if any(b2 <= b1 for b1, b2 in zip(bounds, bounds[1:])):
            raise ArgumentValueError(f"bounds must be strictly increasing, got {bounds}")
        for i, n in enumerate(counts):
            if not isinstance(n, (int, float)) or isinstance(n, bool) or n < 0 or n != n:
                raise ArgumentValueError(f"counts must be non-negative numbers, counts[{i}] = {n!r}")
        return cls([1 + bisect.bisect_right(bounds, n) for n in counts], bounds=bounds)

    @classmethod
    def from_lvis(cls, source, bounds: Sequence[float] = (10, 100, 1000)) -> BalancedGroups:
        """From an LVIS version's bundled statistics ("v0.5" or "v1"), an LVIS annotation file (or a
        category-statistics file with a ``categories`` list), its parsed dict, or a list of category dicts; each
        category needs ``id`` and ``instance_count`` and the ids must be exactly 1..C (category id == label)."""
        if isinstance(source, str) and source in LVIS_VERSIONS:
            source = lvis_categories(source)
        if isinstance(source, (str, os.PathLike)):
            with open(source) as f:
                source = json.load(f)
        if isinstance(source, dict):
            if "categories" not in source:
                raise ArgumentValueError("the LVIS dict has no 'categories' entry")
            source = source["categories"]
        cats = list(source)
        if not cats:
            raise ArgumentValueError("the category list is empty")
        try:
            by_id = sorted(cats, key=lambda c: int(c["id"]))
            ids = [int(c["id"]) for c in by_id]
            counts = [c["instance_count"] for c in by_id]
        except KeyError as err:
            raise ArgumentValueError(f"every category needs 'id' and 'instance_count'; one lacks {err}") from None
        if ids != list(range(1, len(ids) + 1)):
            raise ArgumentValueError(f"category ids must be exactly 1..{len(ids)} (category id == label)")
        return cls.from_instance_counts(counts, bounds)

    # ---- queries --------------------------------------------------------------------------------------------
    def group_slice(self, g: int) -> slice:
        """The logit columns of group g (0 = [background, foreground]; g >= 1 = [others, classes...])."""
        self._check_group(g, 0)
        return slice(self._offsets_list[g], self._offsets_list[g + 1])

    def members(self, g: int) -> torch.Tensor:
        """The labels of group g >= 1 in ascending order (column order after ``others``)."""
        self._check_group(g, 1)
        return self._members[g].clone()

    def tables(self, device) -> dict[str, torch.Tensor]:
        """The layout tensors on `device` (copied once and cached)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._cache:
            self._cache[device] = {name: getattr(self, name).to(device) for name in
                                   ("label_group", "label_position", "score_column", "group_offsets",
                                    "column_label", "label_targets")}
        return self._cache[device]

    def script_tables(self) -> GroupTables:
        """The layout as a :class:`GroupTables`, e.g. the attribute of a module that is to be scripted and calls
        `group_softmax_scores` / `group_softmax_loss` (a BalancedGroups attribute cannot be scripted)."""
        return GroupTables(self.num_classes, self.num_groups, self.num_logits, self.label_group,
                           self.label_position, self.score_column, self.group_offsets, self.label_targets)

    def _check_group(self, g: int, low: int) -> None:
        if not isinstance(g, int) or not low <= g <= self.num_groups:
            raise IndexError(f"group must be an int in {low}..{self.num_groups}, got {g!r}")

    def __eq__(self, other) -> bool:
        return (isinstance(other, BalancedGroups) and self.num_classes == other.num_classes
                and torch.equal(self.label_group, other.label_group))

    __hash__ = None

    def __repr__(self) -> str:
        return (f"BalancedGroups(num_classes={self.num_classes}, num_groups={self.num_groups}, "
                f"group_sizes={self.group_sizes}, num_logits={self.num_logits}, bounds={self.bounds})")


# --------------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------------
def _check_groups(groups) -> None:
    if not isinstance(groups, BalancedGroups):
        raise ArgumentTypeError(f"groups must be a ltkernels.BalancedGroups, got {type(groups).__name__}")


def _check_logits(logits: Tensor, num_classes: int, num_groups: int) -> None:
    check_tensor("logits", logits, ndim=2, dtypes=floating_dtypes())
    num_logits = num_classes + num_groups + 2
    if logits.shape[1] != num_logits:
        raise ArgumentValueError(
            f"logits has {logits.shape[1]} columns but the group layout has {num_logits} logits "
            f"(C + G + 2 = {num_classes} + {num_groups} + 2)")


def _check_labels(labels: Tensor, logits: Tensor, num_classes: int, ignore_index: int) -> None:
    check_tensor("labels", labels, ndim=1, device=logits.device)
    if labels.shape[0] != logits.shape[0]:
        raise ArgumentValueError(f"labels has {labels.shape[0]} rows but logits has {logits.shape[0]}")
    if 0 <= ignore_index <= num_classes:
        raise ArgumentValueError(f"ignore_index must not be a label (0..{num_classes}), got {ignore_index}")
    # No host synchronisation on an accelerator (or while tracing): there the check fails at the next sync.
    check_labels("labels", labels, num_classes, ignore_index, sync=can_read_values(labels))


def _check_ratio(others_ratio: float) -> float:
    if not torch.jit.is_scripting():
        if isinstance(others_ratio, bool) or not isinstance(others_ratio, (int, float)):
            raise ArgumentTypeError(f"others_ratio must be a number, got {type(others_ratio).__name__}")
    ratio = float(others_ratio)
    if not ratio >= 0:
        raise ArgumentValueError(f"others_ratio must be >= 0 (math.inf: take every other row), got {others_ratio}")
    return ratio


# --------------------------------------------------------------------------------------------------------------
# Sampling: pure torch ops on the device
# --------------------------------------------------------------------------------------------------------------
def _row_groups(labels: Tensor, tables: Dict[str, Tensor], ignore_index: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """lab [N] int64 (ignored rows -> 0), valid [N] bool, counts [G + 2] int64 (rows per group 0..G, then ignored),
    positive [G, N] bool. Every op here is O(N) or O(G N) and none reads back to the host."""
    valid = labels != ignore_index
    lab = torch.where(valid, labels, torch.zeros_like(labels)).long()
    G = tables["group_offsets"].shape[0] - 2
    row_group = torch.where(valid, tables["label_group"][lab], G + 1)
    # (not bincount: on CUDA it reads the maximum back to the host to size its output)
    counts = torch.zeros(G + 2, dtype=torch.int64, device=labels.device).scatter_add_(
        0, row_group, torch.ones_like(row_group))
    positive = row_group[None, :] == torch.arange(1, G + 1, device=labels.device)[:, None]
    return lab, valid, counts, positive


def _select(valid: Tensor, counts: Tensor, positive: Tensor, ratio: float,
            generator: Optional[torch.Generator]) -> Tuple[Tensor, Tensor]:
    """(selected [G + 1, N] bool, scale [G + 1] float64: 1 / |selected rows of g|, 0 for an empty group).

    The draw: one uniform permutation of all G * N (group, row) pairs; the relative order of each group's pairs in
    it is a uniform permutation of that group's rows, independent across groups, so the first k_g eligible rows of
    group g in that order are a uniform k_g-subset (exact: no ties, no sort). The rank of each pair among its
    group's eligible pairs comes from one cumsum over a [G, G * N] indicator, compared with k_g in place (no
    gathers of k or of the ranks: these index ops dominate the draw's time on CPU)."""
    G, N = positive.shape
    n_pos = counts[1:G + 1]
    n_valid = N - counts[G + 1]
    n_elig = n_valid - n_pos
    eligible = valid[None, :] & ~positive                                 # [G, N]
    if ratio >= N:  # every eligible row of a group with positives is taken: no draw needed
        k = n_elig
        others = eligible & (n_pos > 0)[:, None]
    else:
        k = torch.minimum(torch.floor(n_pos.double() * ratio), n_elig.double()).long()      # [G]
        perm = torch.randperm(G * N, generator=generator, device=valid.device)
        ids = torch.arange(G, device=valid.device)
        # the group of each eligible pair, -1 for the others, then in permuted order
        code = torch.where(eligible, ids[:, None], -1).reshape(-1).index_select(0, perm)
        member = code[None, :] == ids[:, None]                            # [G, G * N]: pair t is g's, eligible
        rank = member.cumsum(1, dtype=torch.int32)
        chosen = (member & (rank <= k[:, None].to(torch.int32))).any(0)
        others = torch.zeros(G * N, dtype=torch.bool, device=valid.device).scatter_(0, perm, chosen).view(G, N)
    selected = torch.cat([valid[None, :], positive | others], dim=0)      # [G + 1, N]
    count = torch.cat([n_valid.view(1), torch.where(n_pos > 0, n_pos + k, 0)])
    scale = torch.where(count > 0, 1.0 / count.clamp(min=1).double(), 0.0)
    return selected, scale


def _tables(groups: GroupTables, device: torch.device) -> Dict[str, Tensor]:
    """The layout's tensors on `device`: the cached copies of a BalancedGroups in eager mode; in TorchScript
    copied at each call unless already there (the modules keep theirs as buffers on the device)."""
    if not torch.jit.is_scripting() and not isinstance(groups, GroupTables):
        _check_groups(groups)
        return groups.tables(device)
    return {"label_group": groups.label_group.to(device), "label_position": groups.label_position.to(device),
            "score_column": groups.score_column.to(device), "group_offsets": groups.group_offsets.to(device),
            "label_targets": groups.label_targets.to(device)}


def _check_generator(generator: Optional[torch.Generator], logits: Tensor) -> None:
    # TorchScript's Generator has no device: there torch.randperm refuses a generator of another device itself
    if not torch.jit.is_scripting() and generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ArgumentTypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != logits.device.type:
            raise ArgumentValueError(f"generator is on {generator.device} but logits are on {logits.device}")


def group_softmax_selection(labels: Tensor, groups: GroupTables, others_ratio: float = 8.0,
                            generator: Optional[torch.Generator] = None, ignore_index: int = -1,
                            label_layout: str = "background_first") -> Tensor:
    """The [G + 1, N] bool mask of the rows that take part in each group's loss (docs/spec.md §1).

    Row 0: every non-ignored row. Row g >= 1: the rows labelled with a class of g, plus
    min(floor(n_pos * others_ratio), n_eligible) rows drawn uniformly without replacement from the other
    non-ignored rows; empty when g has no positive row. With the same `generator` state, `group_softmax_loss`
    draws exactly this selection. `groups`: a BalancedGroups (in TorchScript a GroupTables).
    """
    check_tensor("labels", labels, ndim=1)
    tables = _tables(groups, labels.device)
    ratio = _check_ratio(others_ratio)
    if background_last(label_layout):
        labels = to_background_first(labels, groups.num_classes, ignore_index)
    _, valid, counts, positive = _row_groups(labels, tables, ignore_index)
    return _select(valid, counts, positive, ratio, generator)[0]


# --------------------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------------------
def group_softmax_loss(logits: Tensor, labels: Tensor, groups: GroupTables, others_ratio: float = 8.0,
                       generator: Optional[torch.Generator] = None, ignore_index: int = -1,
                       label_layout: str = "background_first") -> Tensor:
    """The BAGS training loss (scalar, in the logits' dtype) of `logits` [N, C + G + 2] for `labels` [N].

    `others_ratio`: others drawn per positive row of a group (`math.inf`: all of them, no sampling).
    `generator`: a `torch.Generator` on the logits' device makes the draw reproducible.
    `groups`: a BalancedGroups (in TorchScript code a GroupTables, which a BalancedGroups passes for).
    Labels must be in 0..C or equal `ignore_index`: 0 = background, 1..C the classes, or with
    `label_layout="background_last"` (mmdet / detectron2) classes 0..C-1 and background C (the logit layout and
    `instance_counts` are the same in both: class order). Gradients reach only the rows and columns that
    contributed. Double backward (create_graph=True) raises. Scriptable.
    """
    check_tensor("logits", logits)
    tables = _tables(groups, logits.device)
    return _loss(logits, labels, tables, groups.num_classes, groups.num_groups, others_ratio, generator,
                 ignore_index, label_layout)


def _loss(logits: Tensor, labels: Tensor, tables: Dict[str, Tensor], num_classes: int, num_groups: int,
          others_ratio: float, generator: Optional[torch.Generator], ignore_index: int, label_layout: str) -> Tensor:
    _check_logits(logits, num_classes, num_groups)
    convert = background_last(label_layout)
    _check_labels(labels, logits, num_classes, ignore_index)
    if convert:
        labels = to_background_first(labels, num_classes, ignore_index)
    ratio = _check_ratio(others_ratio)
    _check_generator(generator, logits)
    lab, valid, counts, positive = _row_groups(labels, tables, ignore_index)
    selected, scale = _select(valid, counts, positive, ratio, generator)
    scale = scale.to(acc_dtype(logits.dtype))
    loss, _ = torch.ops.ltkernels.group_softmax_loss(logits, lab, selected, scale, tables["label_targets"],
                                                     tables["group_offsets"])
    return loss


class GroupSoftmaxLoss(nn.Module):
    """BAGS loss as a module. Give `instance_counts` (``counts[c - 1]`` for label c, split by `bounds`) or a ready
    `groups` layout; ``.groups`` is the :class:`BalancedGroups` in use. `label_layout` as in `group_softmax_loss`.

    The tables the loss reads (`label_group`, `label_targets`, `group_offsets`) are tensor attributes that move
    with `.to(device)` but stay out of `state_dict` (they follow from the layout; TorchScript would save
    non-persistent buffers in it). The module scripts (torch.jit.script) to the same loss, gradients and, with a
    `generator` in the same state, the same draw."""

    __jit_ignored_attributes__ = ["groups"]

    def __init__(self, instance_counts=None, groups: BalancedGroups | None = None,
                 bounds: Sequence[float] = (10, 100, 1000), others_ratio: float = 8.0, ignore_index: int = -1,
                 label_layout: str = "background_first"):
        super().__init__()
        if (instance_counts is None) == (groups is None):
            raise ArgumentValueError("give exactly one of instance_counts and groups")
        if groups is None:
            groups = BalancedGroups.from_instance_counts(instance_counts, bounds)
        _check_groups(groups)
        self.groups = groups
        self.num_classes = groups.num_classes
        self.num_groups = groups.num_groups
        self.label_group = groups.label_group.clone()
        self.label_targets = groups.label_targets.clone()
        self.group_offsets = groups.group_offsets.clone()
        self.others_ratio = _check_ratio(others_ratio)
        self.ignore_index = int(ignore_index)
        background_last(label_layout)  # validates the name
        self.label_layout = label_layout

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.label_group, self.label_targets, self.group_offsets = (
            fn(self.label_group), fn(self.label_targets), fn(self.group_offsets))
        return self

    def forward(self, logits: Tensor, labels: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        # (a no-op on the module's device; a scripted module's tensor attributes do not follow its .to())
        tables = {"label_group": self.label_group.to(logits.device),
                  "label_targets": self.label_targets.to(logits.device),
                  "group_offsets": self.group_offsets.to(logits.device)}
        return _loss(logits, labels, tables, self.num_classes, self.num_groups, self.others_ratio, generator,
                     self.ignore_index, self.label_layout)

    def extra_repr(self) -> str:
        return (f"groups={self.groups!r}, others_ratio={self.others_ratio}, ignore_index={self.ignore_index}, "
                f"label_layout={self.label_layout!r}")


# --------------------------------------------------------------------------------------------------------------
# Inference scores
# --------------------------------------------------------------------------------------------------------------
def group_softmax_scores(logits: Tensor, groups: GroupTables, label_layout: str = "background_first") -> Tensor:
    """[N, C + 1] probabilities in the logits' dtype: softmax inside every group; the background probability is
    group 0's, class c of group g scores softmax_g[c] * P(foreground). The `others` columns are dropped and nothing
    is renormalised. Differentiable. Columns: background first, then the classes (label order); with
    `label_layout="background_last"` the classes first and background last (mmdet / detectron2). Scriptable
    (`groups` typed GroupTables there, a BalancedGroups passes for it)."""
    check_tensor("logits", logits)
    t = _tables(groups, logits.device)
    _check_logits(logits, groups.num_classes, groups.num_groups)
    last = background_last(label_layout)
    scores = torch.ops.ltkernels.group_softmax_scores(logits, t["group_offsets"], t["label_group"],
                                                      t["score_column"])
    return torch.cat([scores[:, 1:], scores[:, :1]], dim=1) if last else scores


# --------------------------------------------------------------------------------------------------------------
# Registrations: fake tensors (torch.compile / export) and autograd
# --------------------------------------------------------------------------------------------------------------
if has_op("group_softmax_loss"):
    @torch.library.register_fake("ltkernels::group_softmax_loss")
    def _loss_fake(logits, labels, selected, scale, label_targets, group_offsets):
        # the kernels' shape checks (csrc/group_softmax.h)
        torch._check(logits.dim() == 2, lambda: f"logits must be 2-D, got {logits.shape}")
        torch._check(group_offsets.dim() == 1, lambda: f"group_offsets must be 1-D, got {group_offsets.shape}")
        n, g1 = logits.size(0), group_offsets.size(0) - 1
        torch._check(labels.dim() == 1 and labels.size(0) == n, lambda: f"labels must have shape [{n}]")
        torch._check(selected.dim() == 2 and selected.size(0) == g1 and selected.size(1) == n,
                     lambda: f"selected must have shape [G + 1, N] = [{g1}, {n}], got {selected.shape}")
        torch._check(scale.dim() == 1 and scale.size(0) == g1, lambda: f"scale must have shape [{g1}]")
        torch._check(label_targets.dim() == 2 and label_targets.size(1) == g1,
                     lambda: f"label_targets must have shape [C + 1, {g1}], got {label_targets.shape}")
        return logits.new_empty(()), torch.empty_like(logits)

    def _loss_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # else autograd fills an [N, K] zero gradient for the unused output

    def _loss_backward(ctx, grad_loss, grad_grad):
        refuse_double_backward("group_softmax_loss")
        (grad,) = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None, None, None
        # The gradient was computed in forward with d(loss) = 1. On CPU, reading grad_loss costs no device sync:
        # when it is 1 (a loss back-propagated alone or summed with others) hand the saved gradient over as it is
        # (autograd releases its saved copy first unless retain_graph, so nothing can alias it) and skip a pass.
        if can_read_values(grad) and can_read_values(grad_loss) and bool(grad_loss == 1):
            return grad, None, None, None, None, None
        return grad * grad_loss, None, None, None, None, None

    torch.library.register_autograd("ltkernels::group_softmax_loss", _loss_backward, setup_context=_loss_setup)


if has_op("group_softmax_scores"):
    @torch.library.register_fake("ltkernels::group_softmax_scores")
    def _scores_fake(logits, group_offsets, label_group, score_column):
        torch._check(logits.dim() == 2, lambda: f"logits must be 2-D, got {logits.shape}")
        torch._check(group_offsets.dim() == 1, lambda: f"group_offsets must be 1-D, got {group_offsets.shape}")
        torch._check(score_column.dim() == 1 and label_group.dim() == 1
                     and label_group.size(0) == score_column.size(0),
                     lambda: "label_group and score_column must both have shape [C + 1]")
        return logits.new_empty((logits.shape[0], score_column.shape[0]))

    def _scores_setup(ctx, inputs, output):
        logits, group_offsets, label_group, score_column = inputs
        ctx.save_for_backward(output, group_offsets, label_group, score_column)
        ctx.num_logits = logits.shape[1]

    def _scores_backward(ctx, grad_out):
        scores, group_offsets, label_group, score_column = ctx.saved_tensors
        return _scores_grad(grad_out, scores, group_offsets, label_group, score_column, ctx.num_logits), \
            None, None, None

    torch.library.register_autograd("ltkernels::group_softmax_scores", _scores_backward,
                                    setup_context=_scores_setup)


def _scores_grad(grad_out, scores, group_offsets, label_group, score_column, K):
    """Backward of the score merge from the saved scores alone (torch ops, no loop over groups).

    s_c = p_g[c] * q for a class c of group g (q = P(fg)), s_0 = 1 - q. With a_c = grad_c * s_c:
    dL/dx[col c] = a_c - p_g[col c] * A_g for g's columns (A_g = sum of a over g's classes; the `others` column has
    only the second term, its probability being 1 - sum of g's class probabilities), and group 0 gets
    dL/dx_fg = q (1 - q) (sum_c grad_c p_g[c] - grad_0) = -dL/dx_bg.
    """
    N = scores.shape[0]
    G1 = group_offsets.shape[0] - 1
    acc = acc_dtype(scores.dtype)
    s = scores.to(acc)
    go = grad_out.to(acc)
    q = 1 - s[:, :1]                                                      # P(fg)  [N, 1]
    a = go * s                                                            # [N, C + 1]
    a[:, 0] = 0
    lg = label_group.expand(N, -1)
    A = torch.zeros(N, G1, dtype=acc, device=s.device).scatter_add_(1, lg, a)      # [N, G + 1]; column 0 unused
    # p_g[c] = s_c / q; dL/dq = sum_c grad_c * p_g[c] - grad_0
    p_cls = torch.where(q > 0, s / q.clamp(min=torch.finfo(acc).tiny), 0.0)
    p_cls[:, 0] = 0
    # others probability of each group: 1 - sum of its class probabilities
    P = torch.zeros(N, G1, dtype=acc, device=s.device).scatter_add_(1, lg, p_cls)
    p_others = (1 - P).clamp(min=0)
    grad = torch.zeros(N, K, dtype=acc, device=s.device)
    cols = score_column[1:].expand(N, -1)
    Ag = A.gather(1, lg[:, 1:])
    grad.scatter_(1, cols, a[:, 1:] - p_cls[:, 1:] * Ag)
    others_cols = group_offsets[1:-1].expand(N, -1)
    grad.scatter_(1, others_cols, -p_others[:, 1:] * A[:, 1:])
    dq = (go[:, 1:] * p_cls[:, 1:]).sum(1, keepdim=True) - go[:, :1]
    g0 = q * (1 - q) * dq
    grad[:, 1:2] = g0
    grad[:, 0:1] = -g0
    return grad.to(scores.dtype)
