"""LVIS box evaluation: exact numbers on hand-built cases, bins, federated rules, empty results; every case runs on
both backends (the official lvis-api and faster-coco-eval's LVIS mode), which must agree."""
import builtins
import json
import os
import sys

import numpy as np
import pytest
import torch

from ltkernels.models.evaluation.lvis_eval import BACKENDS, METRIC_KEYS, evaluate_detections, instance_bin
from ltkernels.models.evaluation.plots import plot_ap_by_bin, plot_ap_vs_instances


def _cat(cid, instance_count=20, image_count=None, frequency=None):
    image_count = instance_count if image_count is None else image_count
    if frequency is None:
        frequency = "r" if image_count <= 10 else ("c" if image_count <= 100 else "f")
    return {"id": cid, "name": f"c{cid}", "synset": f"c{cid}.n.01", "frequency": frequency,
            "image_count": image_count, "instance_count": instance_count}


def _gt_file(path, images, anns, cats):
    """images: list of (id, neg ids, not-exhaustive ids); anns: list of (image id, category id, [x, y, w, h])."""
    data = {
        "info": {}, "licenses": [],
        "images": [{"id": i, "width": 200, "height": 200, "coco_url": f"http://x/val2017/{i:012d}.jpg",
                    "neg_category_ids": list(neg), "not_exhaustive_category_ids": list(nex)}
                   for i, neg, nex in images],
        "annotations": [{"id": k + 1, "image_id": i, "category_id": c, "bbox": list(b), "area": b[2] * b[3],
                         "segmentation": [[b[0], b[1], b[0] + b[2], b[1], b[0] + b[2], b[1] + b[3], b[0],
                                           b[1] + b[3]]]}
                        for k, (i, c, b) in enumerate(anns)],
        "categories": cats,
    }
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


def _xyxy(b):
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


def _dets(items):
    """items: list of (image id, category id, xywh box, score) -> per-image detection dicts (tensors)."""
    by_img = {}
    for i, c, b, s in items:
        by_img.setdefault(i, []).append((c, _xyxy(b), s))
    out = []
    for i, v in sorted(by_img.items()):
        out.append({"image_id": i, "boxes": torch.tensor([x[1] for x in v], dtype=torch.float32),
                    "scores": torch.tensor([x[2] for x in v]), "labels": torch.tensor([x[0] for x in v])})
    return out


# faster-coco-eval divides by tp + fp where lvis-api divides by tp + fp + eps: per-class APs differ by ~1e-16
AGREE_ABS = 1e-12


def _assert_agree(ref, other):
    """Two metric dicts from `evaluate_detections`: the same keys, every value within AGREE_ABS."""
    assert set(ref) == set(other)
    for k, v in ref.items():
        if k == "per_class_ap":
            assert set(v) == set(other[k])
            for c, ap in v.items():
                assert other[k][c] == pytest.approx(ap, abs=AGREE_ABS, rel=0), (k, c)
        else:
            assert other[k] == pytest.approx(v, abs=AGREE_ABS, rel=0), k


def _evaluate(gt, dets, backend, **kwargs):
    """evaluate_detections on `backend`; on faster-coco-eval, also checks it against the lvis-api reference."""
    m = evaluate_detections(gt, dets, backend=backend, **kwargs)
    if backend != "lvis":
        kwargs.pop("out_dir", None)
        _assert_agree(evaluate_detections(gt, dets, backend="lvis", **kwargs), m)
    return m


A = [10, 10, 40, 40]
B = [100, 100, 30, 50]
FAR = [150, 20, 30, 30]


def test_ground_truth_as_detections_gives_ap_one(tmp_path, backend):
    anns = [(1, 1, A), (1, 2, B), (2, 1, [5, 5, 20, 20]), (2, 3, [60, 60, 120, 110]), (3, 2, FAR)]
    gt = _gt_file(tmp_path / "gt.json", [(1, [3], []), (2, [2], []), (3, [1], [])], anns,
                  [_cat(1, 5), _cat(2, 50), _cat(3, 500)])
    dets = _dets([(i, c, b, 1.0) for i, c, b in anns])
    m = _evaluate(gt, dets, out_dir=str(tmp_path / "out"), backend=backend)
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "AP1", "AP2", "AP3"):
        assert m[k] == pytest.approx(1.0), k
    assert m["AP4"] == -1.0  # no class with >= 1000 training instances
    assert m["per_class_ap"] == {1: pytest.approx(1.0), 2: pytest.approx(1.0), 3: pytest.approx(1.0)}
    saved = json.load(open(tmp_path / "out" / "metrics.json"))
    assert set(METRIC_KEYS) <= set(saved) and saved["AP"] == pytest.approx(1.0)
    assert len(json.load(open(tmp_path / "out" / "results.json"))) == len(anns)


def test_hand_computed_101_point_interpolation(tmp_path, backend):
    # one class, two GT boxes on two images; detections ranked TP (0.9), FP (0.8), TP (0.7)
    gt = _gt_file(tmp_path / "gt.json", [(1, [], []), (2, [], [])], [(1, 1, A), (2, 1, B)], [_cat(1, 20)])
    dets = _dets([(1, 1, A, 0.9), (2, 1, FAR, 0.8), (2, 1, B, 0.7)])
    m = _evaluate(gt, dets, backend=backend)
    # recall [.5, .5, 1], precision [1, .5, 2/3] -> interpolated [1, 2/3, 2/3]: 51 recall points (0..0.50)
    # get 1, the other 50 get 2/3
    expected = (51 * 1.0 + 50 * (2.0 / 3.0)) / 101
    assert m["AP"] == pytest.approx(expected, abs=1e-9)
    assert m["AP50"] == pytest.approx(expected, abs=1e-9)
    # FP ranked last changes nothing: AP = 1
    m = _evaluate(gt, _dets([(1, 1, A, 0.9), (2, 1, FAR, 0.1), (2, 1, B, 0.7)]), backend=backend)
    assert m["AP"] == pytest.approx(1.0)


def test_iou_thresholds(tmp_path, backend):
    gt = _gt_file(tmp_path / "gt.json", [(1, [], [])], [(1, 1, [0, 0, 10, 10])], [_cat(1, 20)])
    # IoU 0.78: a true positive at thresholds 0.50 .. 0.75 (6 of 10), a false positive at 0.80 .. 0.95
    m = _evaluate(gt, _dets([(1, 1, [0, 0, 10, 7.8], 1.0)]), backend=backend)
    assert m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0)
    assert m["AP"] == pytest.approx(0.6)


def test_bins_use_training_instance_counts(tmp_path, backend):
    # category 2 has 50 instances in only 9 images: frequency 'r' but bin AP2 (10-100 instances)
    cats = [_cat(1, 5), _cat(2, 50, image_count=9), _cat(3, 500, image_count=300), _cat(4, 5000, image_count=900)]
    anns = [(1, 1, A), (1, 2, B), (2, 3, A), (2, 4, B)]
    gt = _gt_file(tmp_path / "gt.json", [(1, [3, 4], []), (2, [1, 2], [])], anns, cats)
    assert [instance_bin(c["instance_count"]) for c in cats] == [1, 2, 3, 4]
    assert [instance_bin(n) for n in (0, 9, 10, 99, 100, 999, 1000)] == [1, 1, 2, 2, 3, 3, 4]
    dets = _dets([(1, 1, A, 1.0), (2, 3, A, 1.0)])  # perfect on classes 1 and 3, nothing for 2 and 4
    m = _evaluate(gt, dets, backend=backend)
    assert (m["AP1"], m["AP2"], m["AP3"], m["AP4"]) == (pytest.approx(1.0), 0.0, pytest.approx(1.0), 0.0)
    assert m["APr"] == pytest.approx(0.5)  # classes 1 and 2 are both rare by image count
    assert m["APc"] == -1.0
    assert m["APf"] == pytest.approx(0.5)
    assert m["AP"] == pytest.approx(0.5)
    # an explicit training count table overrides the categories' instance_count
    m = _evaluate(gt, dets, train_instance_counts={1: 2000, 2: 3, 3: 3, 4: 3}, backend=backend)
    assert m["AP4"] == pytest.approx(1.0) and m["AP1"] == pytest.approx(1.0 / 3)  # classes 2, 3, 4: 0, 1, 0


def test_federated_unverified_category_is_ignored_neg_is_fp(tmp_path, backend):
    # image 1: GT class 1, class 2 verified absent; image 2: GT class 2; image 3: no GT, no negatives
    images = [(1, [2], []), (2, [], []), (3, [], [])]
    gt = _gt_file(tmp_path / "gt.json", images, [(1, 1, A), (2, 2, B)], [_cat(1), _cat(2)])
    base = [(1, 1, A, 0.5), (2, 2, B, 0.5)]
    # class 1 on image 3 (neither in its GT nor its negatives): ignored, not a false positive
    m = _evaluate(gt, _dets(base + [(3, 1, A, 0.99)]), backend=backend)
    assert m["per_class_ap"][1] == pytest.approx(1.0)
    # class 2 on image 1 (a verified negative): a false positive ranked first -> AP 0.5
    m = _evaluate(gt, _dets(base + [(1, 2, A, 0.99)]), backend=backend)
    assert m["per_class_ap"][2] == pytest.approx(0.5)
    assert m["per_class_ap"][1] == pytest.approx(1.0)
    # class 2 on image 2 (present in GT): an unmatched box is a false positive
    m = _evaluate(gt, _dets(base + [(2, 2, FAR, 0.99)]), backend=backend)
    assert m["per_class_ap"][2] == pytest.approx(0.5)


def test_federated_not_exhaustive_unmatched_is_ignored(tmp_path, backend):
    images = [(1, [], []), (2, [], [2])]
    cats = [_cat(1), _cat(2)]
    dets = _dets([(1, 1, A, 0.5), (2, 2, B, 0.5), (2, 2, FAR, 0.99)])
    m = _evaluate(_gt_file(tmp_path / "gt.json", images, [(1, 1, A), (2, 2, B)], cats), dets,
                  backend=backend)
    assert m["per_class_ap"][2] == pytest.approx(1.0)
    # the same detections when class 2 is exhaustively annotated on image 2
    gt2 = _gt_file(tmp_path / "gt2.json", [(1, [], []), (2, [], [])], [(1, 1, A), (2, 2, B)], cats)
    assert _evaluate(gt2, dets, backend=backend)["per_class_ap"][2] == pytest.approx(0.5)


def test_empty_detections_give_zeros(tmp_path, backend):
    gt = _gt_file(tmp_path / "gt.json", [(1, [], []), (2, [], [])], [(1, 1, A), (2, 2, B)],
                  [_cat(1, 5), _cat(2, 500), _cat(3, 50)])
    for dets in ([], [{"image_id": 1, "boxes": np.zeros((0, 4)), "scores": np.zeros(0),
                       "labels": np.zeros(0, dtype=np.int64)}]):
        m = _evaluate(gt, dets, out_dir=str(tmp_path / "o"), backend=backend)
        assert m["AP"] == 0.0 and m["AP50"] == 0.0 and m["APr"] == 0.0 and m["APf"] == 0.0
        assert m["AP1"] == 0.0 and m["AP3"] == 0.0
        assert m["APc"] == -1.0 and m["AP2"] == -1.0 and m["AP4"] == -1.0  # no GT in these groups
        assert m["per_class_ap"] == {1: 0.0, 2: 0.0, 3: -1.0}
        assert os.path.exists(tmp_path / "o" / "metrics.json")


def test_top_300_per_image(tmp_path, backend):
    gt = _gt_file(tmp_path / "gt.json", [(1, [], [])], [(1, 1, A)], [_cat(1)])
    fps = [(1, 1, [150 + (k % 7), 150, 20, 20], 0.9 - k * 1e-4) for k in range(300)]
    dets = _dets(fps + [(1, 1, A, 0.05)])
    m = _evaluate(gt, dets, out_dir=str(tmp_path / "o"), backend=backend)
    assert m["AP"] == 0.0 and m["num_detections"] == 300  # the true positive is the 301st: cut
    assert len(json.load(open(tmp_path / "o" / "results.json"))) == 300
    m = _evaluate(gt, dets, max_dets=400, backend=backend)
    assert m["AP"] == pytest.approx(1.0 / 301, rel=1e-6)


def test_coco_format_ground_truth(tmp_path, backend):
    data = {"images": [{"id": 7, "width": 100, "height": 100, "file_name": "a.jpg"},
                       {"id": 9, "width": 100, "height": 100, "file_name": "b.jpg"}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 18, "bbox": A, "area": 1600, "iscrowd": 0},
                            {"id": 2, "image_id": 9, "category_id": 90, "bbox": [1, 1, 30, 30], "iscrowd": 0}],
            "categories": [{"id": 18, "name": "dog"}, {"id": 90, "name": "toothbrush"}]}
    p = tmp_path / "coco.json"
    p.write_text(json.dumps(data))
    m = _evaluate(str(p), _dets([(7, 18, A, 0.9), (9, 90, [1, 1, 30, 30], 0.8)]), backend=backend)
    assert m["AP"] == pytest.approx(1.0)
    # COCO is exhaustive: a dog on image 9 is a false positive for 'dog'
    m = _evaluate(str(p), _dets([(7, 18, A, 0.5), (9, 18, A, 0.9), (9, 90, [1, 1, 30, 30], 0.8)]),
                  backend=backend)
    assert m["per_class_ap"][18] == pytest.approx(0.5)
    # contiguous labels map back to category ids
    m = _evaluate(str(p), _dets([(7, 1, A, 0.9), (9, 2, [1, 1, 30, 30], 0.8)]),
                            label_to_category_id={1: 18, 2: 90}, backend=backend)
    assert m["AP"] == pytest.approx(1.0)


def test_bad_inputs_raise(tmp_path, backend):
    gt = _gt_file(tmp_path / "gt.json", [(1, [], [])], [(1, 1, A)], [_cat(1)])
    with pytest.raises(ValueError, match="image ids"):
        evaluate_detections(gt, _dets([(5, 1, A, 1.0)]), backend=backend)
    with pytest.raises(ValueError, match="category ids"):
        evaluate_detections(gt, _dets([(1, 7, A, 1.0)]), backend=backend)
    with pytest.raises(ValueError, match="backend"):
        evaluate_detections(gt, [], backend="nope")


# ---- faster-coco-eval against the official lvis-api on larger cases ------------------------------------------------

def _noisy_detections(gt: dict, rng, fp_per_image=4.0, crowded_image=None):
    """Detections around a GT dict: jittered copies of most GT boxes (a spread of IoUs), duplicates, and random
    boxes of random classes (verified negatives, unverified classes, not-exhaustive ones); scores on a coarse grid,
    so that ties occur. `crowded_image` gets 350 extra boxes, past the 300 cut."""
    cat_ids = [c["id"] for c in gt["categories"]]
    by_img = {im["id"]: [] for im in gt["images"]}
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        for _ in range(int(rng.random() < 0.85) + int(rng.random() < 0.2)):
            j = rng.normal(0.0, rng.choice([0.02, 0.1, 0.25]), size=4)
            box = [x + j[0] * w, y + j[1] * h, max(1.0, w * (1 + j[2])), max(1.0, h * (1 + j[3]))]
            by_img[a["image_id"]].append((a["category_id"], box, round(float(rng.random()), 2)))
    for i in by_img:
        n = rng.poisson(fp_per_image) + (350 if i == crowded_image else 0)
        for _ in range(n):
            w, h = rng.uniform(3, 150, size=2)
            box = [float(rng.uniform(0, 120)), float(rng.uniform(0, 120)), float(w), float(h)]
            by_img[i].append((int(rng.choice(cat_ids)), box, round(float(rng.random()), 2)))
    return _dets([(i, c, b, sc) for i, items in by_img.items() for c, b, sc in items])


def _random_federated_gt(path, rng, num_images=40, num_cats=12):
    """An LVIS-schema GT: classes in every instance-count bin and frequency group (and one class without GT),
    boxes of all three area ranges, verified-negative and not-exhaustive lists."""
    cats = [_cat(c, instance_count=int(n)) for c, n in
            zip(range(1, num_cats + 1), rng.choice([3, 8, 40, 300, 2000], num_cats))]
    images, anns = [], []
    for i in range(1, num_images + 1):
        present = sorted(int(c) for c in rng.choice(np.arange(1, num_cats), size=rng.integers(0, 4), replace=False))
        absent = [c for c in range(1, num_cats + 1) if c not in present]
        neg = sorted(int(c) for c in rng.choice(absent, size=rng.integers(0, len(absent) + 1), replace=False))
        nex = [c for c in present if rng.random() < 0.2]
        images.append((i, neg, nex))
        for c in present:
            for _ in range(rng.integers(1, 4)):
                side = float(rng.choice([rng.uniform(4, 30), rng.uniform(35, 90), rng.uniform(100, 160)]))
                b = [float(rng.uniform(0, 40)), float(rng.uniform(0, 40)), side, side * float(rng.uniform(0.6, 1.2))]
                anns.append((i, c, b))
    return _gt_file(path, images, anns, cats)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_backends_agree_on_random_federated_sets(tmp_path, seed):
    pytest.importorskip("faster_coco_eval")
    rng = np.random.default_rng(seed)
    gt = _random_federated_gt(tmp_path / "gt.json", rng)
    dets = _noisy_detections(json.load(open(gt)), rng, crowded_image=3)
    out = {b: evaluate_detections(gt, dets, out_dir=str(tmp_path / b), backend=b) for b in BACKENDS}
    ref, fast = out["lvis"], out["faster-coco-eval"]
    _assert_agree(ref, fast)
    assert 0.05 < ref["AP"] < 0.95 and ref["AR@300"] > 0  # neither trivial nor empty
    assert {k for k in METRIC_KEYS if ref[k] == -1.0} <= {"APl", "APc", "AP4"}  # the groups the draw may miss
    # metrics.json and results.json have the same content
    saved = {b: json.load(open(tmp_path / b / "metrics.json")) for b in BACKENDS}
    assert set(saved["lvis"]) == set(saved["faster-coco-eval"])
    for k, v in saved["lvis"].items():
        if k != "per_class_ap" and isinstance(v, float):
            assert saved["faster-coco-eval"][k] == pytest.approx(v, abs=AGREE_ABS, rel=0), k
        elif k != "per_class_ap":
            assert saved["faster-coco-eval"][k] == v, k
    assert (open(tmp_path / "lvis" / "results.json").read()
            == open(tmp_path / "faster-coco-eval" / "results.json").read())


def test_backends_agree_on_synthetic_val_set(tmp_path):
    pytest.importorskip("faster_coco_eval")
    from ltkernels.models.data.synthetic import write_synthetic_lvis

    info = write_synthetic_lvis(str(tmp_path / "synth"), num_classes=40, num_train_images=150, num_val_images=60,
                                image_size=(64, 64), seed=4)
    val = json.load(open(info["val_ann"]))
    dets = _noisy_detections(val, np.random.default_rng(4))
    ref = evaluate_detections(info["val_ann"], dets, backend="lvis")
    _assert_agree(ref, evaluate_detections(info["val_ann"], dets, backend="faster-coco-eval"))
    assert ref["APr"] > 0 and ref["APc"] > 0 and ref["AP1"] > 0 and ref["AP2"] > 0
    # with the training instance counts as the bins (an override of the categories' instance_count)
    counts = {c["id"]: c["instance_count"] * 11 for c in val["categories"]}
    _assert_agree(evaluate_detections(info["val_ann"], dets, backend="lvis", train_instance_counts=counts),
                  evaluate_detections(info["val_ann"], dets, backend="faster-coco-eval", train_instance_counts=counts))


def test_known_difference_crowd_and_ignore_flags(tmp_path, caplog):
    """The one rule where faster-coco-eval's LVIS mode differs from lvis-api: it sets a GT's `ignore` from its
    `iscrowd` (pycocotools), where lvis-api keeps `ignore` and treats `iscrowd` boxes as ordinary GT.  LVIS files
    carry neither field and COCO files reach the evaluator with crowd boxes dropped, so it only matters for an
    LVIS-schema file that carries them; the faster backend warns about such a file."""
    pytest.importorskip("faster_coco_eval")
    data = json.load(open(_gt_file(tmp_path / "gt.json", [(1, [], []), (2, [], [])], [(1, 1, A), (2, 1, B)],
                                   [_cat(1)])))
    expected_tp_fp_tp = (51 * 1.0 + 50 * (2.0 / 3.0)) / 101
    cases = {"iscrowd": ([(2, 1, B, 0.9), (2, 1, B, 0.8), (1, 1, A, 0.7)],  # two boxes on the crowd GT
                         {"lvis": expected_tp_fp_tp, "faster-coco-eval": 1.0}),
             "ignore": ([(1, 1, A, 0.9)],  # the ignored GT is not found
                        {"lvis": 1.0, "faster-coco-eval": 51 / 101})}
    for flag, (items, expected) in cases.items():
        data["annotations"][1].pop("iscrowd", None)
        data["annotations"][1].pop("ignore", None)
        data["annotations"][1][flag] = 1
        path = tmp_path / (f"{flag}.json")
        path.write_text(json.dumps(data))
        for b in BACKENDS:
            caplog.clear()
            assert evaluate_detections(str(path), _dets(items), backend=b)["AP"] == pytest.approx(expected[b]), \
                (flag, b)
            assert ("faster-coco-eval ignores the crowd boxes" in caplog.text) == (b == "faster-coco-eval")


@pytest.mark.parametrize("how", ["missing", "broken"])
def test_faster_backend_without_the_package_raises_import_error(tmp_path, monkeypatch, how):
    gt = _gt_file(tmp_path / "gt.json", [(1, [], [])], [(1, 1, A)], [_cat(1)])
    if how == "missing":  # not installed: `import faster_coco_eval` raises ImportError
        monkeypatch.setitem(sys.modules, "faster_coco_eval", None)
    else:  # installed, but its compiled module does not load
        real_import = builtins.__import__

        def fake_import(name, *args, **kwargs):
            if name.split(".")[0] == "faster_coco_eval":
                raise OSError("faster_eval_api_cpp.so: undefined symbol")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", fake_import)
    for dets in ([], _dets([(1, 1, A, 0.9)])):
        with pytest.raises(ImportError, match="faster-coco-eval"):
            evaluate_detections(gt, dets, backend="faster-coco-eval")
    assert evaluate_detections(gt, _dets([(1, 1, A, 0.9)]), backend="lvis")["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["nope", "faster_coco_eval", "LVIS", "", None])
def test_unknown_backend_raises_value_error(tmp_path, name):
    with pytest.raises(ValueError, match="unknown backend"):  # before the GT file is read
        evaluate_detections(str(tmp_path / "absent.json"), [], backend=name)


def test_plots_write_png(tmp_path):
    p1 = plot_ap_vs_instances({1: 0.1, 2: 0.5, 3: -1.0}, {1: 3, 2: 300, 3: 40}, {1: 0.8, 2: 2.1, 3: 1.0},
                              str(tmp_path / "a.png"), "softmax")
    runs = {"softmax": {"AP1": 0.0, "AP2": 0.2, "AP3": 0.4, "AP4": -1.0, "APr": 0.01, "APc": 0.2, "APf": 0.4},
            "bags": {"AP1": 0.1, "AP2": 0.25, "AP3": 0.4, "AP4": -1.0, "APr": 0.1, "APc": 0.25, "APf": 0.39}}
    p2 = plot_ap_by_bin(runs, str(tmp_path / "sub" / "b.png"))
    for p in (p1, p2):
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(p) > 5000
