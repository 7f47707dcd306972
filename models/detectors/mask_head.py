"""The Mask R-CNN mask branch (He et al. 2017, as in detectron2's `MaskRCNNConvUpsampleHead`): RoIAlign 14 x 14 from
the ltkernels multi-level pooler, 4 conv 3x3 + ReLU, a 2x deconv + ReLU, a 1x1 conv to C class-specific 28 x 28
mask logits.

Training: on the positive RoIs the box head sampled, per-pixel binary cross-entropy on the mask of the RoI's
ground-truth class; the targets are cut from the instance masks by `ltkernels.roi_align` (aligned, one sample per
bin as detectron2's `ROIAlign((28, 28), 1.0, 0, aligned=True)`, thresholded at 0.5) in one call per image, without a
Python loop over instances. Inference: the sigmoid of the mask of each detection's predicted class, [K, 28, 28];
`ltkernels.paste_masks` puts them on the image."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

import ltkernels

__all__ = ["MaskHead", "mask_targets", "mask_loss"]


def mask_targets(gt_masks: torch.Tensor, matched: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """float {0, 1} [P, size, size]: the instance mask gt_masks[matched[i]] (uint8/bool [G, H, W]) cut to boxes[i]
    and resampled (bilinear at the bin centres, >= 0.5)."""
    if boxes.numel() == 0:
        return boxes.new_zeros((0, size, size))
    rois = torch.cat([matched.to(boxes.dtype)[:, None], boxes], dim=1).float()
    sampled = ltkernels.roi_align(gt_masks[:, None].float(), rois, (size, size), 1.0, 1, True)
    return (sampled[:, 0] >= 0.5).float()


def mask_loss(class_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel binary cross-entropy of each RoI's class mask logits [P, M, M]; 0 without RoIs."""
    if class_logits.numel() == 0:
        return class_logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(class_logits.float(), targets)


class MaskHead(nn.Module):
    def __init__(self, in_channels: int, strides, num_classes: int, convs: int = 4, channels: int = 256,
                 pool_size: int = 14, sampling_ratio: int = 2, canonical_scale: int = 224, canonical_level: int = 4):
        super().__init__()
        self.num_classes = num_classes
        self.pool_size = pool_size
        self.resolution = 2 * pool_size
        self.pooler = ltkernels.MultiLevelRoIAlign((pool_size, pool_size), sampling_ratio=sampling_ratio,
                                                   canonical_scale=canonical_scale, canonical_level=canonical_level,
                                                   aligned=True, strides=tuple(strides))
        layers = []
        c = in_channels
        for _ in range(convs):
            layers += [nn.Conv2d(c, channels, 3, padding=1), nn.ReLU(inplace=True)]
            c = channels
        self.convs = nn.Sequential(*layers)
        self.deconv = nn.ConvTranspose2d(c, channels, 2, stride=2)
        self.predictor = nn.Conv2d(channels, num_classes, 1)
        for m in [*self.convs, self.deconv]:
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def _upsampled(self, features: list, boxes: list) -> torch.Tensor:
        with torch.autocast(features[0].device.type, enabled=False):
            x = self.pooler([f.float() for f in features], [b.float() for b in boxes])
        return F.relu(self.deconv(self.convs(x)))

    def logits(self, features: list, boxes: list) -> torch.Tensor:
        """[sum K, C, 28, 28] mask logits of the boxes (a list per image) for every class."""
        return self.predictor(self._upsampled(features, boxes))

    def class_logits(self, features: list, boxes: list, labels: torch.Tensor) -> torch.Tensor:
        """[sum K, 28, 28]: `logits(...)[k, labels[k] - 1]`, the only channel training and inference use, with the
        1x1 predictor applied to that class alone (C times less work and memory than all C masks)."""
        x = self._upsampled(features, boxes)
        weight = self.predictor.weight[:, :, 0, 0][labels - 1]
        return torch.einsum("kchw,kc->khw", x, weight) + self.predictor.bias[labels - 1][:, None, None]

    def loss(self, features: list, proposals: list, labels: torch.Tensor, targets: list) -> torch.Tensor:
        """Mask loss on the sampled RoIs `proposals` (a list per image) whose box-head labels are `labels`
        (concatenated): each positive RoI is matched to the ground truth of highest IoU (the box head's matcher
        assigns exactly that one) and learns that instance's mask."""
        counts = [len(p) for p in proposals]
        pos_boxes, pos_labels, mask_t = [], [], []
        for boxes, lab, tgt in zip(proposals, labels.split(counts), targets):
            pos = torch.where(lab > 0)[0]
            b = boxes[pos]
            if len(pos):
                matched = box_iou(tgt["boxes"].to(b.dtype), b).argmax(dim=0)
                mask_t.append(mask_targets(tgt["masks"].to(b.device), matched, b, self.resolution))
            else:
                mask_t.append(b.new_zeros((0, self.resolution, self.resolution)))
            pos_boxes.append(b)
            pos_labels.append(lab[pos])
        labels_pos = torch.cat(pos_labels)
        if labels_pos.numel() == 0:  # keep every parameter in the graph (DDP), contribute nothing
            return sum(p.sum() for p in self.parameters()) * 0.0
        return mask_loss(self.class_logits(features, pos_boxes, labels_pos), torch.cat(mask_t))

    @torch.no_grad()
    def predict(self, features: list, detections: list) -> None:
        """Adds "masks" (probabilities [K, 28, 28] of each detection's class) to every detection dict."""
        boxes = [d["boxes"] for d in detections]
        if sum(len(b) for b in boxes) == 0:
            for d in detections:
                d["masks"] = d["boxes"].new_zeros((0, self.resolution, self.resolution))
            return
        labels = torch.cat([d["labels"] for d in detections])
        probs = self.class_logits(features, boxes, labels).float().sigmoid()
        for d, p in zip(detections, probs.split([len(b) for b in boxes])):
            d["masks"] = p
