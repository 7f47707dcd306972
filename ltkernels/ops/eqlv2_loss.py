"""EQL v2 (Tan et al., CVPR 2021; docs/spec.md §10), the authors' formulation, as one fused kernel.

`EQLv2Loss` keeps the buffers `pos_grad`, `neg_grad` (start at 0) and `pos_neg` (starts at +inf: every weight of the
first step is 1, as the official first step) in `state_dict`. The kernel computes the loss, dL/dlogits and the
step's per-class gradient statistics (sum of w * |p - t| over positive / negative targets, the official
`collect_grad`) in one pass; the module adds them to the buffers in the same forward (all-reduced over the ranks of
a torch.distributed job; a step whose statistics are not finite is dropped) and refreshes pos_neg, as the official
code does. No host syncs on CUDA.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
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
    accumulate_statistics,
    as_normalizer,
    check_finite,
    check_label_values,
    register_saved_gradient_autograd,
    rows_normalizer,
)

__all__ = ["eqlv2_loss", "eqlv2_scores", "EQLv2Loss"]


@torch.library.custom_op("ltkernels::eqlv2_loss_accumulate", mutates_args=("pos_grad", "neg_grad", "pos_neg"))
def _accumulate(pos_grad: Tensor, neg_grad: Tensor, pos_neg: Tensor, pos_step: Tensor, neg_step: Tensor) -> None:
    """Adds one step's statistics (summed over ranks) to the buffers; pos_neg = pos_grad / (neg_grad + 1e-10)."""
    accumulate_statistics(pos_grad, neg_grad, pos_neg, pos_step, neg_step, False)


@_accumulate.register_fake
def _(pos_grad, neg_grad, pos_neg, pos_step, neg_step):
    return None


if has_op("eqlv2_loss"):

    @torch.library.register_fake("ltkernels::eqlv2_loss")
    def _(logits, labels, pos_neg, normalizer, gamma, mu, alpha, ignore_index):
        torch._check(logits.dim() == 2 and logits.size(1) >= 1,
                     lambda: f"logits must have shape [N, C + 1], got {logits.shape}")
        n, c = logits.size(0), logits.size(1) - 1
        torch._check(labels.dim() == 1 and labels.size(0) == n, lambda: f"labels must have shape [{n}]")
        torch._check(pos_neg.dim() == 1 and pos_neg.size(0) == c,
                     lambda: f"pos_neg must have shape [{c}], got {pos_neg.shape}")
        torch._check(normalizer.numel() == 1, lambda: f"normalizer must hold one value, got {normalizer.shape}")
        acc = acc_dtype(logits.dtype)
        return (logits.new_empty((), dtype=acc), torch.empty_like(logits, memory_format=torch.contiguous_format),
                logits.new_empty((c,), dtype=acc), logits.new_empty((c,), dtype=acc))

    register_saved_gradient_autograd("eqlv2_loss", 8)


def _check_params(gamma: float, mu: float, alpha: float, ignore_index: int, num_classes: int) -> None:
    check_finite("gamma", gamma, 0.0)
    check_finite("mu", mu)
    check_finite("alpha", alpha, 0.0)
    if 0 <= int(ignore_index) <= num_classes:
        raise ArgumentValueError(f"ignore_index must not be a label (0..{num_classes}), got {ignore_index}")


def _check_buffer(name: str, t: Tensor, logits: Tensor, c: int) -> None:
    check_tensor(name, t, ndim=1, dtypes=floating_dtypes(), device=logits.device)
    if t.shape[0] != c:
        raise ArgumentValueError(f"logits have {c} classes (C + 1 = {c + 1} columns) but {name} has "
                                 f"{t.shape[0]} entries")


def eqlv2_loss(logits: Tensor, labels: Tensor, pos_neg: Optional[Tensor] = None,
               normalizer: Optional[Union[float, Tensor]] = None, gamma: float = 12.0, mu: float = 0.8,
               alpha: float = 4.0, ignore_index: int = -1, pos_grad: Optional[Tensor] = None,
               neg_grad: Optional[Tensor] = None, validate: Optional[bool] = None,
               label_layout: str = "background_first") -> Tensor:
    """EQL v2 of `logits [N, C + 1]` (one sigmoid per class in columns 0..C-1, background in column C, the official
    head) against `labels [N]` (0 = background, 1..C, `ignore_index` ignored).

    loss = sum over non-ignored rows and columns of w * BCE(x, t) / normalizer with neg_w = f(pos_neg),
    pos_w = 1 + alpha (1 - f(pos_neg)), f(g) = 1 / (1 + exp(-gamma (g - mu))), and weight 1 in the background
    column (docs/spec.md §10). pos_neg [C]: None = all +inf (weights 1). normalizer: None = max(non-ignored rows, 1)
    (the official n_i), or a number / one-element tensor > 0.
    pos_grad, neg_grad (with pos_neg): [C] statistics buffers; when given, this call adds the step's sums of
    w * |p - t| over positive / negative targets (all-reduced over ranks in a distributed job) and refreshes
    pos_neg = pos_grad / (neg_grad + 1e-10) in place, after computing the loss with the old pos_neg (the official
    forward); a call under no_grad, or on logits that do not require grad, updates nothing. `EQLv2Loss` does this. validate: check labels and pos_neg first (a host sync on CUDA; default: CPU in
    eager mode). Returns a 0-d float32 tensor (float64 for float64 logits). Scriptable.
    """
    check_tensor("logits", logits, ndim=2, dtypes=floating_dtypes())
    if logits.shape[1] < 1:
        raise ArgumentValueError("logits must have C + 1 >= 1 columns (classes, then background)")
    c = logits.shape[1] - 1
    check_tensor("labels", labels, ndim=1, device=logits.device)
    if labels.shape[0] != logits.shape[0]:
        raise ArgumentValueError(f"labels must have {logits.shape[0]} entries (one per row of logits), got "
                                 f"{labels.shape[0]}")
    _check_params(gamma, mu, alpha, ignore_index, c)
    last = background_last(label_layout)
    if validate is None:
        validate = can_read_values(logits)
    check_label_values(labels, c, ignore_index, validate)
    if last:
        labels = to_background_first(labels, c, ignore_index)
    if pos_neg is None:
        if pos_grad is not None or neg_grad is not None:
            raise ArgumentValueError("pos_grad and neg_grad need pos_neg (the three statistics buffers go together)")
        pos_neg = torch.full((c,), float("inf"), dtype=torch.float32, device=logits.device)
    _check_buffer("pos_neg", pos_neg, logits, c)
    if validate and bool((torch.isnan(pos_neg) | (pos_neg < 0)).any()):
        raise ArgumentValueError("pos_neg must be >= 0 (+inf allowed), found a negative value or NaN")
    if (pos_grad is None) != (neg_grad is None):
        raise ArgumentValueError("pass both pos_grad and neg_grad, or neither")
    if normalizer is None:
        norm = rows_normalizer(labels, ignore_index)
    else:
        norm = as_normalizer(normalizer, logits.device, validate)
    loss, _, pos_step, neg_step = torch.ops.ltkernels.eqlv2_loss(logits, labels, pos_neg.detach(), norm, float(gamma),
                                                                  float(mu), float(alpha), int(ignore_index))
    # a forward that cannot be back-propagated (no_grad: an evaluation loss) does not train, so it updates nothing
    if pos_grad is not None and neg_grad is not None and torch.is_grad_enabled() and logits.requires_grad:
        _check_buffer("pos_grad", pos_grad, logits, c)
        _check_buffer("neg_grad", neg_grad, logits, c)
        torch.ops.ltkernels.eqlv2_loss_accumulate(pos_grad, neg_grad, pos_neg, pos_step, neg_step)
    return loss


def eqlv2_scores(logits: Tensor, label_layout: str = "background_first") -> Tensor:
    """[N, C + 1] detection scores of EQL v2 logits [N, C + 1] (the official get_activation): sigmoid of each class
    times (1 - sigmoid(background)), and sigmoid(background); column 0 is background (last with
    `label_layout="background_last"`). Differentiable, in the logits' dtype."""
    check_tensor("logits", logits, ndim=2, dtypes=floating_dtypes())
    p = torch.sigmoid(logits)
    bg = p[:, -1:]
    classes = p[:, :-1] * (1 - bg)
    if background_last(label_layout):
        return torch.cat([classes, bg], dim=1)
    return torch.cat([bg, classes], dim=1)


class EQLv2Loss(nn.Module):
    """EQL v2 (CVPR 2021) for the box head of a two-stage detector, with its gradient statistics in buffers.

    The classifier predicts C + 1 sigmoid logits per RoI (`num_outputs`; column C is background).
    forward(logits [N, C + 1], labels [N], normalizer=None) returns the loss computed with the current `pos_neg`
    and adds the step's statistics to `pos_grad` / `neg_grad` (all-reduced over ranks), refreshing `pos_neg`, as the
    official forward does. The buffers are in `state_dict`, so a resumed run continues its statistics.
    `scores(logits)` gives the [N, C + 1] detection scores.
    """

    def __init__(self, num_classes: int, gamma: float = 12.0, mu: float = 0.8, alpha: float = 4.0,
                 ignore_index: int = -1, label_layout: str = "background_first"):
        super().__init__()
        if int(num_classes) < 1:
            raise ArgumentValueError(f"num_classes must be >= 1, got {num_classes}")
        _check_params(gamma, mu, alpha, ignore_index, int(num_classes))
        background_last(label_layout)
        self.num_classes = int(num_classes)
        self.gamma, self.mu, self.alpha = float(gamma), float(mu), float(alpha)
        self.ignore_index = int(ignore_index)
        self.label_layout = label_layout
        self.register_buffer("pos_grad", torch.zeros(self.num_classes))
        self.register_buffer("neg_grad", torch.zeros(self.num_classes))
        self.register_buffer("pos_neg", torch.full((self.num_classes,), float("inf")))

    @property
    def num_outputs(self) -> int:
        return self.num_classes + 1

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, gamma={self.gamma}, mu={self.mu}, alpha={self.alpha}, "
                f"ignore_index={self.ignore_index}, label_layout={self.label_layout!r}")

    def forward(self, logits: Tensor, labels: Tensor, normalizer: Optional[Union[float, Tensor]] = None) -> Tensor:
        if isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[1] != self.num_classes + 1:
            raise ArgumentValueError(f"logits must have num_classes + 1 = {self.num_classes + 1} columns, got "
                                     f"{logits.shape[1]}")
        return eqlv2_loss(logits, labels, self.pos_neg, normalizer, self.gamma, self.mu, self.alpha,
                          self.ignore_index, self.pos_grad, self.neg_grad, label_layout=self.label_layout)

    def scores(self, logits: Tensor) -> Tensor:
        return eqlv2_scores(logits)
