"""A RetinaNet-style one-stage detector: backbone + FPN, a shared dense head (classification and box towers),
IoU-based anchor assignment, a classification loss from ltkernels (`EqualizedFocalLoss`; with scale 0 it is
exactly sigmoid focal loss) and post-processing with `ltkernels.batched_nms`."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.ops import clip_boxes_to_image

import ltkernels

from ..configs.schema import model_config
from .backbone import build_backbone
from .heads import match_labels
from .two_stage import batch_images, make_anchor_generator


class DenseHead(nn.Module):
    def __init__(self, channels: int, num_anchors: int, num_classes: int, num_convs: int = 4, prior: float = 0.01):
        super().__init__()

        def tower():
            layers = []
            for _ in range(num_convs):
                layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(min(32, channels // 4), channels),
                           nn.ReLU(inplace=True)]
            return nn.Sequential(*layers)

        self.cls_tower, self.box_tower = tower(), tower()
        self.cls_logits = nn.Conv2d(channels, num_anchors * num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(channels, num_anchors * 4, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        # prior-probability init: every anchor starts at p = 0.01 for every class
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior) / prior))
        self.num_classes = num_classes

    def forward(self, features: list):
        """Per level: logits [N, H*W*A, C] and deltas [N, H*W*A, 4] in the anchor generator's (H, W, A) order."""
        cls_out, box_out = [], []
        for f in features:
            n, _, h, w = f.shape
            c = self.cls_logits(self.cls_tower(f)).view(n, -1, self.num_classes, h, w)
            b = self.bbox_pred(self.box_tower(f)).view(n, -1, 4, h, w)
            cls_out.append(c.permute(0, 3, 4, 1, 2).reshape(n, -1, self.num_classes))
            box_out.append(b.permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
        return cls_out, box_out


class OneStageDetector(nn.Module):
    """`cls_loss`: "efl" (EqualizedFocalLoss with `efl_scale`, default 8) or "focal" (the same module, scale 0)."""

    def __init__(self, cfg, num_classes: int, instance_counts=None):
        super().__init__()
        cfg = model_config(cfg)
        self.cfg = cfg
        self.num_classes = num_classes
        self.backbone = build_backbone(cfg, one_stage=True)
        self.anchor_generator = make_anchor_generator(self.backbone.strides, cfg)
        self.head = DenseHead(self.backbone.out_channels, self.anchor_generator.num_anchors_per_location()[0],
                              num_classes, cfg.head_convs)
        kind = cfg.cls_loss
        if kind not in ("efl", "focal"):
            raise ValueError(f"unknown one-stage cls_loss {kind!r}")
        scale = cfg.efl_scale if kind == "efl" else 0.0
        self.cls_loss_fn = ltkernels.EqualizedFocalLoss(num_classes, gamma_b=cfg.efl_gamma_b,
                                                        scale=scale, alpha=cfg.focal_alpha)
        self.matcher = Matcher(cfg.fg_iou, cfg.bg_iou, allow_low_quality_matches=True)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.score_thresh = cfg.score_thresh
        self.topk_candidates = cfg.topk_candidates
        self.nms_thresh = cfg.nms_thresh
        self.detections_per_img = cfg.detections_per_img
        self.size_divisible = max(32, max(self.backbone.strides))

    def forward(self, images: list, targets: list | None = None):
        image_list = batch_images(images, self.size_divisible)
        features = list(self.backbone(image_list.tensors).values())
        cls_out, box_out = self.head(features)
        anchors = self.anchor_generator(image_list, features)
        if targets is not None:
            return self.losses(torch.cat(cls_out, 1), torch.cat(box_out, 1), anchors, targets)
        return self.postprocess(cls_out, box_out, anchors, [f.shape[-2] * f.shape[-1] for f in features],
                                image_list.image_sizes)

    def losses(self, logits, deltas, anchors, targets):
        labels, reg_t, reg_p = [], [], []
        for i, (a, tgt) in enumerate(zip(anchors, targets)):
            idx, lab = match_labels(self.matcher, tgt["boxes"], tgt["labels"], a)
            labels.append(lab)
            pos = torch.where(lab > 0)[0]
            reg_t.append(self.box_coder.encode_single(tgt["boxes"][idx[pos]], a[pos]))
            reg_p.append(deltas[i, pos])
        labels = torch.cat(labels)
        num_pos = max(int((labels > 0).sum()), 1)
        loss_cls = self.cls_loss_fn(logits.reshape(-1, self.num_classes).float(), labels)
        loss_box = F.l1_loss(torch.cat(reg_p).float(), torch.cat(reg_t), reduction="sum") / num_pos
        return {"loss_cls": loss_cls, "loss_box": loss_box}

    @torch.no_grad()
    def postprocess(self, cls_out, box_out, anchors, level_sizes, image_sizes, iou_out=None):
        """`iou_out` (per level [N, H*W*A] IoU logits, optional): multiplied into the class probabilities."""
        num_a = self.anchor_generator.num_anchors_per_location()[0]
        split = [n * num_a for n in level_sizes]
        results = []
        for i, size in enumerate(image_sizes):
            boxes_all, scores_all, labels_all = [], [], []
            for lv, (logits, deltas, a) in enumerate(zip(cls_out, box_out, anchors[i].split(split))):
                scores = logits[i].float().sigmoid()
                if iou_out is not None:
                    scores = scores * iou_out[lv][i].float().sigmoid()[:, None]
                scores = scores.flatten()
                cand = torch.where(scores > self.score_thresh)[0]
                scores, order = scores[cand].topk(min(self.topk_candidates, len(cand)))
                cand = cand[order]
                anchor_idx, cls = cand // self.num_classes, cand % self.num_classes + 1
                boxes = self.box_coder.decode_single(deltas[i, anchor_idx].float(), a[anchor_idx])
                boxes_all.append(clip_boxes_to_image(boxes, size))
                scores_all.append(scores)
                labels_all.append(cls)
            boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
            keep = ltkernels.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results
