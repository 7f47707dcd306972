"""The improved one-stage baseline of the EFL paper: an ATSS detector (Zhang et al., "Bridging the Gap Between
Anchor-based and Anchor-free Detection via Adaptive Training Sample Selection") with an IoU-prediction branch in
place of centerness, GIoU box loss and two anchor scales per location.

- Assignment (ATSS): for each ground-truth box, on every FPN level the `atss_topk` anchors whose centres are
  nearest to its centre are candidates; the IoU threshold is the mean + standard deviation of the candidates' IoUs;
  candidates at or above it whose centre lies inside the box are positives (an anchor claimed by several boxes goes
  to the one it overlaps most). Everything else is background (no ignored anchors).
- Classification: sigmoid focal loss / EFL (`ltkernels.EqualizedFocalLoss`) against the labels, or quality focal
  loss / EQFL (`ltkernels.EqualizedQualityFocalLoss`) against the IoU of each positive's predicted box with its
  ground truth; normalised by the number of positives (summed over ranks in a distributed job, as EFL's).
- Box regression: GIoU loss on the decoded boxes of the positives (weight `giou_weight`).
- IoU branch (`iou_branch`, default on for focal / EFL, off for QFL / EQFL whose scores already carry the IoU):
  one logit per anchor from the box tower, binary cross-entropy against the positive's IoU (detached); at
  inference the class probability is multiplied by sigmoid(IoU logit).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou, generalized_box_iou_loss

import ltkernels

from ..configs.schema import model_config
from .one_stage import DenseHead, OneStageDetector

QUALITY_LOSSES = ("qfl", "eqfl")


class ATSSHead(DenseHead):
    """DenseHead plus an IoU-prediction conv on the box tower (one logit per anchor)."""

    def __init__(self, channels: int, num_anchors: int, num_classes: int, num_convs: int = 4, iou_branch=True):
        super().__init__(channels, num_anchors, num_classes, num_convs)
        self.iou_pred = nn.Conv2d(channels, num_anchors, 3, padding=1) if iou_branch else None
        if self.iou_pred is not None:
            nn.init.normal_(self.iou_pred.weight, std=0.01)
            nn.init.zeros_(self.iou_pred.bias)

    def forward(self, features: list):
        """Per level: logits [N, H*W*A, C], deltas [N, H*W*A, 4], IoU logits [N, H*W*A] (None without the branch)."""
        cls_out, box_out, iou_out = [], [], []
        for f in features:
            n, _, h, w = f.shape
            c = self.cls_logits(self.cls_tower(f)).view(n, -1, self.num_classes, h, w)
            bt = self.box_tower(f)
            b = self.bbox_pred(bt).view(n, -1, 4, h, w)
            cls_out.append(c.permute(0, 3, 4, 1, 2).reshape(n, -1, self.num_classes))
            box_out.append(b.permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
            if self.iou_pred is not None:
                iou_out.append(self.iou_pred(bt).permute(0, 2, 3, 1).reshape(n, -1))
        return cls_out, box_out, (iou_out if self.iou_pred is not None else None)


def aligned_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of a[i] with b[i], [K]."""
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)
    return inter / (area_a + area_b - inter).clamp(min=1e-6)


@torch.no_grad()
def atss_assign(anchors: torch.Tensor, level_sizes: list, gt_boxes: torch.Tensor, gt_labels: torch.Tensor,
                topk: int):
    """ATSS for one image: (labels [A] (0 background, 1..C), matched ground-truth index [A] (0 where background)).
    `anchors` [A, 4] are the levels' anchors concatenated in `level_sizes` order."""
    num = len(anchors)
    if gt_boxes.numel() == 0:
        zeros = torch.zeros(num, dtype=torch.int64, device=anchors.device)
        return zeros, zeros.clone()
    g = len(gt_boxes)
    ious = box_iou(anchors, gt_boxes)  # [A, G]
    a_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    g_ctr = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    dist = torch.cdist(a_ctr, g_ctr)  # [A, G]
    candidates, start = [], 0
    for size in level_sizes:
        k = min(topk, size)
        candidates.append(dist[start: start + size].topk(k, dim=0, largest=False).indices + start)
        start += size
    cand = torch.cat(candidates)  # [K, G]
    cand_iou = ious.gather(0, cand)
    thr = cand_iou.mean(0) + cand_iou.std(0)  # unbiased std, as the ATSS code
    c = a_ctr[cand]  # [K, G, 2]
    inside = torch.stack([c[..., 0] - gt_boxes[:, 0], c[..., 1] - gt_boxes[:, 1], gt_boxes[:, 2] - c[..., 0],
                          gt_boxes[:, 3] - c[..., 1]], -1).amin(-1) > 0.01
    positive = (cand_iou >= thr[None]) & inside
    claimed = torch.full_like(ious, -1.0)
    gt_index = torch.arange(g, device=anchors.device).expand_as(cand)
    claimed[cand[positive], gt_index[positive]] = ious[cand[positive], gt_index[positive]]
    best, matched = claimed.max(1)
    fg = best >= 0
    labels = torch.where(fg, gt_labels[matched].to(torch.int64), torch.zeros_like(matched))
    return labels, torch.where(fg, matched, torch.zeros_like(matched))


class ATSSDetector(OneStageDetector):
    """`cls_loss`: "focal" (EFL with scale 0), "efl", "qfl" (EQFL with scale 0) or "eqfl"."""

    def __init__(self, cfg, num_classes: int, instance_counts=None):
        cfg = model_config(cfg)
        kind = cfg.cls_loss
        if kind not in ("focal", "efl", *QUALITY_LOSSES):
            raise ValueError(f"unknown ATSS cls_loss {kind!r} (focal, efl, qfl, eqfl)")
        # the parent builds the backbone, anchors, head and an EFL; replaced below where they differ
        super().__init__({**cfg.__dict__, "cls_loss": "efl" if kind in ("efl", "eqfl") else "focal"}, num_classes,
                         instance_counts)
        self.cfg = cfg
        iou_branch = cfg.iou_branch if cfg.iou_branch is not None else kind not in QUALITY_LOSSES
        self.head = ATSSHead(self.backbone.out_channels, self.anchor_generator.num_anchors_per_location()[0],
                             num_classes, cfg.head_convs, iou_branch)
        scale = cfg.efl_scale if kind in ("efl", "eqfl") else 0.0
        if kind in QUALITY_LOSSES:  # no alpha_t, as in quality focal loss and the official EQFL
            self.cls_loss_fn = ltkernels.EqualizedQualityFocalLoss(num_classes, gamma_b=cfg.efl_gamma_b, scale=scale)
        self.quality_targets = kind in QUALITY_LOSSES
        self.box_coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
        self.topk = cfg.atss_topk
        self.giou_weight = cfg.giou_weight

    def forward(self, images: list, targets: list | None = None):
        from .two_stage import batch_images

        image_list = batch_images(images, self.size_divisible)
        features = list(self.backbone(image_list.tensors).values())
        cls_out, box_out, iou_out = self.head(features)
        anchors = self.anchor_generator(image_list, features)
        num_a = self.anchor_generator.num_anchors_per_location()[0]
        level_sizes = [f.shape[-2] * f.shape[-1] * num_a for f in features]
        if targets is not None:
            return self.atss_losses(torch.cat(cls_out, 1), torch.cat(box_out, 1),
                                    torch.cat(iou_out, 1) if iou_out is not None else None, anchors, level_sizes,
                                    targets)
        return self.postprocess(cls_out, box_out, anchors, [f.shape[-2] * f.shape[-1] for f in features],
                                image_list.image_sizes, iou_out)

    def atss_losses(self, logits, deltas, iou_logits, anchors, level_sizes, targets):
        labels, boxes_p, boxes_t, iou_p = [], [], [], []
        for i, (a, tgt) in enumerate(zip(anchors, targets)):
            lab, idx = atss_assign(a, level_sizes, tgt["boxes"], tgt["labels"], self.topk)
            labels.append(lab)
            pos = torch.where(lab > 0)[0]
            boxes_p.append(self.box_coder.decode_single(deltas[i, pos].float(), a[pos]))
            boxes_t.append(tgt["boxes"][idx[pos]].float())
            if iou_logits is not None:
                iou_p.append(iou_logits[i, pos].float())
        labels = torch.cat(labels)
        boxes_p, boxes_t = torch.cat(boxes_p), torch.cat(boxes_t)
        quality = aligned_iou(boxes_p.detach(), boxes_t)
        num_pos = max(int((labels > 0).sum()), 1)
        flat = logits.reshape(-1, self.num_classes).float()
        if self.quality_targets:
            row_quality = torch.zeros(len(labels), device=flat.device)
            row_quality[labels > 0] = quality
            loss_cls = self.cls_loss_fn(flat, labels, row_quality)
        else:
            loss_cls = self.cls_loss_fn(flat, labels)
        losses = {"loss_cls": loss_cls}
        if len(boxes_p):
            loss_box = generalized_box_iou_loss(boxes_p, boxes_t, reduction="sum") / num_pos
        else:
            loss_box = deltas.sum() * 0.0
        losses["loss_box"] = self.giou_weight * loss_box
        if iou_logits is not None:
            if len(boxes_p):
                losses["loss_iou"] = F.binary_cross_entropy_with_logits(torch.cat(iou_p), quality,
                                                                        reduction="sum") / num_pos
            else:
                losses["loss_iou"] = iou_logits.sum() * 0.0
        return losses
