"""The RoI box head of the two-stage detector: ltkernels multi-level RoIAlign -> two FC layers -> a classifier
whose loss is pluggable (softmax cross-entropy, BAGS group softmax, SimCal calibration head with dual-head
inference) and a class-specific box regressor; post-processing with `ltkernels.multiclass_nms`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.ops import box_iou, clip_boxes_to_image

import ltkernels

from ..configs.schema import model_config


def match_labels(matcher: Matcher, gt_boxes: torch.Tensor, gt_labels: torch.Tensor, boxes: torch.Tensor):
    """Per box: the index of its matched ground truth (clamped to >= 0) and its label (0 background, -1 ignore)."""
    if gt_boxes.numel() == 0:
        zeros = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
        return zeros, zeros.clone()
    idx = matcher(box_iou(gt_boxes, boxes))
    labels = gt_labels[idx.clamp(min=0)].to(torch.int64)
    labels[idx == Matcher.BELOW_LOW_THRESHOLD] = 0
    labels[idx == Matcher.BETWEEN_THRESHOLDS] = -1
    return idx.clamp(min=0), labels


class RoIBoxHead(nn.Module):
    """`cls_mode`: "softmax" (C + 1 logits, cross-entropy), "bags" (`groups.num_logits` logits, GroupSoftmaxLoss),
    "seesaw" (C + 2 logits, SeesawLoss), "eqlv2" (C + 1 sigmoid logits, EQLv2Loss) or "federated" (C sigmoid logits,
    FederatedLoss weighted by `image_counts ** 0.5`).
    `simcal_tail_threshold`: if set, a calibration classifier (C + 1 logits) is added; classes with fewer training
    instances than the threshold take its softmax probabilities at inference (dual head)."""

    def __init__(self, in_channels: int, strides, num_classes: int, instance_counts, cfg, image_counts=None):
        cfg = model_config(cfg)
        super().__init__()
        self.num_classes = num_classes
        p = cfg.pool_size
        self.pooler = ltkernels.MultiLevelRoIAlign(
            (p, p), sampling_ratio=cfg.sampling_ratio, canonical_scale=cfg.canonical_scale,
            canonical_level=cfg.canonical_level, aligned=True, strides=tuple(strides))
        rep = cfg.representation_size
        self.fc6 = nn.Linear(in_channels * p * p, rep)
        self.fc7 = nn.Linear(rep, rep)
        self.cls_mode = cfg.cls_loss
        counts = torch.as_tensor(list(instance_counts), dtype=torch.int64)
        if len(counts) != num_classes:
            raise ValueError(f"instance_counts has {len(counts)} entries for {num_classes} classes")
        self.register_buffer("instance_counts", counts, persistent=False)
        if self.cls_mode == "bags":
            self.cls_loss_fn = ltkernels.GroupSoftmaxLoss(
                instance_counts=counts.tolist(), bounds=tuple(cfg.bags_bounds),
                others_ratio=cfg.bags_others_ratio)
            self.groups = self.cls_loss_fn.groups
            num_logits = self.groups.num_logits
        elif self.cls_mode == "softmax":
            num_logits = num_classes + 1
        elif self.cls_mode in ("seesaw", "eqlv2", "federated"):
            if self.cls_mode == "seesaw":
                self.cls_loss_fn = ltkernels.SeesawLoss(num_classes, p=cfg.seesaw_p, q=cfg.seesaw_q)
            elif self.cls_mode == "eqlv2":
                self.cls_loss_fn = ltkernels.EQLv2Loss(num_classes, gamma=cfg.eqlv2_gamma, mu=cfg.eqlv2_mu,
                                                       alpha=cfg.eqlv2_alpha)
            else:
                images = counts if image_counts is None else torch.as_tensor(list(image_counts), dtype=torch.int64)
                if len(images) != num_classes:
                    raise ValueError(f"image_counts has {len(images)} entries for {num_classes} classes")
                self.cls_loss_fn = ltkernels.FederatedLoss(images.double() ** cfg.fed_loss_power,
                                                           num_fed_classes=cfg.fed_loss_num_classes)
            num_logits = self.cls_loss_fn.num_outputs
        else:
            raise ValueError(f"unknown cls_loss {self.cls_mode!r}")
        self.cls_score = nn.Linear(rep, num_logits)
        self.bbox_pred = nn.Linear(rep, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)
        self.calib_score = None
        tail_t = cfg.simcal_tail_threshold
        if tail_t is not None:
            if self.cls_mode != "softmax":
                raise ValueError("SimCal calibrates a softmax classifier")
            self.calib_score = nn.Linear(rep, num_classes + 1)
            tail = torch.cat([torch.zeros(1, dtype=torch.bool), counts < tail_t])
            self.register_buffer("tail_mask", tail, persistent=False)
        self.box_coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
        self.matcher = Matcher(cfg.fg_iou, cfg.fg_iou, allow_low_quality_matches=False)
        self.sampler = BalancedPositiveNegativeSampler(cfg.batch_size_per_image,
                                                       cfg.positive_fraction)
        self.score_thresh = cfg.score_thresh
        self.nms_thresh = cfg.nms_thresh
        self.detections_per_img = cfg.detections_per_img
        self.train_calibration = False  # SimCal stage 2: only the calibration classifier is trained
        self.use_dual_head = True

    # ------------------------------------------------------------------------------------------ features
    def box_features(self, features: list, proposals: list) -> torch.Tensor:
        with torch.autocast(features[0].device.type, enabled=False):
            pooled = self.pooler([f.float() for f in features], [p.float() for p in proposals])
        x = F.relu(self.fc6(pooled.flatten(1)))
        return F.relu(self.fc7(x))

    def class_scores(self, x: torch.Tensor) -> torch.Tensor:
        """[K, C + 1] probabilities, column 0 background."""
        logits = self.cls_score(x).float()
        if self.cls_mode == "bags":
            return ltkernels.group_softmax_scores(logits, self.groups)
        if self.cls_mode in ("seesaw", "eqlv2", "federated"):
            return self.cls_loss_fn.scores(logits)
        probs = logits.softmax(-1)
        if self.calib_score is not None and self.use_dual_head:
            calibrated = self.calib_score(x).float().softmax(-1)
            probs = torch.where(self.tail_mask, calibrated, probs)
        return probs

    def class_weight_norms(self) -> torch.Tensor:
        """L2 norm of each class's classifier weight vector, [C] in label order (the BAGS paper's figure)."""
        w = self.cls_score.weight.detach().float()
        if self.cls_mode == "bags":
            return w[self.groups.score_column[1:].to(w.device)].norm(dim=1)
        if self.cls_mode in ("seesaw", "eqlv2", "federated"):  # the classes come first
            return w[:self.num_classes].norm(dim=1)
        return w[1:].norm(dim=1)

    # ------------------------------------------------------------------------------------------ training
    def select_training_samples(self, proposals, targets):
        """Add the ground truth to the proposals, match them, sample 512 RoIs per image at 1:3."""
        props, labels, reg_targets = [], [], []
        for boxes, tgt in zip(proposals, targets):
            gt_boxes, gt_labels = tgt["boxes"], tgt["labels"]
            boxes = torch.cat([boxes, gt_boxes.to(boxes.dtype)])
            idx, lab = match_labels(self.matcher, gt_boxes, gt_labels, boxes)
            pos, neg = self.sampler([lab])
            keep = torch.where(pos[0] | neg[0])[0]
            boxes, idx, lab = boxes[keep], idx[keep], lab[keep]
            matched = gt_boxes[idx] if gt_boxes.numel() else torch.zeros_like(boxes)
            props.append(boxes)
            labels.append(lab)
            reg_targets.append(self.box_coder.encode_single(matched, boxes))
        return props, torch.cat(labels), torch.cat(reg_targets)

    def select_calibration_samples(self, proposals, targets):
        """SimCal bi-level sampling: per (image, drawn class) keep the positive proposals of that class (and its
        ground-truth boxes) plus as many background proposals, drawn at random."""
        props, labels = [], []
        for boxes, tgt in zip(proposals, targets):
            gt_boxes, gt_labels, c = tgt["boxes"], tgt["labels"], int(tgt["sample_class"])
            boxes = torch.cat([boxes, gt_boxes[gt_labels == c].to(boxes.dtype)])
            _, lab = match_labels(self.matcher, gt_boxes, gt_labels, boxes)
            pos = torch.where(lab == c)[0]
            bg = torch.where(lab == 0)[0]
            bg = bg[torch.randperm(len(bg), device=bg.device)[: len(pos)]]
            keep = torch.cat([pos, bg])
            props.append(boxes[keep])
            labels.append(lab[keep])
        return props, torch.cat(labels)

    def forward(self, features: list, proposals: list, image_sizes, targets=None, return_samples: bool = False):
        """(detections or None, losses); with `return_samples` in training also the sampled RoIs (a list per image)
        and their labels, for the mask head."""
        if targets is not None and self.train_calibration:
            proposals, labels = self.select_calibration_samples(proposals, targets)
            with torch.no_grad():
                x = self.box_features(features, proposals)
            logits = self.calib_score(x).float()
            return None, {"loss_calib": F.cross_entropy(logits, labels)}
        if targets is not None:
            proposals, labels, reg_targets = self.select_training_samples(proposals, targets)
            x = self.box_features(features, proposals)
            logits = self.cls_score(x).float()
            if self.cls_mode != "softmax":
                loss_cls = self.cls_loss_fn(logits, labels)
            else:
                loss_cls = F.cross_entropy(logits, labels)
            losses = {"loss_cls": loss_cls}
            if self.bbox_pred.weight.requires_grad:
                pos = torch.where(labels > 0)[0]
                deltas = self.bbox_pred(x).float().view(len(x), self.num_classes, 4)[pos, labels[pos] - 1]
                losses["loss_box"] = F.smooth_l1_loss(deltas, reg_targets[pos], beta=1 / 9,
                                                      reduction="sum") / max(labels.numel(), 1)
            if return_samples:
                return None, losses, (proposals, labels)
            return None, losses
        return self.postprocess(features, proposals, image_sizes), {}

    # ------------------------------------------------------------------------------------------ inference
    def postprocess(self, features, proposals, image_sizes):
        x = self.box_features(features, proposals)
        scores = self.class_scores(x)[:, 1:]
        deltas = self.bbox_pred(x).float()
        counts = [len(p) for p in proposals]
        boxes = [clip_boxes_to_image(self.box_coder.decode_single(d, p.float()).view(len(p), self.num_classes, 4),
                                     size)
                 for d, p, size in zip(deltas.split(counts), proposals, image_sizes)]
        # the whole batch in one call (per image, the same detections as a multiclass_nms call on that image)
        per_image = ltkernels.batched_multiclass_nms(boxes, list(scores.split(counts)), None, None, self.score_thresh,
                                                     self.nms_thresh, self.detections_per_img)
        return [{"boxes": b, "scores": sc, "labels": lab} for b, sc, lab, _ in per_image]
