"""LVIS mask (segm) evaluation beside the box evaluation: ground-truth masks as detections, a perturbed mask, the
two backends agree, masks pasted by `predict`, and a tiny Mask R-CNN evaluated end to end."""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_api  # noqa: E402

from ltkernels.models.data.masks import masks_to_rle  # noqa: E402
from ltkernels.models.evaluation.lvis_eval import (  # noqa: E402
    MASK_PREFIX,
    METRIC_KEYS,
    detections_to_results,
    evaluate_detections,
)

H, W = 120, 160


def _cat(cid, instance_count):
    f = "r" if instance_count <= 10 else ("c" if instance_count <= 100 else "f")
    return {"id": cid, "name": f"c{cid}", "synset": f"c{cid}.n.01", "frequency": f,
            "image_count": instance_count, "instance_count": instance_count}


# non-rectangular outlines (a triangle, an L, a diamond, a pentagon), so that a mask is not its box
POLYGONS = [
    (1, 1, [[10, 10, 60, 12, 20, 70]]),
    (1, 2, [[80, 20, 140, 20, 140, 40, 100, 40, 100, 100, 80, 100]]),
    (2, 3, [[40, 10, 70, 40, 40, 70, 10, 40]]),
    (2, 1, [[90, 50, 130, 60, 140, 100, 100, 110, 85, 90]]),
    (3, 4, [[20, 20, 120, 25, 110, 100, 30, 90]]),
]


def _gt(path):
    images = [{"id": i, "width": W, "height": H, "coco_url": f"http://x/val2017/{i:012d}.jpg",
               "neg_category_ids": [], "not_exhaustive_category_ids": []} for i in (1, 2, 3)]
    anns = []
    for k, (img, cat, poly) in enumerate(POLYGONS):
        rle = mask_api.merge(mask_api.frPyObjects(poly, H, W))
        anns.append({"id": k + 1, "image_id": img, "category_id": cat, "segmentation": poly,
                     "bbox": [float(v) for v in mask_api.toBbox(rle)], "area": float(mask_api.area(rle))})
    cats = [_cat(1, 5), _cat(2, 50), _cat(3, 500), _cat(4, 5000)]
    with open(path, "w") as f:
        json.dump({"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": cats}, f)
    return str(path), anns


def _mask(poly):
    return mask_api.decode(mask_api.merge(mask_api.frPyObjects(poly, H, W))).astype(bool)


def _dets(anns, perturb=None):
    """The ground truth as detections (boxes x1y1x2y2, masks as RLE); perturb(k, mask) may change mask k."""
    out = []
    for img in (1, 2, 3):
        rows = [(k, a) for k, a in enumerate(anns) if a["image_id"] == img]
        masks = []
        for k, a in rows:
            m = _mask(a["segmentation"])
            masks.append(perturb(k, m) if perturb else m)
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for _, a in rows])
        out.append({"image_id": img, "boxes": boxes, "scores": torch.linspace(0.9, 0.5, len(rows)),
                    "labels": torch.tensor([a["category_id"] for _, a in rows]),
                    "segmentations": masks_to_rle(torch.from_numpy(np.stack(masks)))})
    return out


def test_ground_truth_masks_give_mask_ap_one(tmp_path, backend):
    gt, anns = _gt(tmp_path / "gt.json")
    m = evaluate_detections(gt, _dets(anns), out_dir=str(tmp_path / "out"), backend=backend)
    for k in ("AP", "AP50", "AP75", "APr", "APc", "APf", "AP1", "AP2", "AP3", "AP4"):
        assert m[k] == pytest.approx(1.0), k
        assert m[MASK_PREFIX + k] == pytest.approx(1.0), k
    assert all(v == pytest.approx(1.0) for v in m["mask_per_class_ap"].values())
    saved = json.load(open(tmp_path / "out" / "metrics.json"))
    assert saved["mask_AP"] == pytest.approx(1.0) and set(saved["mask_per_class_ap"]) == {"1", "2", "3", "4"}
    results = json.load(open(tmp_path / "out" / "results.json"))
    assert len(results) == 5 and all(isinstance(r["segmentation"]["counts"], str) and "bbox" in r for r in results)


def test_perturbed_mask_lowers_mask_ap_only(tmp_path, backend):
    gt, anns = _gt(tmp_path / "gt.json")

    def shift(k, m):  # category 4's mask moved 100 pixels right (cut at the border): no overlap, the box is kept
        if k != 4:
            return m
        out = np.zeros_like(m)
        out[:, 100:] = m[:, :W - 100]
        return out

    m = evaluate_detections(gt, _dets(anns, shift), backend=backend)
    assert m["AP"] == pytest.approx(1.0) and m["APf"] == pytest.approx(1.0)
    assert m["mask_per_class_ap"][4] == pytest.approx(0.0)
    assert m["mask_AP"] == pytest.approx(0.75) and m["mask_APf"] == pytest.approx(0.5)  # categories 3 and 4
    assert m["mask_AP4"] == pytest.approx(0.0) and m["mask_AP3"] == pytest.approx(1.0)

    def erode(k, m):  # category 2's mask loses its right half: IoU about 0.5, counted at the lowest thresholds
        if k != 2:
            return m
        m = m.copy()
        m[:, 40:] = False
        return m

    e = evaluate_detections(gt, _dets(anns, erode), backend=backend)
    assert 0.0 < e["mask_per_class_ap"][3] < 0.5 and e["per_class_ap"][3] == pytest.approx(1.0)
    assert e["mask_AP75"] < 1.0 and e["mask_AP"] < 1.0


def test_backends_agree_on_masks(tmp_path):
    pytest.importorskip("faster_coco_eval")
    gt, anns = _gt(tmp_path / "gt.json")
    rng = np.random.default_rng(0)

    def noise(k, m):  # flip ~15% of the pixels inside the box and dilate / erode at random
        m = m.copy()
        x, y, w, h = (int(round(v)) for v in anns[k]["bbox"])
        region = m[y:y + h, x:x + w]
        region ^= rng.random(region.shape) < 0.15
        return np.roll(m, int(rng.integers(-6, 7)), axis=int(rng.integers(0, 2)))

    dets = _dets(anns, noise)
    # extra lower-scored false positives of every category
    for d in dets:
        extra = 4
        boxes = torch.tensor(rng.uniform(0, 60, (extra, 2))).float()
        boxes = torch.cat([boxes, boxes + torch.tensor(rng.uniform(10, 50, (extra, 2))).float()], 1)
        masks = torch.zeros(extra, H, W, dtype=torch.bool)
        for j, b in enumerate(boxes.long().tolist()):
            masks[j, b[1]:b[3], b[0]:b[2]] = True
        d["boxes"] = torch.cat([d["boxes"], boxes])
        d["scores"] = torch.cat([d["scores"], torch.tensor(rng.uniform(0.05, 0.95, extra)).float()])
        d["labels"] = torch.cat([d["labels"], torch.tensor(rng.integers(1, 5, extra))])
        d["segmentations"] = d["segmentations"] + masks_to_rle(masks)
    ref = evaluate_detections(gt, dets, backend="lvis")
    other = evaluate_detections(gt, dets, backend="faster-coco-eval")
    assert set(ref) == set(other)
    assert 0.0 < ref["mask_AP"] < 1.0
    for k, v in ref.items():
        if isinstance(v, dict):
            for c, ap in v.items():
                assert other[k][c] == pytest.approx(ap, abs=1e-12, rel=0), (k, c)
        else:
            assert other[k] == pytest.approx(v, abs=1e-12, rel=0), k


def test_box_only_detections_have_no_mask_keys_and_mixed_are_refused(tmp_path):
    gt, anns = _gt(tmp_path / "gt.json")
    dets = _dets(anns)
    plain = [{k: v for k, v in d.items() if k != "segmentations"} for d in dets]
    m = evaluate_detections(gt, plain)
    assert not any(k.startswith(MASK_PREFIX) for k in m) and m["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="carry a segmentation"):
        evaluate_detections(gt, plain[:1] + dets[1:])
    with pytest.raises(ValueError, match="no segmentations"):
        evaluate_detections(gt, plain, segm=True)
    with pytest.raises(ValueError, match="segmentations for"):
        detections_to_results([dict(dets[0], segmentations=dets[0]["segmentations"][:1])])
    empty = evaluate_detections(gt, [], segm=True)
    assert all(empty[MASK_PREFIX + k] == empty[k] for k in METRIC_KEYS)
    assert empty["mask_AP"] == 0.0


def test_ground_truth_without_segmentations_refuses_mask_evaluation(tmp_path):
    gt, anns = _gt(tmp_path / "gt.json")
    data = json.load(open(gt))
    del data["annotations"][0]["segmentation"]
    path = tmp_path / "noseg.json"
    json.dump(data, open(path, "w"))
    with pytest.raises(ValueError, match="no segmentation"):
        evaluate_detections(str(path), _dets(anns))
    for key in ("neg_category_ids", "not_exhaustive_category_ids"):  # a COCO-format file: the same refusal
        for im in data["images"]:
            del im[key]
    json.dump(data, open(path, "w"))
    with pytest.raises(ValueError, match="no segmentation"):
        evaluate_detections(str(path), _dets(anns))
    assert evaluate_detections(str(path), _dets(anns), segm=False)["AP"] == pytest.approx(1.0)


# ---- predict() and a trained Mask R-CNN ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from ltkernels.models.data.synthetic import write_synthetic_lvis

    return write_synthetic_lvis(str(tmp_path_factory.mktemp("synth")), num_classes=6, num_train_images=16,
                                num_val_images=4, image_size=(64, 64), seed=1)


class _FixedMaskModel(torch.nn.Module):
    """Returns the same two detections (boxes in the transformed image) with mask probabilities for every image."""

    def __init__(self):
        super().__init__()
        self.mask_head = torch.nn.Identity()
        g = torch.Generator().manual_seed(0)
        self.masks = torch.rand(2, 28, 28, generator=g)
        self.boxes = torch.tensor([[10.0, 20.0, 90.0, 70.0], [-8.0, 30.5, 60.25, 140.0]])

    def forward(self, images):
        return [{"boxes": self.boxes.clone(), "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2]),
                 "masks": self.masks.clone()} for _ in images]


def test_predict_pastes_masks_at_the_original_size(synth):
    import ltkernels
    from ltkernels.models.configs import get_config
    from ltkernels.models.engine.trainer import build_dataset, predict

    data_cfg = dict(get_config("two_stage_mask_softmax")["data"], min_size=128, max_size=128)
    ds = build_dataset(synth["val_ann"], synth["image_root"], data_cfg, train=False)
    model = _FixedMaskModel()
    dets = predict(model, ds, torch.device("cpu"), batch_size=3)
    assert len(dets) == len(ds)
    for d in dets:
        h, w = ds[[i for i in range(len(ds)) if ds[i][1]["image_id"] == d["image_id"]][0]][1]["orig_size"]
        scale = 128 / min(h, w)
        assert torch.allclose(d["boxes"], model.boxes / scale)
        want = ltkernels.paste_masks(model.masks, model.boxes / scale, (h, w))
        assert len(d["segmentations"]) == 2
        got = np.stack([mask_api.decode(dict(r, counts=r["counts"].encode())) for r in d["segmentations"]])
        assert got.shape == (2, h, w) and np.array_equal(got.astype(bool), want.numpy())


def test_tiny_mask_rcnn_trains_and_evaluates_masks(synth, tmp_path, capsys):
    from ltkernels.models.configs import get_config, merge
    from ltkernels.models.engine.trainer import evaluate, format_metrics, train

    cfg = merge(get_config("two_stage_mask_softmax"), {
        "model": {"mask_head_channels": 16}, "data": {"min_size": 64, "max_size": 64},
        "solver": {"max_iter": 4, "batch_size": 4, "warmup_iters": 2, "steps": []}, "train": {"eval": True}})
    out = str(tmp_path / "run")
    res = train(cfg, synth["train_ann"], synth["image_root"], out, val_ann=synth["val_ann"], progress=False,
                log=lambda *a: None)
    m = res["metrics"]
    for k in METRIC_KEYS:
        assert -1.0 <= m[k] <= 1.0 and -1.0 <= m[MASK_PREFIX + k] <= 1.0, k
    assert "mask_per_class_ap" in m and "mask_AR@300" in m
    line = format_metrics(m)
    assert line.startswith("box AP ") and "  |  mask AP " in line and line.count("AP75") == 2
    results = json.load(open(os.path.join(out, "results.json")))
    assert results and all("segmentation" in r for r in results)
    val = json.load(open(synth["val_ann"]))
    sizes = {im["id"]: [im["height"], im["width"]] for im in val["images"]}
    assert all(r["segmentation"]["size"] == sizes[r["image_id"]] for r in results)
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved["mask_AP"] == pytest.approx(m["mask_AP"])
    # ltk eval on the checkpoint prints the same box and mask metrics
    from ltkernels.models.cli import main as ltk

    capsys.readouterr()
    assert ltk(["eval", "--checkpoint", res["checkpoint"], "--ann", synth["val_ann"], "--images",
                synth["image_root"], "--device", "cpu"]) == 0
    assert format_metrics(m) in capsys.readouterr().out
    # the faster-coco-eval backend on the same model: the same numbers
    pytest.importorskip("faster_coco_eval")
    f = evaluate(res["model"], synth["val_ann"], synth["image_root"], cfg["data"], torch.device("cpu"),
                 backend="faster-coco-eval", category_ids=res["meta"]["category_ids"])
    for k in METRIC_KEYS:
        assert f[MASK_PREFIX + k] == pytest.approx(m[MASK_PREFIX + k], abs=1e-9), k


MASK_CONFIGS = [f"{p}_{c}" for p in ("two_stage_mask", "lvis_v0.5_mask_rcnn", "lvis_v1_mask_rcnn")
                for c in ("softmax", "bags", "simcal")]


@pytest.mark.parametrize("name", MASK_CONFIGS)
def test_mask_configs_build_and_are_listed(name, capsys):
    from ltkernels.models.cli import main as ltk
    from ltkernels.models.configs import get_config
    from ltkernels.models.detectors import build_model

    cfg = get_config(name)
    base = get_config(name.replace("two_stage_mask", "two_stage").replace("mask_rcnn", "two_stage"))
    assert cfg["model"]["mask_head"] and cfg["train"]["stage"] == base["train"]["stage"]
    assert {k: v for k, v in cfg["model"].items() if not k.startswith("mask_head")} == \
        {k: v for k, v in base["model"].items() if not k.startswith("mask_head")}
    assert cfg["solver"] == base["solver"] and cfg["data"] == base["data"]
    n = 6 if name.startswith("two_stage") else (1230 if "v0.5" in name else 1203)
    model = build_model(cfg["model"], n, [(7 * c) % 1500 + 1 for c in range(1, n + 1)]).eval()
    assert model.mask_head is not None and model.mask_head.predictor.out_channels == n
    if cfg["train"]["stage"] != "base":
        model.freeze_for_stage(cfg["train"]["stage"])
        assert not any(p.requires_grad for p in model.mask_head.parameters())
    if n == 6:  # a forward pass of the R50-FPN models with ~1200 random classes takes ~15 s each: not here
        with torch.no_grad():
            out = model([torch.randn(3, 96, 128)])
        assert out[0]["masks"].shape[1:] == (28, 28) and len(out[0]["masks"]) == len(out[0]["boxes"])
    assert ltk(["configs"]) == 0
    assert name in capsys.readouterr().out
