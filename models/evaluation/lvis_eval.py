"""Box and mask evaluation with the official `lvis` evaluator (or faster-coco-eval), plus the bins AP1..AP4.

`evaluate_detections(gt_ann_file, detections)` converts per-image detections (x1y1x2y2 boxes in original image
pixels, scores, category ids) to LVIS results (xywh, at most `max_dets` per image, best scores first), runs
the evaluator of `backend` (iou type "bbox") and returns

- `AP, AP50, AP75, APs, APm, APl, APr, APc, APf` exactly as the evaluator's summary computes them
  (`LVISEval.results`, or `COCOeval_faster(lvis_style=True).stats_as_dict`);
- `AP1, AP2, AP3, AP4`: the mean per-class AP over the classes whose *training* instance count (the category's
  `instance_count` in the GT file, which LVIS val files carry) is < 10, in [10, 100), in [100, 1000) and
  >= 1000 (the BAGS / SimCal bins);
- `AR@300` (recall), `per_class_ap` {category id: AP}, `num_detections`, `num_images`.

Mask evaluation (iou type "segm", Mask R-CNN): when the detections carry `segmentations` (one COCO RLE per box, in
original image pixels, e.g. from `ltkernels.paste_masks_chunks` and `models.data.masks.masks_to_rle`), each result
also holds its `segmentation` and the same evaluator runs a second time on the masks; the mask metrics come beside
the box metrics under the same names prefixed `mask_` (`mask_AP`, `mask_AP50`, ..., `mask_APr`, `mask_AP1..4`,
`mask_AR@300`, `mask_per_class_ap`), computed by the same code.  The box keys are unchanged.  As detectron2 does,
the mask results are evaluated without their `bbox`, so that a detection's area (small / medium / large) is its
mask's area, not its box's.  The ground truth's `segmentation` (polygons or RLE) is the reference; its `area` gives
the ground truth's area range, as for boxes.

A per-class AP is the mean of the evaluator's precision `eval['precision'][T, R, K, A]` (faster-coco-eval:
`[T, R, K, A, M]` with one M) over the IoU thresholds T and the 101 recall thresholds R for area 'all', ignoring
-1 entries; it is -1.0 for a class with no ground truth in the evaluated file.  Every aggregate is in [0, 1],
or -1.0 where undefined (no class in the group / bin has ground truth), the `lvis` convention.  An empty
detection list gives 0.0 for every defined metric (lvis-api raises on empty results, so no evaluator is called).

A GT file in plain COCO format (no `neg_category_ids` / `frequency`) is evaluated through an LVIS-compatible
copy: every category absent from an image's ground truth is a verified negative (COCO is exhaustive),
nothing is "not exhaustive", crowd boxes are dropped, and frequencies come from `image_count` if present, else
from the GT file's own image counts.  This is the LVIS evaluator on COCO data (300 detections per image), close
to but not identical with `pycocotools.COCOeval`.

Backends (both get the same GT dict, the same result list and the same empty-result and per-class code, so the
returned dict, `metrics.json` and `results.json` have the same layout):

- `"lvis"`: the official lvis-api 0.5.3 (`LVISEval`), pure Python.
- `"faster-coco-eval"`: `faster_coco_eval.COCOeval_faster(iouType="bbox", lvis_style=True)`, the same federated
  rules in C++ (detections of a category neither in an image's GT nor in its `neg_category_ids` are dropped;
  unmatched detections of a category in `not_exhaustive_category_ids` are ignored; frequency groups from the
  categories' `frequency`; area ranges [0, 32^2], [32^2, 96^2], [96^2, 1e10]; `maxDets = [max_dets]`), several
  times faster (figures: bench/NOTES.md, "Evaluation backends").  Where it differs from lvis-api (only the last can
  matter):
  precision is tp / (tp + fp) where lvis-api divides by tp + fp + eps (differences of ~1e-16); `max_dets` is
  applied per (image, category) where lvis-api applies it per image (a no-op, as the results are already cut per
  image); a GT annotation's `ignore` flag is replaced by its `iscrowd` (crowd boxes are ignored and may match
  several detections), where lvis-api keeps `ignore` and treats `iscrowd` boxes as ordinary ground truth --
  LVIS files carry neither field, and COCO files reach the evaluator with their crowd boxes dropped; the backend
  warns about a file that carries them (`test_known_difference_crowd_and_ignore_flags`).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import tempfile
import warnings
from collections import defaultdict

import numpy as np

__all__ = ["evaluate_detections", "detections_to_results", "instance_bin", "BIN_EDGES", "METRIC_KEYS", "BACKENDS",
           "MASK_PREFIX", "IOU_TYPES"]

logger = logging.getLogger(__name__)

BIN_EDGES = (10, 100, 1000)  # AP1: < 10, AP2: [10, 100), AP3: [100, 1000), AP4: >= 1000 training instances
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "AP1", "AP2", "AP3", "AP4")
BACKENDS = ("lvis", "faster-coco-eval")
IOU_TYPES = ("bbox", "segm")
MASK_PREFIX = "mask_"  # the segm metrics' keys: MASK_PREFIX + a box metric's key
# the area ranges of lvis-api's Params (its 'all' range, [0, 1e10], is the one faster-coco-eval adds itself)
AREA_RANGES = {"small": [0 ** 2, 32 ** 2], "medium": [32 ** 2, 96 ** 2], "large": [96 ** 2, 1e5 ** 2]}


def _np_compat():
    # lvis 0.5.3 uses np.float, removed in numpy 1.24
    if "float" not in np.__dict__:
        np.float = float  # type: ignore[attr-defined]


def instance_bin(count: int) -> int:
    """Bin index 1..4 of a training instance count (< 10, 10-100, 100-1000, >= 1000)."""
    for i, edge in enumerate(BIN_EDGES):
        if count < edge:
            return i + 1
    return len(BIN_EDGES) + 1


def _to_numpy(x, dtype) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def detections_to_results(detections: list[dict], max_dets: int = 300,
                          label_to_category_id: dict[int, int] | None = None) -> list[dict]:
    """Per-image detections -> LVIS result list (xywh boxes, at most `max_dets` per image by score); a detection
    dict with `segmentations` (a list of RLE dicts, one per box) adds each one's `segmentation`."""
    results = []
    for det in detections:
        img_id = int(det["image_id"])
        boxes = _to_numpy(det["boxes"], np.float64).reshape(-1, 4)
        scores = _to_numpy(det["scores"], np.float64).reshape(-1)
        labels = _to_numpy(det["labels"], np.int64).reshape(-1)
        if not (len(boxes) == len(scores) == len(labels)):
            raise ValueError(f"image {img_id}: boxes, scores and labels differ in length "
                             f"({len(boxes)}, {len(scores)}, {len(labels)})")
        segs = det.get("segmentations")
        if segs is not None and len(segs) != len(boxes):
            raise ValueError(f"image {img_id}: {len(segs)} segmentations for {len(boxes)} boxes")
        order = np.argsort(-scores, kind="stable")
        if max_dets is not None and max_dets >= 0:
            order = order[:max_dets]
        boxes_l, scores_l, labels_l = boxes.tolist(), scores.tolist(), labels.tolist()  # Python floats / ints
        for j in order.tolist():
            x1, y1, x2, y2 = boxes_l[j]
            cid = labels_l[j]
            if label_to_category_id is not None:
                cid = int(label_to_category_id[cid])
            res = {"image_id": img_id, "category_id": cid,
                   "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                   "score": round(scores_l[j], 6)}
            if segs is not None:
                res["segmentation"] = _rle_json(segs[j])
            results.append(res)
    return results


def _rle_json(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def _lvis_compatible(gt: dict) -> dict:
    """COCO-format GT -> LVIS-compatible GT (see the module docstring); LVIS files are returned unchanged."""
    imgs = gt["images"]
    cats = gt["categories"]
    is_lvis = (all("neg_category_ids" in im and "not_exhaustive_category_ids" in im for im in imgs)
               and all("frequency" in c for c in cats))
    if is_lvis and all("area" in a for a in gt["annotations"]):
        return gt
    gt = copy.deepcopy(gt)
    anns = [a for a in gt["annotations"] if not a.get("iscrowd", 0)]
    for a in anns:
        if "area" not in a:
            a["area"] = float(a["bbox"][2]) * float(a["bbox"][3])
        if "segmentation" not in a:
            x, y, w, h = a["bbox"]
            a["segmentation"] = [[x, y, x, y + h, x + w, y + h, x + w, y]]
    gt["annotations"] = anns
    cat_ids = [int(c["id"]) for c in cats]
    present = defaultdict(set)
    for a in anns:
        present[int(a["image_id"])].add(int(a["category_id"]))
    for im in gt["images"]:
        if "neg_category_ids" not in im:
            im["neg_category_ids"] = [c for c in cat_ids if c not in present[int(im["id"])]]
        im.setdefault("not_exhaustive_category_ids", [])
    img_count = defaultdict(int)
    for s in present.values():
        for c in s:
            img_count[c] += 1
    for c in gt["categories"]:
        if "frequency" not in c:
            n = int(c.get("image_count", img_count[int(c["id"])]))
            c["frequency"] = "r" if n <= 10 else ("c" if n <= 100 else "f")
    return gt


def _empty_metrics(gt: dict, train_counts: dict[int, int]) -> dict:
    with_gt = {int(a["category_id"]) for a in gt["annotations"]}
    freq = {int(c["id"]): c.get("frequency") for c in gt["categories"]}
    per_class = {int(c["id"]): (0.0 if int(c["id"]) in with_gt else -1.0) for c in gt["categories"]}
    m = {k: (0.0 if with_gt else -1.0) for k in ("AP", "AP50", "AP75", "AR@300")}
    areas = {"APs": (0, 32 ** 2), "APm": (32 ** 2, 96 ** 2), "APl": (96 ** 2, 1e10)}
    for key, (lo, hi) in areas.items():
        m[key] = 0.0 if any(lo <= float(a["area"]) <= hi for a in gt["annotations"]) else -1.0
        m[f"AR{key[2]}@300"] = m[key]
    for key, f in (("APr", "r"), ("APc", "c"), ("APf", "f")):
        m[key] = 0.0 if any(freq[c] == f for c in with_gt) else -1.0
    # precision 0 for every class with ground truth, -1 (undefined) for the others
    cat_ids = sorted(per_class)
    m.update(_class_metrics(np.array([per_class[c] for c in cat_ids]).reshape(1, 1, -1), cat_ids, train_counts))
    return m


def _class_metrics(precision: np.ndarray, cat_ids: list[int], train_counts: dict[int, int]) -> dict:
    """`per_class_ap` and AP1..AP4 from an evaluator's precision [T, R, K] (area 'all', K in `cat_ids` order).

    A class's AP is the mean of its entries > -1 (-1.0 if none: no ground truth); a bin's AP is the mean over
    its classes with an AP, -1.0 if it has none.  Shared by every backend and by the empty-result path.
    """
    per_class = {}
    for k, cid in enumerate(cat_ids):
        p = precision[:, :, k]
        p = p[p > -1]
        per_class[int(cid)] = float(np.mean(p)) if p.size else -1.0
    out = {"per_class_ap": per_class}
    for b in range(1, 5):
        vals = [ap for cid, ap in per_class.items() if ap >= 0 and instance_bin(train_counts.get(cid, 0)) == b]
        out[f"AP{b}"] = float(np.mean(vals)) if vals else -1.0
    return out


def _import_faster_coco_eval():
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except Exception as e:  # not installed, or a broken build (a missing symbol, a numpy ABI mismatch)
        raise ImportError("backend='faster-coco-eval' needs the faster-coco-eval package, which failed to import "
                          f"({type(e).__name__}: {e}); install it (pip install faster-coco-eval, or this package's "
                          "[models] extra) "
                          "or use backend='lvis'") from e
    return COCO, COCOeval_faster


def _run_lvis(gt: dict, gt_path: str | None, results: list[dict], max_dets: int, iou_type: str = "bbox"):
    """lvis-api: (summary {AP.., AR@N, ARs@N..}, precision [T, R, K] for area 'all', category ids of K)."""
    _np_compat()
    from lvis import LVIS, LVISEval, LVISResults

    tmp = None
    try:
        if gt_path is not None:
            lvis_gt = LVIS(gt_path)
        else:  # LVIS() takes only a file path
            fd, tmp = tempfile.mkstemp(suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(gt, f)
            lvis_gt = LVIS(tmp)
        quiet = logging.getLogger("lvis")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "Assuming user provided the results in correct format." etc.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # lvis calls the deprecated logger.warn
                # LVISResults adds id / area / segmentation to each result in place: copy the dicts
                dt = LVISResults(lvis_gt, [dict(r) for r in results], max_dets=max_dets)
                ev = LVISEval(lvis_gt, dt, iou_type=iou_type)
                ev.params.max_dets = max_dets
                ev.run()
        finally:
            quiet.setLevel(level)
    finally:
        if tmp is not None:
            os.unlink(tmp)
    summary = {k: float(v) for k, v in ev.get_results().items()}
    return summary, ev.eval["precision"][:, :, :, 0], list(ev.params.cat_ids)


def _run_faster_coco_eval(gt: dict, results: list[dict], max_dets: int, iou_type: str = "bbox"):
    """faster-coco-eval in LVIS mode: the same triple as `_run_lvis` (see the module docstring for the rules)."""
    COCO, COCOeval_faster = _import_faster_coco_eval()
    if any(a.get("iscrowd") or a.get("ignore") for a in gt["annotations"]):
        logger.warning("ground truth with iscrowd / ignore flags: faster-coco-eval ignores the crowd boxes and "
                       "drops the ignore flags, where lvis-api does the reverse; backend='lvis' gives the "
                       "official numbers")

    def quiet(*args, **kwargs):
        pass

    coco_gt = COCO(gt, print_function=quiet)  # indexes `gt` without copying it (sets 'ignore' on its annotations)
    # loadRes adds id / area (w * h, as LVISResults) / segmentation / iscrowd to each result in place: copy them
    coco_dt = coco_gt.loadRes([dict(r) for r in results])
    ev = COCOeval_faster(coco_gt, coco_dt, iouType=iou_type, lvis_style=True, ranges=copy.deepcopy(AREA_RANGES),
                         print_function=quiet)
    # one maxDets value (its default is [1, 10, 100]); "no limit" (max_dets < 0): the number of results
    ev.params.maxDets = [max_dets if max_dets >= 0 else max(len(results), 1)]
    ev.run()
    s = ev.stats_as_dict
    summary = {"AP": s["AP_all"], "AP50": s["AP_50"], "AP75": s["AP_75"], "APs": s["AP_small"],
               "APm": s["AP_medium"], "APl": s["AP_large"], "APr": s["APr"], "APc": s["APc"], "APf": s["APf"],
               f"AR@{max_dets}": s["AR_all"], f"ARs@{max_dets}": s["AR_small"],
               f"ARm@{max_dets}": s["AR_medium"], f"ARl@{max_dets}": s["AR_large"]}
    # precision is [T, R, K, A, M]: area 'all' (index 0), the one maxDets value
    return ({k: float(v) for k, v in summary.items()}, ev.eval["precision"][:, :, :, 0, -1],
            [int(c) for c in ev.params.catIds])


def evaluate_detections(gt_ann_file: str, detections: list[dict], out_dir: str | None = None,
                        max_dets: int = 300, backend: str = "lvis",
                        label_to_category_id: dict[int, int] | None = None,
                        train_instance_counts: dict[int, int] | None = None,
                        segm: bool | None = None) -> dict:
    """Evaluate detections against an LVIS (or COCO) GT file; see the module docstring for the metrics.

    `detections`: list of {"image_id", "boxes" [K, 4] x1y1x2y2 original pixels, "scores" [K], "labels" [K]}
    (tensors or arrays; labels are category ids unless `label_to_category_id` maps them).
    `train_instance_counts` overrides the categories' `instance_count` for the AP1..AP4 bins.
    `backend`: "lvis" (the official lvis-api) or "faster-coco-eval" (its LVIS mode, in C++; the same metrics, see
    the module docstring); the latter raises ImportError when the faster-coco-eval package cannot be imported.
    `segm`: evaluate masks too (the `mask_` keys); by default when the detections carry `segmentations` (each
    detection dict a list of RLE dicts, one per box, at the original image size), which then all must.
    Writes `metrics.json` and `results.json` into `out_dir` when given.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (use 'lvis' or 'faster-coco-eval')")
    if backend == "faster-coco-eval":
        _import_faster_coco_eval()  # fail before any work, empty results included

    with open(gt_ann_file) as f:
        raw_gt = json.load(f)
    gt = _lvis_compatible(raw_gt)
    gt_img_ids = {int(im["id"]) for im in gt["images"]}
    results = detections_to_results(detections, max_dets=max_dets, label_to_category_id=label_to_category_id)
    unknown = {r["image_id"] for r in results} - gt_img_ids
    if unknown:
        raise ValueError(f"detections for {len(unknown)} image ids absent from {gt_ann_file} (e.g. {min(unknown)})")
    cat_ids = sorted(int(c["id"]) for c in gt["categories"])
    known_cats = set(cat_ids)
    bad_cats = {r["category_id"] for r in results} - known_cats
    if bad_cats:
        raise ValueError(f"detections with category ids absent from {gt_ann_file}: {sorted(bad_cats)[:10]}")

    if train_instance_counts is not None:
        train_counts = {int(k): int(v) for k, v in train_instance_counts.items()}
    elif all("instance_count" in c for c in gt["categories"]):
        train_counts = {int(c["id"]): int(c["instance_count"]) for c in gt["categories"]}
    else:
        train_counts = defaultdict(int)
        for a in gt["annotations"]:
            train_counts[int(a["category_id"])] += 1
        logger.warning("%s: categories carry no instance_count; AP1..AP4 use the GT file's own counts",
                       gt_ann_file)

    with_segm = sum("segmentation" in r for r in results)
    if with_segm and with_segm != len(results):
        raise ValueError(f"{with_segm} of the {len(results)} detections carry a segmentation: give every detection "
                         "one (mask evaluation) or none")
    segm = bool(with_segm) if segm is None else bool(segm)
    if segm:
        if results and not with_segm:
            raise ValueError("segm=True but the detections carry no segmentations")
        # the raw file's annotations: the COCO conversion gives box outlines to those without one
        no_seg = sum(1 for a in raw_gt["annotations"] if not a.get("segmentation") and not a.get("iscrowd", 0))
        if no_seg:
            raise ValueError(f"{gt_ann_file}: {no_seg} ground-truth annotations have no segmentation, so masks cannot "
                             "be evaluated")

    def run(res: list[dict], iou_type: str) -> dict:
        if not res:
            m = _empty_metrics(gt, train_counts)
        else:
            if backend == "lvis":
                summary, precision, eval_cat_ids = _run_lvis(gt, gt_ann_file if gt is raw_gt else None, res,
                                                             max_dets, iou_type)
            else:  # the segm evaluation converts the ground truth's segmentations in place: give it a copy
                summary, precision, eval_cat_ids = _run_faster_coco_eval(
                    gt if iou_type == "bbox" else copy.deepcopy(gt), res, max_dets, iou_type)
            m = {("AR@300" if k.startswith("AR@") else k): v for k, v in summary.items()}
            m.update(_class_metrics(precision, eval_cat_ids, train_counts))
        for k in METRIC_KEYS:
            v = m[k]
            m[k] = -1.0 if (v is None or (isinstance(v, float) and math.isnan(v))) else float(v)
        return m

    metrics = run(results, "bbox")
    if segm:  # masks without boxes: a detection's area is its mask's (see the module docstring)
        mask_metrics = run([{k: v for k, v in r.items() if k != "bbox"} for r in results], "segm")
        metrics.update({MASK_PREFIX + k: v for k, v in mask_metrics.items()})
    metrics["num_detections"] = len(results)
    metrics["num_images"] = len(gt_img_ids)

    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        per_class_keys = ("per_class_ap", MASK_PREFIX + "per_class_ap")
        out = {k: v for k, v in metrics.items() if k not in per_class_keys}
        for key in per_class_keys:
            if key in metrics:
                out[key] = {str(k): v for k, v in metrics[key].items()}
        out["train_instance_counts"] = {str(k): int(train_counts.get(k, 0)) for k in cat_ids}
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(out, f, indent=1)
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f)
    return metrics
