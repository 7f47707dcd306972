"""torchvision's RPN with its proposal NMS done by ltkernels: one `batched_nms` call for the whole batch.

torchvision's `RegionProposalNetwork.filter_proposals` loops over images and calls its `batched_nms` per image
(per-level segments by coordinate offsets, or a Python loop over levels above 4000 boxes). Here every
(image, level) pair is one segment of a single call; the result equals the per-image loop (same clipping,
same small-box and score filters, same top-n per image)."""
from __future__ import annotations

import torch
from torchvision.models.detection.rpn import RegionProposalNetwork

from ltkernels import batched_nms


class RPN(RegionProposalNetwork):
    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        num_images, device = proposals.shape[0], proposals.device
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.repeat_interleave(torch.arange(len(num_anchors_per_level), device=device),
                                         torch.tensor(num_anchors_per_level, device=device))
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)  # [B, n], per level pre-NMS top-n
        batch_idx = torch.arange(num_images, device=device)[:, None]
        scores = torch.sigmoid(objectness[batch_idx, top_n_idx])
        boxes = proposals[batch_idx, top_n_idx]
        segment = levels[top_n_idx] + batch_idx * len(num_anchors_per_level)

        # clip to each image (x to its width, y to its height), as torchvision's clip_boxes_to_image
        hw = torch.tensor(image_shapes, dtype=boxes.dtype, device=device)  # [B, 2] = (h, w)
        limit = hw.flip(1).repeat(1, 2)[:, None, :]  # [B, 1, 4] = (w, h, w, h)
        boxes = torch.minimum(boxes.clamp(min=0), limit)
        wh = boxes[..., 2:] - boxes[..., :2]
        valid = (wh >= self.min_size).all(-1) & (scores >= self.score_thresh)

        boxes, scores, segment = boxes[valid], scores[valid], segment[valid]
        keep = batched_nms(boxes, scores, segment, self.nms_thresh)  # decreasing score over the whole batch
        image_of_keep = segment[keep] // len(num_anchors_per_level)
        top_n = self.post_nms_top_n()
        final_boxes, final_scores = [], []
        for i in range(num_images):
            k = keep[image_of_keep == i][:top_n]
            final_boxes.append(boxes[k])
            final_scores.append(scores[k])
        return final_boxes, final_scores
