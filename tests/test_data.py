"""LVIS / COCO detection dataset, transforms, collate and malformed-file handling."""
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ltkernels.models.data.lvis import (
    DetectionTransform,
    LVISDetection,
    LVISFormatError,
    collate_detection,
    resolve_image_path,
)
from ltkernels.models.data.synthetic import write_synthetic_lvis


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_data")
    return write_synthetic_lvis(str(out), num_classes=10, num_train_images=40, num_val_images=12,
                                image_size=(64, 96), seed=1)


def _write_images(root, names, size=(48, 32)):
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in names:
        arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(root, n))


def _coco(tmp_path, anns, cats=None, images=None, drop=None):
    """A COCO/v0.5-style file (file_name) with two 48x32 images a.png, b.png."""
    images = images if images is not None else [{"id": 1, "width": 48, "height": 32, "file_name": "a.png"},
                                                {"id": 2, "width": 48, "height": 32, "file_name": "b.png"}]
    cats = cats if cats is not None else [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}]
    data = {"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": cats}
    if drop:
        del data[drop]
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(data))
    _write_images(str(tmp_path / "img"), ["a.png", "b.png"])
    return str(p), str(tmp_path / "img")


def _ann(i, img, cat, bbox):
    return {"id": i, "image_id": img, "category_id": cat, "bbox": bbox, "area": 1.0}


def test_loads_synthetic_set(synth):
    ds = LVISDetection(synth["train_ann"], synth["image_root"])
    raw = json.load(open(synth["train_ann"]))
    assert len(ds) == 40 and ds.image_ids == sorted(i["id"] for i in raw["images"])
    assert ds.num_classes == 10 and [c["id"] for c in ds.categories] == list(range(1, 11))
    assert ds.label_to_category_id == {k: k for k in range(1, 11)}
    assert ds.instance_counts.tolist() == [c["instance_count"] for c in raw["categories"]]
    assert all(v == 0 for v in ds.skipped.values())
    image, target = ds[3]
    assert image.dtype == torch.float32 and image.shape == (3, 64, 96)
    assert 0.0 <= image.min().item() and image.max().item() <= 1.0
    anns = [a for a in raw["annotations"] if a["image_id"] == ds.image_ids[3]]
    expect = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                           for a in anns], dtype=torch.float32)
    assert torch.equal(target["boxes"], expect)
    assert target["labels"].dtype == torch.int64
    assert target["labels"].tolist() == [a["category_id"] for a in anns]
    assert target["image_id"] == ds.image_ids[3] and target["orig_size"] == (64, 96)
    assert target["scale"] == 1.0 and target["flipped"] is False
    assert ds.image_classes(3) == {a["category_id"] for a in anns}


def test_resize_flip_transform_moves_boxes(synth):
    plain = LVISDetection(synth["val_ann"], synth["image_root"])
    t = DetectionTransform(min_size=128, max_size=1000, flip_prob=1.0, mean=None, std=None)
    ds = LVISDetection(synth["val_ann"], synth["image_root"], transforms=t)
    img0, tg0 = plain[0]
    img, tg = ds[0]
    assert img.shape == (3, 128, 192) and tg["size"] == (128, 192)
    assert tg["scale"] == pytest.approx(2.0) and tg["flipped"] is True and tg["orig_size"] == (64, 96)
    b0 = tg0["boxes"]
    expect = torch.stack([192 - 2 * b0[:, 2], 2 * b0[:, 1], 192 - 2 * b0[:, 0], 2 * b0[:, 3]], dim=1)
    assert torch.allclose(tg["boxes"], expect)
    ref = torch.nn.functional.interpolate(img0[None], size=(128, 192), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(img, ref.flip(-1))
    # the pixels inside the flipped box are those inside the original box (mirrored)
    x1, y1, x2, y2 = tg["boxes"][0].long().tolist()
    ox1, oy1, ox2, oy2 = (2 * b0[0]).long().tolist()
    assert torch.allclose(img[:, y1:y2, x1:x2], ref[:, oy1:oy2, ox1:ox2].flip(-1))


def test_max_size_cap_and_normalisation(synth):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    t = DetectionTransform(min_size=128, max_size=150, flip_prob=0.0, mean=mean, std=std)
    ds = LVISDetection(synth["val_ann"], synth["image_root"], transforms=t)
    plain = LVISDetection(synth["val_ann"], synth["image_root"])
    img, tg = ds[1]
    img0, tg0 = plain[1]
    # shorter side 64 -> 128 would make the longer 192 > 150: capped, scale = 150 / 96
    assert tg["scale"] == pytest.approx(150 / 96) and img.shape == (3, 100, 150) and tg["flipped"] is False
    assert torch.allclose(tg["boxes"], tg0["boxes"] * (150 / 96), atol=1e-4)
    ref = torch.nn.functional.interpolate(img0[None], size=(100, 150), mode="bilinear", align_corners=False)[0]
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(img, (ref - m) / s, atol=1e-5)


def test_collate_variable_sizes(synth):
    ds = LVISDetection(synth["val_ann"], synth["image_root"], transforms=DetectionTransform(64, 200, 0.5))
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and len(images) == 3 and len(targets) == 3
    assert all(im.shape == (3, 64, 96) for im in images)
    assert [t["image_id"] for t in targets] == ds.image_ids[:3]


def test_coco_format_non_contiguous_ids(tmp_path):
    cats = [{"id": 3, "name": "a"}, {"id": 17, "name": "b"}, {"id": 90, "name": "c"}]
    anns = [_ann(1, 1, 90, [1, 2, 10, 5]), _ann(2, 1, 3, [0, 0, 4, 4]), _ann(3, 2, 17, [5, 5, 10, 10]),
            dict(_ann(4, 2, 17, [5, 5, 10, 10]), iscrowd=1)]
    ann_file, root = _coco(tmp_path, anns, cats=cats)
    ds = LVISDetection(ann_file, root)
    assert ds.num_classes == 3
    assert ds.category_id_to_label == {3: 1, 17: 2, 90: 3}
    assert ds.label_to_category_id == {1: 3, 2: 17, 3: 90}
    _, t = ds[0]
    assert t["labels"].tolist() == [3, 1]
    assert t["boxes"].tolist() == [[1, 2, 11, 7], [0, 0, 4, 4]]
    assert ds.skipped["crowd"] == 1
    assert ds.instance_counts.tolist() == [1, 1, 1]  # counted: COCO categories carry no instance_count
    assert ds.image_classes(1) == {2}


def test_missing_top_level_key(tmp_path):
    for key in ("images", "annotations", "categories"):
        ann_file, root = _coco(tmp_path, [], drop=key)
        with pytest.raises(LVISFormatError, match=f"'{key}'") as e:
            LVISDetection(ann_file, root)
        assert isinstance(e.value, ValueError) and "ann.json" in str(e.value)


def test_invalid_json(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('{"images": [1, 2')
    with pytest.raises(LVISFormatError, match="broken.json"):
        LVISDetection(str(p), str(tmp_path))
    p.write_text("[1, 2, 3]")
    with pytest.raises(LVISFormatError, match="object"):
        LVISDetection(str(p), str(tmp_path))
    with pytest.raises(LVISFormatError, match="not found"):
        LVISDetection(str(tmp_path / "nope.json"), str(tmp_path))


def test_bad_annotations_are_skipped_and_counted(tmp_path, caplog):
    anns = [
        _ann(1, 1, 1, [1, 1, 10, 10]),          # good
        _ann(2, 1, 1, [1, 1, 0, 10]),           # zero width
        _ann(3, 1, 2, [1, 1, 10, -3]),          # negative height
        _ann(4, 1, 2, [1, 1, 10]),              # 3 numbers
        _ann(5, 2, 2, [1, 1, "a", 2]),          # not numbers
        _ann(6, 2, 7, [1, 1, 5, 5]),            # unknown category
        _ann(7, 2, 8, [1, 1, 5, 5]),            # unknown category
        _ann(8, 99, 1, [1, 1, 5, 5]),           # unknown image
        {"id": 9, "image_id": 2, "bbox": [1, 1, 5, 5]},      # no category_id
        {"id": 10, "image_id": 2, "category_id": 1},        # no bbox
        _ann(11, 2, 2, [3, 4, 5, 6]),           # good
    ]
    ann_file, root = _coco(tmp_path, anns)
    with caplog.at_level(logging.WARNING, logger="ltkernels.models.data.lvis"):
        ds = LVISDetection(ann_file, root)
    assert ds.skipped["bad_bbox"] == 4
    assert ds.skipped["unknown_category"] == 2
    assert ds.skipped["unknown_image"] == 1
    assert ds.skipped["missing_key"] == 2
    assert ds.skipped["missing_image"] == 0
    assert len(ds) == 2
    assert ds[0][1]["boxes"].tolist() == [[1, 1, 11, 11]] and ds[1][1]["labels"].tolist() == [2]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one summary line
    msg = warnings[0].getMessage()
    assert "4 annotations with a bad bbox" in msg and "2 annotations with an unknown category id" in msg
    assert "1 annotations with an unknown image id" in msg and "2 annotations missing a key" in msg


def test_missing_image_files_are_skipped(tmp_path):
    images = [{"id": 1, "width": 48, "height": 32, "file_name": "a.png"},
              {"id": 2, "width": 48, "height": 32, "coco_url": "http://images.cocodataset.org/val2017/b.png"},
              {"id": 3, "width": 48, "height": 32, "file_name": "gone.png"}]
    ann_file, root = _coco(tmp_path, [_ann(1, 3, 1, [1, 1, 4, 4])], images=images)
    # v1 rule: the last two components of coco_url
    os.makedirs(os.path.join(root, "val2017"))
    os.rename(os.path.join(root, "b.png"), os.path.join(root, "val2017", "b.png"))
    assert resolve_image_path(images[1], root) == os.path.join(root, "val2017", "b.png")
    ds = LVISDetection(ann_file, root)
    assert ds.skipped["missing_image"] == 1 and ds.image_ids == [1, 2]
    assert ds[1][0].shape == (3, 32, 48)
    unchecked = LVISDetection(ann_file, root, check_images=False)
    assert len(unchecked) == 3 and unchecked.skipped["missing_image"] == 0
    # images without annotations are kept unless skip_empty
    assert len(LVISDetection(ann_file, root, skip_empty=True)) == 0


def test_image_record_without_path_is_an_error(tmp_path):
    images = [{"id": 1, "width": 48, "height": 32}]
    ann_file, root = _coco(tmp_path, [], images=images)
    with pytest.raises(LVISFormatError, match="coco_url"):
        LVISDetection(ann_file, root)
