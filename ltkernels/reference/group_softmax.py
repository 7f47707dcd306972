"""Balanced Group Softmax written from docs/spec.md §1 in plain PyTorch.

- `group_softmax_loss_reference(logits, labels, groups, selected)`: the loss for a given selection mask
  ([G + 1, N] bool, as `ltkernels.group_softmax_selection` draws it), one log_softmax per group slice, autograd for
  the gradient. Run it in float64 as the test oracle.
- `group_softmax_loss_eager`: the same sampling procedure as the fast path plus the reference loss: the "eager"
  benchmark baseline.
- `official_group_softmax_loss`: a faithful port of the official BAGS code (`GSBBoxHeadWith0._remap_labels`,
  `_sample_others`, one cross-entropy per group with `avg_factor`): a Python loop over groups, `nonzero`,
  `np.random.choice(..., replace=False)` on the host and `.item()` syncs. Benchmark peer "official".
- `group_softmax_scores_reference`: the inference merge (the official `_merge_score`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..ops.group_softmax import BalancedGroups, group_softmax_selection

__all__ = ["group_softmax_loss_reference", "group_softmax_loss_eager", "official_group_softmax_loss",
           "group_softmax_scores_reference", "group_targets"]


def group_targets(labels: torch.Tensor, groups: BalancedGroups, ignore_index: int = -1) -> torch.Tensor:
    """[N, G + 1] target column of every row inside every group (ignored rows get label 0's targets)."""
    valid = labels != ignore_index
    lab = torch.where(valid, labels, torch.zeros_like(labels)).long()
    return groups.tables(labels.device)["label_targets"][lab]


_LABEL2BINLABEL: dict = {}


def _label2binlabel(groups: BalancedGroups, device) -> torch.Tensor:
    """The official [G + 1, C + 1] remapping table, built once per layout and device (the official head loads it
    once in __init__)."""
    key = (id(groups), str(device))
    if key not in _LABEL2BINLABEL:
        table = torch.zeros(groups.num_groups + 1, groups.num_classes + 1, dtype=torch.int64)
        table[0, 1:] = 1
        for g in range(1, groups.num_groups + 1):
            table[g, groups.members(g)] = torch.arange(1, groups.group_sizes[g - 1] + 1)
        _LABEL2BINLABEL[key] = (groups, table.to(device))  # keep `groups` alive so its id stays unique
    return _LABEL2BINLABEL[key][1]


def group_softmax_loss_reference(logits: torch.Tensor, labels: torch.Tensor, groups: BalancedGroups,
                                 selected: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    """Sum over groups of the mean in-group softmax cross-entropy over the group's selected rows (0 if none)."""
    targets = group_targets(labels, groups, ignore_index)
    total = logits.new_zeros(())
    for g in range(groups.num_groups + 1):
        sl = groups.group_slice(g)
        rows = selected[g]
        logp = torch.log_softmax(logits[:, sl], dim=1)
        nll = -logp.gather(1, targets[:, g:g + 1]).squeeze(1)
        count = rows.sum()
        total = total + torch.where(count > 0, (nll * rows).sum() / count.clamp(min=1), 0.0)
    return total


def group_softmax_loss_eager(logits: torch.Tensor, labels: torch.Tensor, groups: BalancedGroups,
                             others_ratio: float = 8.0, generator: torch.Generator | None = None,
                             ignore_index: int = -1) -> torch.Tensor:
    """The reference loss with the selection drawn exactly as `ltkernels.group_softmax_loss` draws it."""
    selected = group_softmax_selection(labels, groups, others_ratio, generator, ignore_index)
    return group_softmax_loss_reference(logits, labels, groups, selected, ignore_index)


def official_group_softmax_loss(logits: torch.Tensor, labels: torch.Tensor, groups: BalancedGroups,
                                others_ratio: float = 8.0, selected: torch.Tensor | None = None,
                                ignore_index: int = -1) -> torch.Tensor:
    """Port of the official per-group loop. The official head has no ignored rows; here an ignored row takes no
    part in any group (weight 0, not counted in avg_factor). With `selected` given, its others are used instead
    of `np.random.choice` (to compare with the reference on one selection)."""
    device = logits.device
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    label2binlabel = _label2binlabel(groups, device)
    losses = []
    for i in range(groups.num_groups + 1):
        new_bin_label = label2binlabel[i][safe]
        if i < 1:
            weight = valid.long()
        elif selected is not None:
            weight = selected[i].long()
        else:  # _sample_others
            fg = torch.where((new_bin_label > 0) & valid, torch.ones_like(new_bin_label),
                             torch.zeros_like(new_bin_label))
            fg_idx = fg.nonzero(as_tuple=True)[0]
            fg_num = fg_idx.shape[0]
            if fg_num == 0:
                weight = torch.zeros_like(new_bin_label)
            else:
                bg = (1 - fg) * valid.long()
                bg_idx = bg.nonzero(as_tuple=True)[0]
                bg_num = bg_idx.shape[0]
                bg_sample_num = int(fg_num * others_ratio) if others_ratio < float("inf") else bg_num
                if bg_sample_num >= bg_num:
                    weight = valid.long()
                else:
                    sample_idx = np.random.choice(bg_idx.cpu().numpy(), (bg_sample_num,), replace=False)
                    sample_idx = torch.from_numpy(sample_idx).to(device)
                    fg[sample_idx] = 1
                    weight = fg
        avg_factor = max(torch.sum(weight).float().item(), 1.0)
        sl = groups.group_slice(i)
        ce = F.cross_entropy(logits[:, sl], new_bin_label, reduction="none")
        losses.append((ce * weight.to(ce.dtype)).sum() / avg_factor)
    return sum(losses)


def group_softmax_scores_reference(logits: torch.Tensor, groups: BalancedGroups) -> torch.Tensor:
    """[N, C + 1]: column 0 = P(bg) of group 0, class c of group g = softmax_g[c] * P(fg)."""
    N = logits.shape[0]
    out = logits.new_zeros(N, groups.num_classes + 1)
    p0 = torch.softmax(logits[:, groups.group_slice(0)], dim=1)
    out[:, 0] = p0[:, 0]
    for g in range(1, groups.num_groups + 1):
        p = torch.softmax(logits[:, groups.group_slice(g)], dim=1)
        out[:, groups.members(g).to(logits.device)] = p[:, 1:] * p0[:, 1:2]
    return out
