"""LVIS (v0.5 / v1) and COCO-format detection dataset, transforms and collate.

Image paths: an image record with `coco_url` (LVIS v1) resolves to `<image_root>/<last two components of the
url>` (e.g. `http://images.cocodataset.org/train2017/000000000139.jpg` -> `<root>/train2017/000000000139.jpg`);
otherwise `file_name` (LVIS v0.5, COCO) resolves to `<image_root>/<file_name>`.  If that file does not exist but
`<image_root>/<basename>` does, the basename is used.

Malformed input:
- unreadable / invalid JSON, a top-level value that is not an object, a missing top-level key (`images`,
  `annotations`, `categories`), an image or category record missing a required key, or duplicate category ids
  -> `LVISFormatError` (a `ValueError`) naming the file and the key.
- an annotation missing a key (`image_id`, `category_id`, `bbox`), with a bbox that is not 4 numbers or has
  non-positive width / height, an unknown category id, or an unknown image id -> skipped; counted in
  `.skipped` (keys `missing_key`, `bad_bbox`, `unknown_category`, `unknown_image`; crowd boxes, dropped when
  `skip_crowd`, count as `crowd` without a warning) and summarised in
  one `logging.warning`.
- with `masks=True`, an annotation whose segmentation is malformed (see `models.data.masks`: odd coordinate
  count, fewer than 3 points, non-finite values, malformed RLE, RLE of the wrong size, none at all) -> skipped,
  counted per defect (`bad_polygon_odd`, `bad_polygon_points`, `bad_polygon_value`, `bad_rle`, `bad_rle_size`,
  `missing_segmentation`).
- an image whose file is missing (checked at construction when `check_images=True`) -> skipped, counted as
  `missing_image`.  Images without (valid) annotations are kept (they are negatives for the detector) unless
  `skip_empty=True` (counted as `empty_image`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .masks import MASK_DEFECTS, check_segmentation, rasterize

__all__ = ["LVISFormatError", "LVISDetection", "DetectionTransform", "collate_detection", "resolve_image_path",
           "load_annotation_file"]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


_SKIP_TEXT = {
    "missing_key": "annotations missing a key",
    "bad_bbox": "annotations with a bad bbox (not 4 finite numbers or non-positive width / height)",
    "unknown_category": "annotations with an unknown category id",
    "unknown_image": "annotations with an unknown image id",
    "missing_image": "images whose file is missing",
    **MASK_DEFECTS,
}


class LVISFormatError(ValueError):
    """The annotation file cannot be used at all (invalid JSON, a missing top-level key, ...)."""


def load_annotation_file(path: str) -> dict:
    """Read and check the top level of an LVIS / COCO annotation file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise LVISFormatError(f"annotation file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LVISFormatError(f"annotation file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise LVISFormatError(f"annotation file {path}: top level must be a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise LVISFormatError(f"annotation file {path}: missing top-level key '{key}'")
        if not isinstance(data[key], list):
            raise LVISFormatError(f"annotation file {path}: top-level key '{key}' must be a list")
    return data


def resolve_image_path(img: dict, image_root: str) -> str:
    """Path of an image record: LVIS v1 `coco_url` (last two components) or `file_name` (v0.5 / COCO)."""
    if img.get("coco_url"):
        parts = str(img["coco_url"]).rstrip("/").split("/")
        rel = os.path.join(*parts[-2:]) if len(parts) >= 2 else parts[-1]
        path = os.path.join(image_root, rel)
        if not os.path.exists(path):
            alt = os.path.join(image_root, parts[-1])
            if os.path.exists(alt):
                return alt
        return path
    if img.get("file_name"):
        fn = str(img["file_name"])
        path = os.path.join(image_root, fn)
        if not os.path.exists(path):
            alt = os.path.join(image_root, os.path.basename(fn))
            if os.path.exists(alt):
                return alt
        return path
    raise KeyError("coco_url/file_name")


def _int_field(value, ann_file: str, key: str) -> int:
    """An integer field of the file (ids, counts): an int, or a float / string holding one; else an error naming
    the file and the key."""
    if isinstance(value, bool) or value is None:
        ok = False
    elif isinstance(value, int):
        return value
    else:
        try:
            ok = float(value) == int(float(value))
        except (TypeError, ValueError, OverflowError):
            ok = False
    if not ok:
        raise LVISFormatError(f"annotation file {ann_file}: {key} must be an integer, got {value!r}")
    return int(float(value))


def _valid_box(b) -> bool:
    if not isinstance(b, (list, tuple)) or len(b) != 4:
        return False
    try:
        vals = [float(v) for v in b]
    except (TypeError, ValueError):
        return False
    if not all(math.isfinite(v) for v in vals):
        return False
    return vals[2] > 0 and vals[3] > 0


class LVISDetection(torch.utils.data.Dataset):
    """Detection dataset over an LVIS v0.5 / v1 or COCO-format annotation file.

    `__getitem__(i)` -> (image float32 [3, H, W], target dict with `boxes` float32 [K, 4] x1y1x2y2 in the
    transformed image, `labels` int64 [K] contiguous labels 1..C (= category ids for LVIS), `image_id`,
    `orig_size` (h, w), `size` (h, w) after the transform, `scale` (resize factor), `flipped`).  Without
    transforms the image is in [0, 1], scale 1.0, not flipped.  With `masks=True` the target also holds `masks`,
    uint8 [K, h, w] at the transformed size (polygons drawn at that size, RLEs resized; flipped with the image).
    """

    def __init__(self, ann_file: str, image_root: str, transforms=None, skip_crowd: bool = True,
                 check_images: bool = True, skip_empty: bool = False, masks: bool = False):
        self.ann_file = ann_file
        self.image_root = image_root
        self.transforms = transforms
        self.with_masks = bool(masks)
        data = load_annotation_file(ann_file)
        self.skipped: dict[str, int] = {k: 0 for k in ("missing_key", "bad_bbox", "unknown_category",
                                                          "unknown_image", "crowd", "missing_image",
                                                          "empty_image", *MASK_DEFECTS)}

        # categories
        if not data["categories"]:
            raise LVISFormatError(f"annotation file {ann_file}: 'categories' is empty (a detector needs classes)")
        cats = []
        for i, c in enumerate(data["categories"]):
            if not isinstance(c, dict) or "id" not in c:
                raise LVISFormatError(f"annotation file {ann_file}: category #{i} missing key 'id'")
            c = dict(c, id=_int_field(c["id"], ann_file, f"categories[{i}].id"))
            if "instance_count" in c:
                c["instance_count"] = _int_field(c["instance_count"], ann_file, f"categories[{i}].instance_count")
            cats.append(c)
        cats.sort(key=lambda c: c["id"])
        ids = [c["id"] for c in cats]
        dup = sorted({x for x in ids if ids.count(x) > 1}) if len(set(ids)) != len(ids) else []
        if dup:
            raise LVISFormatError(f"annotation file {ann_file}: duplicate category ids {dup[:10]}")
        self.categories: list[dict] = cats
        self.is_lvis = ids == list(range(1, len(ids) + 1))
        self.category_id_to_label: dict[int, int] = {cid: k + 1 for k, cid in enumerate(ids)}
        self.label_to_category_id: dict[int, int] = {k + 1: cid for k, cid in enumerate(ids)}
        self.num_classes = len(ids)

        # images
        images = {}
        for i, img in enumerate(data["images"]):
            if not isinstance(img, dict):
                raise LVISFormatError(f"annotation file {ann_file}: image #{i} is not an object")
            for key in ("id",):
                if key not in img:
                    raise LVISFormatError(f"annotation file {ann_file}: image #{i} missing key '{key}'")
            if not img.get("coco_url") and not img.get("file_name"):
                raise LVISFormatError("annotation file {}: image {} missing key 'coco_url' (v1) or 'file_name'"
                                      " (v0.5 / COCO)".format(ann_file, img["id"]))
            iid = _int_field(img["id"], ann_file, f"images[{i}].id")
            if iid in images:
                raise LVISFormatError(f"annotation file {ann_file}: duplicate image id {iid} "
                                      f"(images[{i}] and an earlier one)")
            images[iid] = img

        # annotations
        per_image: dict[int, list[tuple]] = {k: [] for k in images}
        ann_ids: dict[object, int] = {}
        for i, a in enumerate(data["annotations"]):
            if isinstance(a, dict) and isinstance(a.get("id"), (int, str)):
                if a["id"] in ann_ids:
                    raise LVISFormatError(f"annotation file {ann_file}: duplicate annotation id {a['id']!r} "
                                          f"(annotations[{ann_ids[a['id']]}] and annotations[{i}]); evaluation "
                                          "would match one box twice")
                ann_ids[a["id"]] = i
            if not isinstance(a, dict) or any(k not in a for k in ("image_id", "category_id", "bbox")):
                self.skipped["missing_key"] += 1
                continue
            if skip_crowd and a.get("iscrowd", 0):
                self.skipped["crowd"] += 1
                continue
            if not _valid_box(a["bbox"]):
                self.skipped["bad_bbox"] += 1
                continue
            try:
                cid = int(a["category_id"])
                iid = int(a["image_id"])
            except (TypeError, ValueError):
                self.skipped["missing_key"] += 1
                continue
            if cid not in self.category_id_to_label:
                self.skipped["unknown_category"] += 1
                continue
            if iid not in per_image:
                self.skipped["unknown_image"] += 1
                continue
            seg = None
            if self.with_masks:
                img = images[iid]
                seg, defect = check_segmentation(a.get("segmentation"), img.get("height"), img.get("width"))
                if defect is not None:
                    self.skipped[defect] += 1
                    continue
            x, y, w, h = (float(v) for v in a["bbox"])
            per_image[iid].append(([x, y, x + w, y + h], self.category_id_to_label[cid], seg))

        self._records = []
        self.missing_paths: list[str] = []  # the first few image files that were not found
        for iid in sorted(images):
            img = images[iid]
            path = resolve_image_path(img, image_root)
            if check_images and not os.path.exists(path):
                self.skipped["missing_image"] += 1
                if len(self.missing_paths) < 5:
                    self.missing_paths.append(path)
                continue
            anns = per_image[iid]
            if skip_empty and not anns:
                self.skipped["empty_image"] += 1
                continue
            boxes = np.array([a[0] for a in anns], dtype=np.float32).reshape(-1, 4)
            labels = np.array([a[1] for a in anns], dtype=np.int64)
            self._records.append({"id": iid, "path": path, "boxes": boxes, "labels": labels,
                                  "width": img.get("width"), "height": img.get("height"),
                                  "segmentations": [a[2] for a in anns] if self.with_masks else None})
        self.image_ids: list[int] = [r["id"] for r in self._records]
        self._classes = [frozenset(int(l) for l in r["labels"]) for r in self._records]

        # instance counts per label 1..C: from the categories if all have them, else counted here
        if cats and all("instance_count" in c for c in cats):
            counts = [c["instance_count"] for c in cats]
        else:
            counts = [0] * self.num_classes
            for r in self._records:
                for l in r["labels"]:
                    counts[int(l) - 1] += 1
        self.instance_counts = torch.tensor(counts, dtype=torch.int64)
        # training images per label 1..C (the federated loss's sampling weights): likewise
        if cats and all("image_count" in c for c in cats):
            images = [c["image_count"] for c in cats]
        else:
            images = [0] * self.num_classes
            for classes in self._classes:
                for l in classes:
                    images[l - 1] += 1
        self.image_counts = torch.tensor(images, dtype=torch.int64)
        bad = {k: v for k, v in self.skipped.items() if v and k not in ("crowd", "empty_image")}
        if bad:
            logger.warning("%s: skipped %s", ann_file, ", ".join(f"{v} {_SKIP_TEXT[k]}" for k, v in bad.items()))

    # --------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._records)

    def image_classes(self, i: int) -> set[int]:
        """Labels (= category ids for LVIS) present in image i, without loading it."""
        return set(self._classes[i])

    def all_image_classes(self) -> list[set[int]]:
        return [set(c) for c in self._classes]

    def image_path(self, i: int) -> str:
        return self._records[i]["path"]

    def annotations(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(boxes [K, 4] x1y1x2y2 in original pixels, labels [K]) of image i, without loading it."""
        r = self._records[i]
        return r["boxes"].copy(), r["labels"].copy()

    def __getitem__(self, i: int):
        r = self._records[i]
        try:
            with Image.open(r["path"]) as im:
                im = im.convert("RGB")
                arr = np.asarray(im, dtype=np.uint8).copy()
        except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for damaged / truncated files
            raise OSError(f"image {r['path']} (id {r['id']} of {self.ann_file}) cannot be decoded: {err}") \
                from None
        image = torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)
        h, w = arr.shape[:2]
        target = {
            "boxes": torch.from_numpy(r["boxes"].copy()),
            "labels": torch.from_numpy(r["labels"].copy()),
            "image_id": int(r["id"]),
            "orig_size": (h, w),
            "size": (h, w),
            "scale": 1.0,
            "flipped": False,
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        if self.with_masks:
            target["masks"] = rasterize(r["segmentations"], (h, w), tuple(image.shape[-2:]),
                                        bool(target.get("flipped", False)))
        return image, target


class DetectionTransform:
    """Resize the shorter side to `min_size` (longer side capped at `max_size`), flip horizontally with
    probability `flip_prob`, normalise with mean / std; boxes follow.  `min_size` may be a tuple (one value
    drawn per image, multi-scale training).  Randomness comes from `generator` (a `random.Random`), else
    torch's global generator."""

    def __init__(self, min_size=160, max_size=256, flip_prob: float = 0.5, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, generator: random.Random | None = None):
        self.min_sizes = tuple(min_size) if isinstance(min_size, (tuple, list)) else (min_size,)
        self.max_size = max_size
        self.flip_prob = float(flip_prob)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) if mean is not None else None
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1) if std is not None else None
        self.generator = generator

    def _rand(self) -> float:
        if self.generator is not None:
            return self.generator.random()
        return float(torch.rand(()).item())

    def get_scale(self, h: int, w: int, min_size: int) -> float:
        scale = min_size / float(min(h, w))
        if self.max_size is not None and max(h, w) * scale > self.max_size:
            scale = self.max_size / float(max(h, w))
        return scale

    def __call__(self, image: torch.Tensor, target: dict):
        _, h, w = image.shape
        if len(self.min_sizes) == 1:
            min_size = self.min_sizes[0]
        else:
            min_size = self.min_sizes[min(int(self._rand() * len(self.min_sizes)), len(self.min_sizes) - 1)]
        scale = self.get_scale(h, w, min_size)
        nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        if (nh, nw) != (h, w):
            image = torch.nn.functional.interpolate(image[None], size=(nh, nw), mode="bilinear",
                                                    align_corners=False)[0]
        target = dict(target)
        boxes = target["boxes"].clone().float()
        sx, sy = nw / float(w), nh / float(h)
        boxes[:, 0::2] *= sx
        boxes[:, 1::2] *= sy
        flipped = self.flip_prob > 0 and self._rand() < self.flip_prob
        if flipped:
            image = image.flip(-1)
            x1 = nw - boxes[:, 2]
            x2 = nw - boxes[:, 0]
            boxes[:, 0], boxes[:, 2] = x1, x2
        if self.mean is not None:
            image = (image - self.mean) / self.std
        target["boxes"] = boxes
        target["scale"] = float(target.get("scale", 1.0)) * scale
        target["size"] = (nh, nw)
        target["flipped"] = bool(target.get("flipped", False)) != flipped
        return image.contiguous(), target


def collate_detection(batch):
    """Batch of (image, target) -> (list of images, list of targets); the detector pads them itself."""
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    return images, targets
