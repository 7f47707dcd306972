"""Ports of the official formulations of Seesaw loss, EQL v2 and the federated loss: the tests hold the float64
references of ltkernels/reference/ (and so the kernels) against the code the papers' numbers came from, and the
benchmarks time them as the "official" peers.

Each port follows the official code's steps and layout (mmdet / detectron2 labels: classes 0..C-1, background C;
no ignored rows: a caller drops them or gives them zero weight) and was written for this project from the
formulation; nothing is copied. Deviations, all marked: no registry / config / logging machinery, `dtype` and
`generator` arguments so the ports run in float64 and reproducibly, and the distributed all-reduce only when a
process group is up. The helpers at the end convert between ltkernels' layout (0 = background, 1..C, -1 ignored,
background column first in the scores) and the official one.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["weight_reduce_loss", "mmdet_cross_entropy", "seesaw_ce_loss", "MMDetSeesawLoss", "mmdet_avg_factor",
           "EQLv2", "get_fed_loss_cls_weights", "get_fed_loss_classes", "FedLossFastRCNN", "to_official_labels",
           "official_scores_to_ours", "class_set_to_official"]


# ---- mmdetection 2.x: mmdet/models/losses/utils.py, cross_entropy_loss.py, seesaw_loss.py ---------------------

def weight_reduce_loss(loss, weight=None, reduction="mean", avg_factor=None):
    """Follows mmdet 2.x `weight_reduce_loss` (mmdet/models/losses/utils.py): elementwise weight, then the
    reduction; with an avg_factor, 'mean' is sum / avg_factor. (Later 2.x releases divide by avg_factor + float32
    eps, a relative change of about 1e-7 for avg_factor >= 1: left out.)"""
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        if reduction == "mean":
            return loss.mean()
        if reduction == "sum":
            return loss.sum()
        return loss
    if reduction == "mean":
        return loss.sum() / avg_factor
    if reduction == "none":
        return loss
    raise ValueError('avg_factor can not be used with reduction="sum"')


def mmdet_cross_entropy(pred, label, weight=None, reduction="mean", avg_factor=None):
    """Follows mmdet 2.x `cross_entropy` (mmdet/models/losses/cross_entropy_loss.py) without class weights:
    per-element softmax cross-entropy, then `weight_reduce_loss` with the (float) label weights."""
    loss = F.cross_entropy(pred, label, reduction="none")
    if weight is not None:
        weight = weight.to(loss.dtype)
    return weight_reduce_loss(loss, weight=weight, reduction=reduction, avg_factor=avg_factor)


def seesaw_ce_loss(cls_score, labels, label_weights, cum_samples, num_classes, p, q, eps, reduction="mean",
                   avg_factor=None):
    """Follows mmdet 2.x `seesaw_ce_loss` (mmdet/models/losses/seesaw_loss.py): the class logits of the positive
    rows are shifted by log(mitigation * compensation) off the label column, then softmax cross-entropy."""
    assert cls_score.size(-1) == num_classes
    assert len(cum_samples) == num_classes
    onehot = F.one_hot(labels.long(), num_classes)
    weights = cls_score.new_ones(onehot.shape)

    if p > 0:  # mitigation: the rarer class j is pushed less by the more frequent label class
        counts = cum_samples.to(cls_score.dtype)
        ratio = counts[None, :].clamp(min=1) / counts[:, None].clamp(min=1)
        smaller = (ratio < 1.0).to(cls_score.dtype)
        per_label = ratio.pow(p) * smaller + (1 - smaller)
        weights = weights * per_label[labels.long(), :]

    if q > 0:  # compensation: a class scoring above the label class is pushed harder
        probs = F.softmax(cls_score.detach(), dim=1)
        own = probs[torch.arange(probs.shape[0], device=probs.device), labels.long()]
        ratio = probs / own[:, None].clamp(min=eps)
        larger = (ratio > 1.0).to(cls_score.dtype)
        weights = weights * (ratio.pow(q) * larger + (1 - larger))

    cls_score = cls_score + weights.log() * (1 - onehot)
    loss = F.cross_entropy(cls_score, labels.long(), reduction="none")
    if label_weights is not None:
        label_weights = label_weights.to(loss.dtype)
    return weight_reduce_loss(loss, weight=label_weights, reduction=reduction, avg_factor=avg_factor)


class MMDetSeesawLoss(nn.Module):
    """Follows mmdet 2.x `SeesawLoss` (mmdet/models/losses/seesaw_loss.py): logits [N, C + 2] (classes, then
    objectness [object, background]); `cum_samples` [C + 1] in mmdet's label order (background last) counts every
    label of every forward, before the loss. `dtype` of the buffer is a port addition (mmdet: float32)."""

    def __init__(self, num_classes, p=0.8, q=2.0, eps=1e-2, loss_weight=1.0, return_dict=True,
                 dtype=torch.float32):
        super().__init__()
        self.num_classes, self.p, self.q, self.eps = num_classes, p, q, eps
        self.loss_weight, self.return_dict = loss_weight, return_dict
        self.register_buffer("cum_samples", torch.zeros(num_classes + 1, dtype=dtype))

    def _split_cls_score(self, cls_score):
        assert cls_score.size(-1) == self.num_classes + 2
        return cls_score[..., :-2], cls_score[..., -2:]

    def get_activation(self, cls_score):
        """[N, C + 1]: class softmax times P(object), then P(background) last."""
        classes, objectness = self._split_cls_score(cls_score)
        score_classes = F.softmax(classes, dim=-1)
        score_obj = F.softmax(objectness, dim=-1)
        return torch.cat([score_classes * score_obj[..., [0]], score_obj[..., [1]]], dim=-1)

    def forward(self, cls_score, labels, label_weights=None, avg_factor=None, reduction="mean"):
        assert cls_score.size(-1) == self.num_classes + 2
        pos_inds = labels < self.num_classes
        obj_labels = (labels == self.num_classes).long()  # 0 object, 1 background

        for value in labels.unique():  # the counts grow before the loss sees them
            self.cum_samples[value] += (labels == value.item()).sum()

        if label_weights is not None:
            label_weights = label_weights.float()
        else:
            label_weights = labels.new_ones(labels.size(), dtype=torch.float)

        classes, objectness = self._split_cls_score(cls_score)
        if pos_inds.sum() > 0:
            loss_classes = self.loss_weight * seesaw_ce_loss(
                classes[pos_inds], labels[pos_inds], label_weights[pos_inds], self.cum_samples[:self.num_classes],
                self.num_classes, self.p, self.q, self.eps, reduction, avg_factor)
        else:
            loss_classes = classes[pos_inds].sum()
        loss_objectness = self.loss_weight * mmdet_cross_entropy(objectness, obj_labels, label_weights, reduction,
                                                                 avg_factor)
        if self.return_dict:
            return {"loss_cls_objectness": loss_objectness, "loss_cls_classes": loss_classes}
        return loss_classes + loss_objectness


def mmdet_avg_factor(label_weights):
    """mmdet 2.x BBoxHead.loss: avg_factor = max(sum(label_weights > 0), 1.) as a Python float."""
    return max(torch.sum(label_weights > 0).float().item(), 1.0)


# ---- EQL v2 authors' code: tztztztztz/eqlv2, mmdet/models/losses/eqlv2.py --------------------------------------

class EQLv2(nn.Module):
    """Follows the authors' `EQLv2` (tztztztztz/eqlv2, mmdet/models/losses/eqlv2.py): cls_score [n_i, C + 1]
    (background last), sigmoid BCE weighted by pos/neg weights from the accumulated gradient ratio, divided by n_i;
    the statistics are collected in forward. The statistics are plain attributes (not buffers), created on the
    first call, whose weights are all 1. The all-reduce runs only in a distributed job (the original calls it
    unconditionally)."""

    def __init__(self, num_classes=1203, gamma=12, mu=0.8, alpha=4.0, loss_weight=1.0):
        super().__init__()
        self.num_classes, self.gamma, self.mu, self.alpha = num_classes, gamma, mu, alpha
        self.loss_weight = loss_weight
        self._pos_grad = None
        self._neg_grad = None
        self.pos_neg = None

    def map_func(self, x):
        return 1 / (1 + torch.exp(-self.gamma * (x - self.mu)))

    def forward(self, cls_score, label):
        self.n_i, self.n_c = cls_score.size()
        target = cls_score.new_zeros(self.n_i, self.n_c)
        target[torch.arange(self.n_i), label] = 1

        pos_w, neg_w = self.get_weight(cls_score)
        weight = pos_w * target + neg_w * (1 - target)
        cls_loss = F.binary_cross_entropy_with_logits(cls_score, target, reduction="none")
        cls_loss = torch.sum(cls_loss * weight) / self.n_i

        self.collect_grad(cls_score.detach(), target.detach(), weight.detach())
        return self.loss_weight * cls_loss

    def get_activation(self, cls_score):
        cls_score = torch.sigmoid(cls_score)
        bg = cls_score[:, -1].view(-1, 1)
        cls_score[:, :-1] *= 1 - bg
        return cls_score

    def collect_grad(self, cls_score, target, weight):
        prob = torch.sigmoid(cls_score)
        grad = torch.abs(target * (prob - 1) + (1 - target) * prob)
        # the background (objectness) column keeps no statistics
        pos_grad = torch.sum(grad * target * weight, dim=0)[:-1]
        neg_grad = torch.sum(grad * (1 - target) * weight, dim=0)[:-1]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(pos_grad)
            dist.all_reduce(neg_grad)
        self._pos_grad += pos_grad
        self._neg_grad += neg_grad
        self.pos_neg = self._pos_grad / (self._neg_grad + 1e-10)

    def get_weight(self, cls_score):
        if self._pos_grad is None:  # no statistics yet: every weight 1
            self._pos_grad = cls_score.new_zeros(self.num_classes)
            self._neg_grad = cls_score.new_zeros(self.num_classes)
            neg_w = cls_score.new_ones((self.n_i, self.n_c))
            pos_w = cls_score.new_ones((self.n_i, self.n_c))
        else:
            neg_w = torch.cat([self.map_func(self.pos_neg), cls_score.new_ones(1)])  # background: 1
            pos_w = 1 + self.alpha * (1 - neg_w)
            neg_w = neg_w.view(1, -1).expand(self.n_i, self.n_c)
            pos_w = pos_w.view(1, -1).expand(self.n_i, self.n_c)
        return pos_w, neg_w


# ---- detectron2: detectron2/modeling/roi_heads/fast_rcnn.py (use_fed_loss) ----------------------------------------

def get_fed_loss_cls_weights(categories: Sequence[dict], freq_weight_power=1.0):
    """Follows detectron2's `get_fed_loss_cls_weights` with the category dicts given directly instead of a
    dataset's metadata: image_count of the categories sorted by id, as float32, to the power (detectron2's
    FED_LOSS_FREQ_WEIGHT_POWER defaults to 0.5)."""
    freq = torch.tensor([c["image_count"] for c in sorted(categories, key=lambda c: c["id"])])
    return freq.float() ** freq_weight_power


def get_fed_loss_classes(gt_classes, num_fed_loss_classes, num_classes, weight, generator=None):
    """Follows detectron2's `get_fed_loss_classes`: the unique gt classes (background K included when present),
    plus num_fed_loss_classes - len(unique) negatives drawn by torch.multinomial without replacement from the
    weights of the classes not present (background never drawn). `generator` is a port addition."""
    unique = torch.unique(gt_classes)
    prob = unique.new_ones(num_classes + 1).float()
    prob[-1] = 0
    if len(unique) < num_fed_loss_classes:
        prob[:num_classes] = weight.float().clone()
        prob[unique] = 0
        negatives = torch.multinomial(prob, num_fed_loss_classes - len(unique), replacement=False,
                                      generator=generator)
        return torch.cat([unique, negatives])
    return unique


class FedLossFastRCNN:
    """Follows the federated part of detectron2's `FastRCNNOutputLayers.sigmoid_cross_entropy_loss`: logits
    [N, K + 1], one-hot targets over K + 1 columns cut to K, BCE on the K class columns, weighted by the mask of the
    federated classes, summed and divided by N. `fed_loss_classes` (a port addition) replaces the draw with a given
    set of class indices (0..K-1, K = background, which the mask drops)."""

    def __init__(self, weight, num_fed_loss_classes=50, use_fed_loss=True):
        self.fed_loss_cls_weights = weight
        self.fed_loss_num_classes = num_fed_loss_classes
        self.use_fed_loss = use_fed_loss

    def sigmoid_cross_entropy_loss(self, pred_class_logits, gt_classes, fed_loss_classes=None, generator=None):
        if pred_class_logits.numel() == 0:
            return pred_class_logits.new_zeros([1])[0]
        n = pred_class_logits.shape[0]
        k = pred_class_logits.shape[1] - 1
        target = pred_class_logits.new_zeros(n, k + 1)
        target[range(len(gt_classes)), gt_classes] = 1
        target = target[:, :k]
        cls_loss = F.binary_cross_entropy_with_logits(pred_class_logits[:, :-1], target, reduction="none")
        if self.use_fed_loss:
            if fed_loss_classes is None:
                fed_loss_classes = get_fed_loss_classes(gt_classes, self.fed_loss_num_classes, k,
                                                        self.fed_loss_cls_weights, generator)
            mask = fed_loss_classes.new_zeros(k + 1)
            mask[fed_loss_classes] = 1
            mask = mask[:k]
            weight = mask.view(1, k).expand(n, k).to(cls_loss.dtype)
        else:
            weight = 1
        return torch.sum(cls_loss * weight) / n


# ---- layout helpers (not ports) -----------------------------------------------------------------------------------

def to_official_labels(labels, num_classes, ignore_index=-1, drop_ignored=False):
    """ltkernels labels (0 background, 1..C, ignore_index) to mmdet / detectron2 ones (0..C-1, background C).
    With drop_ignored=False returns (labels, label_weights) with the ignored rows set to background at weight 0
    (mmdet's way of ignoring a row); with drop_ignored=True returns (labels of the kept rows, keep mask)."""
    valid = labels != ignore_index
    off = torch.where(labels > 0, labels - 1, torch.full_like(labels, num_classes))
    off = torch.where(valid, off, torch.full_like(labels, num_classes)).long()
    if drop_ignored:
        return off[valid], valid
    return off, valid.float()


def official_scores_to_ours(scores):
    """[N, C + 1] background-last scores to ltkernels' background-first order."""
    return torch.cat([scores[:, -1:], scores[:, :-1]], dim=1)


def class_set_to_official(classes: torch.Tensor, labels: torch.Tensor, ignore_index=-1) -> torch.Tensor:
    """A bool [C] class set (ltkernels' columns) to detectron2's index list (background index C appended when a
    non-ignored background row exists, as `get_fed_loss_classes` includes it)."""
    idx = torch.nonzero(classes).flatten()
    if bool(((labels == 0) & (labels != ignore_index)).any()):
        idx = torch.cat([idx, idx.new_tensor([classes.shape[0]])])
    return idx
