"""Seesaw loss (Wang et al., CVPR 2021; docs/spec.md §9), mmdetection's formulation, as one fused kernel.

`SeesawLoss` keeps the per-label instance counts `cum_samples [C + 1]` (entry 0 background) in a buffer (in
`state_dict`). Each forward first adds the step's counts (summed over the ranks of a torch.distributed job), then
computes the loss with the updated counts, as mmdetection does; the kernel computes the loss and dL/dlogits in one
pass (the backward scales the saved gradient). No host syncs on CUDA.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._ext import has_op
from .._validate import (
    ArgumentValueError,
    acc_dtype,
    background_last,
    can_read_values,
    check_tensor,
    floating_dtypes,
    to_background_first,
)
from .loss_common import (
    as_normalizer,
    check_finite,
    check_label_values,
    distributed,
    register_saved_gradient_autograd,
    rows_normalizer,
)

__all__ = ["seesaw_loss", "seesaw_scores", "SeesawLoss"]


def seesaw_counts(labels: Tensor, num_classes: int, ignore_index: int = -1) -> Tensor:
    """[C + 1] float32 counts of the labels 0..C among the rows not labelled `ignore_index` (on the device)."""
    valid = labels != ignore_index
    index = torch.where(valid, labels, torch.zeros_like(labels)).long()
    counts = torch.zeros(num_classes + 1, dtype=torch.float32, device=labels.device)
    return counts.index_add_(0, index, valid.to(torch.float32))


@torch.library.custom_op("ltkernels::seesaw_loss_accumulate", mutates_args=("cum_samples",))
def _accumulate(cum_samples: Tensor, labels: Tensor, ignore_index: int) -> None:
    """Adds the step's per-label counts, summed over the ranks of a distributed job, to `cum_samples`."""
    counts = seesaw_counts(labels, cum_samples.shape[0] - 1, ignore_index)
    if distributed():
        dist.all_reduce(counts)
    cum_samples.add_(counts.to(cum_samples.dtype))


@_accumulate.register_fake
def _(cum_samples, labels, ignore_index):
    return None


if has_op("seesaw_loss"):

    @torch.library.register_fake("ltkernels::seesaw_loss")
    def _(logits, labels, cum_samples, normalizer, p, q, eps, ignore_index):
        torch._check(logits.dim() == 2 and logits.size(1) >= 3,
                     lambda: f"logits must have shape [N, C + 2] with C >= 1, got {logits.shape}")
        n, k = logits.size(0), logits.size(1)
        torch._check(labels.dim() == 1 and labels.size(0) == n, lambda: f"labels must have shape [{n}]")
        torch._check(cum_samples.dim() == 1 and cum_samples.size(0) == k - 1,
                     lambda: f"cum_samples must have shape [{k - 1}], got {cum_samples.shape}")
        torch._check(normalizer.numel() == 1, lambda: f"normalizer must hold one value, got {normalizer.shape}")
        return (logits.new_empty((), dtype=acc_dtype(logits.dtype)),
                torch.empty_like(logits, memory_format=torch.contiguous_format))

    register_saved_gradient_autograd("seesaw_loss", 8)


def _check_params(p: float, q: float, eps: float, ignore_index: int, num_classes: int) -> None:
    check_finite("p", p, 0.0)
    check_finite("q", q, 0.0)
    check_finite("eps", eps, 0.0, strict=True)
    if 0 <= int(ignore_index) <= num_classes:
        raise ArgumentValueError(f"ignore_index must not be a label (0..{num_classes}), got {ignore_index}")


def seesaw_loss(logits: Tensor, labels: Tensor, cum_samples: Tensor, normalizer: Optional[Union[float, Tensor]] = None,
                p: float = 0.8, q: float = 2.0, eps: float = 1e-2, ignore_index: int = -1,
                validate: Optional[bool] = None, label_layout: str = "background_first") -> Tensor:
    """Seesaw loss of `logits [N, C + 2]` (classes 1..C in columns 0..C-1, then the objectness "object" and
    "background" logits, mmdetection's layout) against `labels [N]` (0 = background, 1..C, `ignore_index` ignored).

    loss = (sum over positive rows of -log softmax(z)_label + sum over non-ignored rows of the objectness
    cross-entropy) / normalizer, z = the class logits plus log of the mitigation (p) and compensation (q) factors
    (docs/spec.md §9). cum_samples [C + 1]: per-label instance counts including this step (entry 0 background; with
    `label_layout="background_last"` mmdetection's order: classes first, background last); not updated here
    (`SeesawLoss` keeps them). normalizer: None = max(non-ignored rows, 1) (mmdetection's avg_factor), or a number /
    one-element tensor > 0. validate: check labels and counts first (a host sync on CUDA; default: CPU in eager
    mode). Returns a 0-d float32 tensor (float64 for float64 logits). Scriptable.
    """
    check_tensor("logits", logits, ndim=2, dtypes=floating_dtypes())
    if logits.shape[1] < 3:
        raise ArgumentValueError(f"logits must have C + 2 >= 3 columns (classes, then 2 objectness), got "
                                 f"{logits.shape[1]}")
    c = logits.shape[1] - 2
    check_tensor("labels", labels, ndim=1, device=logits.device)
    if labels.shape[0] != logits.shape[0]:
        raise ArgumentValueError(f"labels must have {logits.shape[0]} entries (one per row of logits), got "
                                 f"{labels.shape[0]}")
    check_tensor("cum_samples", cum_samples, ndim=1, dtypes=floating_dtypes(), device=logits.device)
    if cum_samples.shape[0] != c + 1:
        raise ArgumentValueError(f"cum_samples must have C + 1 = {c + 1} entries, got {cum_samples.shape[0]}")
    _check_params(p, q, eps, ignore_index, c)
    last = background_last(label_layout)
    if validate is None:
        validate = can_read_values(logits)
    check_label_values(labels, c, ignore_index, validate)
    if validate and not bool(((cum_samples >= 0) & torch.isfinite(cum_samples)).all()):
        raise ArgumentValueError("cum_samples must be finite and >= 0")
    if last:
        labels = to_background_first(labels, c, ignore_index)
        cum_samples = torch.cat([cum_samples[-1:], cum_samples[:-1]])
    if normalizer is None:
        norm = rows_normalizer(labels, ignore_index)
    else:
        norm = as_normalizer(normalizer, logits.device, validate)
    loss, _ = torch.ops.ltkernels.seesaw_loss(logits, labels, cum_samples.detach(), norm, float(p), float(q),
                                              float(eps), int(ignore_index))
    return loss


def seesaw_scores(logits: Tensor, label_layout: str = "background_first") -> Tensor:
    """[N, C + 1] detection scores of Seesaw logits [N, C + 2] (mmdetection's get_activation): the class softmax
    times P(object), and P(background); column 0 is background (last with `label_layout="background_last"`).
    Differentiable, in the logits' dtype."""
    check_tensor("logits", logits, ndim=2, dtypes=floating_dtypes())
    if logits.shape[1] < 3:
        raise ArgumentValueError(f"logits must have C + 2 >= 3 columns, got {logits.shape[1]}")
    classes = torch.softmax(logits[:, :-2], dim=1)
    objectness = torch.softmax(logits[:, -2:], dim=1)
    classes = classes * objectness[:, :1]
    if background_last(label_layout):
        return torch.cat([classes, objectness[:, 1:]], dim=1)
    return torch.cat([objectness[:, 1:], classes], dim=1)


class SeesawLoss(nn.Module):
    """Seesaw loss (CVPR 2021) for the box head of a two-stage detector, with its instance counts in a buffer.

    The classifier predicts C + 2 logits per RoI (`num_outputs`): the C classes, then objectness (object,
    background). forward(logits [N, C + 2], labels [N], normalizer=None) adds the step's label counts to
    `cum_samples [C + 1]` (entry 0 background; all-reduced over ranks in a distributed job, so every rank holds the
    counts of the whole batch) and returns the loss with the updated counts. `scores(logits)` gives the [N, C + 1]
    detection scores. `label_layout="background_last"` takes mmdet / detectron2 labels (the buffer stays
    background-first).
    """

    def __init__(self, num_classes: int, p: float = 0.8, q: float = 2.0, eps: float = 1e-2, ignore_index: int = -1,
                 label_layout: str = "background_first"):
        super().__init__()
        if int(num_classes) < 1:
            raise ArgumentValueError(f"num_classes must be >= 1, got {num_classes}")
        _check_params(p, q, eps, ignore_index, int(num_classes))
        background_last(label_layout)
        self.num_classes = int(num_classes)
        self.p, self.q, self.eps = float(p), float(q), float(eps)
        self.ignore_index = int(ignore_index)
        self.label_layout = label_layout
        self.register_buffer("cum_samples", torch.zeros(self.num_classes + 1))

    @property
    def num_outputs(self) -> int:
        return self.num_classes + 2

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, p={self.p}, q={self.q}, eps={self.eps}, "
                f"ignore_index={self.ignore_index}, label_layout={self.label_layout!r}")

    def forward(self, logits: Tensor, labels: Tensor, normalizer: Optional[Union[float, Tensor]] = None) -> Tensor:
        check_tensor("logits", logits, ndim=2, dtypes=floating_dtypes())
        if logits.shape[1] != self.num_classes + 2:
            raise ArgumentValueError(f"logits must have num_classes + 2 = {self.num_classes + 2} columns, got "
                                     f"{logits.shape[1]}")
        check_tensor("labels", labels, ndim=1, device=logits.device)
        validate = can_read_values(logits)
        check_label_values(labels, self.num_classes, self.ignore_index, validate)
        if background_last(self.label_layout):
            labels = to_background_first(labels, self.num_classes, self.ignore_index)
        torch.ops.ltkernels.seesaw_loss_accumulate(self.cum_samples, labels, self.ignore_index)
        return seesaw_loss(logits, labels, self.cum_samples, normalizer, self.p, self.q, self.eps, self.ignore_index,
                           validate=validate)

    def scores(self, logits: Tensor) -> Tensor:
        return seesaw_scores(logits)
