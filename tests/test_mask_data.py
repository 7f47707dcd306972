"""Instance masks in the LVIS loader: polygons and RLE through pycocotools, the transforms, malformed segmentations."""
import json
import logging
import os

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_api

from ltkernels.models.data.lvis import DetectionTransform, LVISDetection
from ltkernels.models.data.masks import check_segmentation, masks_to_rle, rasterize
from ltkernels.models.data.synthetic import write_synthetic_lvis

W, H = 48, 32


def _rect_poly(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _rle(mask, compressed=True):
    r = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
    if compressed:
        return {"size": list(r["size"]), "counts": r["counts"].decode("ascii")}
    flat = mask.astype(np.uint8).flatten(order="F")  # uncompressed: run lengths, column-major, starting with 0s
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _file(tmp_path, anns):
    images = [{"id": 1, "width": W, "height": H, "file_name": "a.png"}]
    data = {"info": {}, "licenses": [], "images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}]}
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(data))
    os.makedirs(tmp_path / "img", exist_ok=True)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    return str(p), str(tmp_path / "img")


def _ann(i, bbox, seg, cat=1):
    return {"id": i, "image_id": 1, "category_id": cat, "bbox": bbox, "area": 1.0, "segmentation": seg}


def test_polygon_and_rle_masks(tmp_path):
    blob = np.zeros((H, W), bool)
    blob[5:20, 30:41] = True
    blob[8:12, 33:36] = False  # a hole, which a polygon outline cannot hold
    anns = [_ann(1, [2, 3, 10, 8], _rect_poly(2, 3, 12, 11)),
            _ann(2, [30, 5, 11, 15], _rle(blob)),
            _ann(3, [30, 5, 11, 15], _rle(blob, compressed=False), cat=2)]
    ann_file, root = _file(tmp_path, anns)
    ds = LVISDetection(ann_file, root, masks=True)
    _, t = ds[0]
    m = t["masks"]
    assert m.dtype == torch.uint8 and m.shape == (3, H, W)
    assert torch.equal(m[1].bool(), torch.from_numpy(blob)) and torch.equal(m[2], m[1])
    expected = mask_api.decode(mask_api.merge(mask_api.frPyObjects(_rect_poly(2, 3, 12, 11), H, W)))
    assert torch.equal(m[0], torch.from_numpy(expected))
    assert m[0].sum() > 0 and m[0, :, 20:].sum() == 0
    # without masks=True nothing is decoded
    assert "masks" not in LVISDetection(ann_file, root)[0][1]


def test_transforms_resize_and_flip_the_masks(tmp_path):
    blob = np.zeros((H, W), bool)
    blob[4:28, 6:20] = True
    anns = [_ann(1, [2, 3, 10, 8], _rect_poly(2, 3, 12, 11)), _ann(2, [6, 4, 14, 24], _rle(blob))]
    ann_file, root = _file(tmp_path, anns)
    plain = LVISDetection(ann_file, root, masks=True)[0][1]["masks"]
    for flip in (0.0, 1.0):
        ds = LVISDetection(ann_file, root, masks=True, transforms=DetectionTransform(64, 200, flip_prob=flip))
        image, t = ds[0]
        m = t["masks"]
        assert m.shape == (2, 64, 96) and tuple(image.shape[-2:]) == (64, 96)
        assert t["flipped"] == bool(flip)
        ref = plain.float()[None]
        ref = torch.nn.functional.interpolate(ref, size=(64, 96), mode="nearest")[0]
        if flip:
            ref = ref.flip(-1)
        agree = (m.float() == ref).float().mean(dim=(1, 2))
        assert (agree > 0.97).all(), agree  # the polygon is redrawn at the new size: only its border may differ
        # the masks stay inside their (transformed) boxes
        for k in range(2):
            ys, xs = torch.nonzero(m[k], as_tuple=True)
            x1, y1, x2, y2 = t["boxes"][k].tolist()
            assert xs.min() >= x1 - 2 and xs.max() <= x2 + 1 and ys.min() >= y1 - 2 and ys.max() <= y2 + 1


def test_malformed_segmentations_are_skipped_and_counted(tmp_path, caplog):
    good = _rect_poly(2, 3, 12, 11)
    anns = [_ann(1, [2, 3, 10, 8], good),
            _ann(2, [2, 3, 10, 8], [[2, 3, 12, 3, 12]]),  # odd coordinate count
            _ann(3, [2, 3, 10, 8], [[2, 3, 12, 3]]),  # 2 points
            _ann(4, [2, 3, 10, 8], []),  # no polygon
            _ann(5, [2, 3, 10, 8], [[2, 3, 12, 3, "x", 9]]),  # not a number
            _ann(6, [2, 3, 10, 8], [[2, 3, 12, 3, float("nan"), 9]]),  # not finite
            _ann(7, [2, 3, 10, 8], _rle(np.ones((H + 1, W), bool))),  # RLE of the wrong size
            _ann(8, [2, 3, 10, 8], {"size": [H, W]}),  # RLE without counts
            _ann(9, [2, 3, 10, 8], {"size": [H, W], "counts": [5, 7]}),  # counts that do not cover the image
            _ann(10, [2, 3, 10, 8], "polygon"),  # neither
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 8]}]  # none
    ann_file, root = _file(tmp_path, anns)
    with caplog.at_level(logging.WARNING, logger="ltkernels.models.data.lvis"):
        ds = LVISDetection(ann_file, root, masks=True)
    s = ds.skipped
    assert (s["bad_polygon_odd"], s["bad_polygon_points"], s["bad_polygon_value"], s["bad_rle_size"],
            s["bad_rle"], s["missing_segmentation"]) == (1, 2, 2, 1, 2, 2)
    assert "odd number of coordinates" in caplog.text and "RLE segmentations whose size" in caplog.text
    _, t = ds[0]
    assert t["masks"].shape == (1, H, W) and t["boxes"].shape == (1, 4)
    # the same file for boxes alone keeps every annotation with a good box
    assert LVISDetection(ann_file, root)[0][1]["boxes"].shape == (11, 4)


def test_check_segmentation_canonical_forms():
    assert check_segmentation([[0, 0, 4, 0, 4, 4]], 8, 8) == ([[0.0, 0.0, 4.0, 0.0, 4.0, 4.0]], None)
    rle, defect = check_segmentation({"size": [2, 3], "counts": b"06"}, 2, 3)
    assert defect is None and rle["counts"] == "06"
    assert check_segmentation({"size": [2, 3], "counts": "06"}, None, None)[1] is None  # size unknown: trusted


def test_rasterize_and_rle_round_trip():
    rng = np.random.default_rng(0)
    masks = torch.from_numpy(rng.random((4, 13, 17)) > 0.6)
    rles = masks_to_rle(masks)
    assert all(isinstance(r["counts"], str) for r in rles)
    back = rasterize(rles, (13, 17), (13, 17))
    assert torch.equal(back.bool(), masks)
    assert masks_to_rle(torch.zeros(0, 5, 5, dtype=torch.bool)) == []
    assert rasterize([], (5, 5), (3, 4)).shape == (0, 3, 4)


def test_synthetic_set_has_masks_inside_the_boxes(tmp_path):
    out = write_synthetic_lvis(str(tmp_path), num_classes=6, num_train_images=6, num_val_images=2,
                               image_size=(64, 96), seed=3)
    ds = LVISDetection(out["train_ann"], out["image_root"], masks=True)
    assert sum(v for k, v in ds.skipped.items()) == 0
    n = 0
    for i in range(len(ds)):
        _, t = ds[i]
        for m, b in zip(t["masks"], t["boxes"]):
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert len(xs) > 0
            x1, y1, x2, y2 = b.tolist()
            assert xs.min() >= x1 - 1 and xs.max() <= x2 and ys.min() >= y1 - 1 and ys.max() <= y2
            n += 1
    assert n > 5
