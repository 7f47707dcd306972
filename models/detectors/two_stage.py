"""Faster R-CNN with FPN: backbone + torchvision's RPN (its proposal NMS by ltkernels, `rpn.RPN`) + the ltkernels
RoI box head (`heads.RoIBoxHead`); with `mask_head` in the config, Mask R-CNN: the mask branch of
`mask_head.MaskHead` on the box head's positive RoIs, and "masks" (probabilities [K, 28, 28] of each detection's
class) in the detections.

`forward(images, targets)` returns a dict of losses when `targets` is given, else a list of detections
({"boxes", "scores", "labels"}) in the coordinates of the (resized) input images.
Decoupled stage 2 (BAGS, SimCal): `freeze_for_stage(stage)` freezes everything but the classifier being trained
and keeps the frozen parts in eval mode (BatchNorm statistics, RPN test-time proposals)."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RPNHead

from ..configs.schema import ModelConfig, model_config
from .backbone import build_backbone
from .heads import RoIBoxHead
from .mask_head import MaskHead
from .rpn import RPN


def batch_images(images: list, size_divisible: int = 32) -> ImageList:
    """Zero-pad a list of [3, H, W] images to one [N, 3, H', W'] tensor (H', W' multiples of `size_divisible`)."""
    h = max(int(im.shape[-2]) for im in images)
    w = max(int(im.shape[-1]) for im in images)
    h, w = -(-h // size_divisible) * size_divisible, -(-w // size_divisible) * size_divisible
    batch = images[0].new_zeros(len(images), 3, h, w)
    for b, im in zip(batch, images):
        b[:, : im.shape[-2], : im.shape[-1]].copy_(im)
    return ImageList(batch, [(int(im.shape[-2]), int(im.shape[-1])) for im in images])


def make_anchor_generator(strides, cfg: ModelConfig) -> AnchorGenerator:
    scales = cfg.anchor_scales
    ratios = tuple(cfg.anchor_ratios)
    sizes = tuple(tuple(int(s * k) for k in scales) for s in strides)
    return AnchorGenerator(sizes, (ratios,) * len(strides))


class TwoStageDetector(nn.Module):
    def __init__(self, cfg, num_classes: int, instance_counts, image_counts=None):
        super().__init__()
        cfg = model_config(cfg)
        self.cfg = cfg
        self.num_classes = num_classes
        self.backbone = build_backbone(cfg)
        strides = self.backbone.strides
        anchors = make_anchor_generator(strides, cfg)
        rpn_head = RPNHead(self.backbone.out_channels, anchors.num_anchors_per_location()[0])
        self.rpn = RPN(
            anchors, rpn_head, 0.7, 0.3, cfg.rpn_batch_size_per_image, 0.5,
            dict(training=cfg.rpn_pre_nms_top_n_train, testing=cfg.rpn_pre_nms_top_n_test),
            dict(training=cfg.rpn_post_nms_top_n_train, testing=cfg.rpn_post_nms_top_n_test),
            0.7)
        # RoIs are pooled from the levels with stride <= 32 (P6 only feeds the RPN, as in Detectron).
        self.roi_levels = [i for i, s in enumerate(strides) if s <= 32]
        self.roi_heads = RoIBoxHead(self.backbone.out_channels, [strides[i] for i in self.roi_levels],
                                    num_classes, instance_counts, cfg, image_counts)
        self.mask_head = None
        if cfg.mask_head:
            self.mask_head = MaskHead(self.backbone.out_channels, [strides[i] for i in self.roi_levels], num_classes,
                                      channels=cfg.mask_head_channels, sampling_ratio=cfg.sampling_ratio,
                                      canonical_scale=cfg.canonical_scale, canonical_level=cfg.canonical_level)
        self.size_divisible = max(32, max(strides))
        self.stage = "base"

    def forward(self, images: list, targets: list | None = None):
        image_list = batch_images(images, self.size_divisible)
        features = self.backbone(image_list.tensors)
        rpn_targets = None if targets is None else [{"boxes": t["boxes"]} for t in targets]
        proposals, rpn_losses = self.rpn(image_list, features, rpn_targets)
        feats = list(features.values())
        feats = [feats[i] for i in self.roi_levels]
        train_masks = (targets is not None and self.mask_head is not None and self.stage == "base"
                       and not self.roi_heads.train_calibration)
        if train_masks:
            _, roi_losses, (sampled, labels) = self.roi_heads(feats, proposals, image_list.image_sizes, targets,
                                                              return_samples=True)
            roi_losses["loss_mask"] = self.mask_head.loss(feats, sampled, labels, targets)
        else:
            detections, roi_losses = self.roi_heads(feats, proposals, image_list.image_sizes, targets)
        if targets is not None:
            return {**rpn_losses, **roi_losses}
        if self.mask_head is not None:
            self.mask_head.predict(feats, detections)
        return detections

    # ---------------------------------------------------------------------------------- decoupled stage 2
    def freeze_for_stage(self, stage: str) -> None:
        """"base": train everything; "bags": only the (re-initialised) classifier; "simcal": only the calibration
        classifier (bi-level sampled RoIs)."""
        self.stage = stage
        if stage == "base":
            return
        for p in self.parameters():
            p.requires_grad_(False)
        head = self.roi_heads
        if stage == "bags":
            trainable = head.cls_score
        elif stage == "simcal":
            if head.calib_score is None:
                raise ValueError("stage 'simcal' needs a model built with simcal_tail_threshold")
            trainable = head.calib_score
            head.train_calibration = True
        else:
            raise ValueError(f"unknown stage {stage!r}")
        for p in trainable.parameters():
            p.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.stage != "base":  # frozen parts stay in inference behaviour
            self.backbone.eval()
            self.rpn.eval()
            if self.mask_head is not None:
                self.mask_head.eval()
        return self

    def init_stage_from_base(self, base_state: dict) -> list:
        """Load the weights of a trained baseline; BAGS re-initialises its classifier, SimCal's calibration head
        starts from the baseline classifier (as the official code does). Returns the keys not loaded."""
        own = self.state_dict()
        load = {k: v for k, v in base_state.items() if k in own and own[k].shape == v.shape}
        self.load_state_dict(load, strict=False)
        head = self.roi_heads
        if head.calib_score is not None and "roi_heads.cls_score.weight" in load:
            with torch.no_grad():
                head.calib_score.weight.copy_(head.cls_score.weight)
                head.calib_score.bias.copy_(head.cls_score.bias)
        return sorted(set(own) - set(load))
