"""The bundled synthetic long-tail dataset: deterministic, exact LVIS v1 schema, r/c/f split as specified."""
import hashlib
import json
import os
from collections import defaultdict

import pytest
from PIL import Image

from ltkernels.models.data.lvis import resolve_image_path
from ltkernels.models.data.synthetic import MAX_CLASSES, class_attributes, frequency_of, write_synthetic_lvis

SMALL = dict(num_classes=12, num_train_images=60, num_val_images=20, image_size=(64, 80))


def _digest(root):
    h = {}
    for dirpath, _, files in os.walk(root):
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                h[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return h


@pytest.fixture(scope="module")
def default_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_default")
    info = write_synthetic_lvis(str(out))
    return info


def test_deterministic(tmp_path):
    a = write_synthetic_lvis(str(tmp_path / "a"), seed=3, **SMALL)
    write_synthetic_lvis(str(tmp_path / "b"), seed=3, **SMALL)
    write_synthetic_lvis(str(tmp_path / "c"), seed=4, **SMALL)
    da, db, dc = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert len(da) == 2 + 60 + 20
    assert da == db  # every file byte-identical: both annotation files and all images
    assert da["lvis_v1_train_synth.json"] != dc["lvis_v1_train_synth.json"]
    assert os.path.basename(a["train_ann"]) == "lvis_v1_train_synth.json"
    assert os.path.basename(a["val_ann"]) == "lvis_v1_val_synth.json"


def test_class_attributes_are_distinct():
    combos = {class_attributes(k) for k in range(MAX_CLASSES)}
    assert MAX_CLASSES >= 1230 and len(combos) == MAX_CLASSES
    first = [class_attributes(k) for k in range(11)]
    assert len({s for s, _, _ in first}) == 11  # the first classes all differ in shape


def test_loads_with_lvis_api_and_schema(default_set):
    import numpy as np
    if "float" not in np.__dict__:
        np.float = float
    from lvis import LVIS

    for split in ("train_ann", "val_ann"):
        path = default_set[split]
        lv = LVIS(path)
        data = lv.dataset
        assert set(data) == {"info", "licenses", "images", "annotations", "categories"}
        assert len(lv.get_cat_ids()) == 40
        for img in data["images"]:
            assert set(img) == {"id", "width", "height", "coco_url", "flickr_url", "license", "date_captured",
                                "neg_category_ids", "not_exhaustive_category_ids"}
            p = resolve_image_path(img, default_set["image_root"])
            assert p == os.path.join(default_set["image_root"], *img["coco_url"].split("/")[-2:])
        for a in data["annotations"][:200]:
            assert set(a) == {"id", "image_id", "category_id", "bbox", "area", "segmentation"}
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0 and 0 < a["area"] <= w * h
            assert x >= 0 and y >= 0 and x + w <= 160 and y + h <= 160
        for c in data["categories"]:
            assert set(c) == {"id", "name", "synset", "synonyms", "def", "frequency", "image_count",
                              "instance_count"}
        # federated lists are consistent with the annotations
        present = defaultdict(set)
        for a in data["annotations"]:
            present[a["image_id"]].add(a["category_id"])
        for img in data["images"]:
            assert not set(img["neg_category_ids"]) & present[img["id"]]
            assert set(img["not_exhaustive_category_ids"]) <= present[img["id"]]
        # a few images: real files with the declared size
        for img in data["images"][:3]:
            with Image.open(resolve_image_path(img, default_set["image_root"])) as im:
                assert im.size == (img["width"], img["height"]) and im.mode == "RGB"


def test_frequency_split_and_val_coverage(default_set):
    train = json.load(open(default_set["train_ann"]))
    val = json.load(open(default_set["val_ann"]))
    assert len(train["images"]) == 900 and len(val["images"]) == 200
    imgs, inst = defaultdict(set), defaultdict(int)
    for a in train["annotations"]:
        imgs[a["category_id"]].add(a["image_id"])
        inst[a["category_id"]] += 1
    groups = defaultdict(list)
    for c in train["categories"]:
        n = len(imgs[c["id"]])
        assert n >= 1
        assert c["image_count"] == n and c["instance_count"] == inst[c["id"]]
        assert c["frequency"] == frequency_of(n)
        assert c["frequency"] == ("r" if n <= 10 else "c" if n <= 100 else "f")
        groups[c["frequency"]].append(c["id"])
    # roughly a third each, rare ones at the tail (ids ordered by frequency)
    assert all(10 <= len(groups[g]) <= 16 for g in "rcf"), {g: len(v) for g, v in groups.items()}
    assert max(groups["f"]) < min(groups["c"]) and max(groups["c"]) < min(groups["r"])
    # the val file carries the training statistics, like LVIS
    assert val["categories"] == train["categories"]
    # val covers all classes, roughly balanced
    val_imgs = defaultdict(set)
    for a in val["annotations"]:
        val_imgs[a["category_id"]].add(a["image_id"])
    counts = [len(val_imgs[c]) for c in range(1, 41)]
    assert min(counts) >= 5 and max(counts) <= 3 * min(counts)
    assert not {i["id"] for i in train["images"]} & {i["id"] for i in val["images"]}


def test_many_classes_still_run(tmp_path):
    info = write_synthetic_lvis(str(tmp_path), num_classes=1230, num_train_images=200, num_val_images=50,
                                image_size=(64, 64), min_val_images_per_class=1)
    train = json.load(open(info["train_ann"]))
    assert len(train["categories"]) == 1230
    assert len({c["name"] for c in train["categories"]}) == 1230
    assert sum(info["frequency_counts"].values()) == 1230
    assert info["num_val_images"] >= 1230 / 4  # grown to cover the classes
    with pytest.raises(ValueError):
        write_synthetic_lvis(str(tmp_path / "x"), num_classes=MAX_CLASSES + 1)


def test_val_ground_truth_evaluates_to_ap_one(default_set):
    import numpy as np

    from ltkernels.models.data.lvis import LVISDetection
    from ltkernels.models.evaluation.lvis_eval import evaluate_detections, instance_bin

    ds = LVISDetection(default_set["val_ann"], default_set["image_root"], check_images=False)
    dets = []
    for i in range(len(ds)):
        boxes, labels = ds.annotations(i)
        dets.append({"image_id": ds.image_ids[i], "boxes": boxes, "scores": np.ones(len(labels)), "labels": labels})
    m = evaluate_detections(default_set["val_ann"], dets)
    for k in ("AP", "AP50", "AP75", "APr", "APc", "APf", "AP1", "AP2", "AP3"):
        assert m[k] == 1.0 or abs(m[k] - 1.0) < 1e-9, k
    assert all(abs(v - 1.0) < 1e-9 for v in m["per_class_ap"].values())
    # the default training counts put classes in bins 1..3 (< 10, 10-100, 100-1000), none >= 1000
    assert {instance_bin(int(c)) for c in ds.instance_counts} == {1, 2, 3} and m["AP4"] == -1.0
