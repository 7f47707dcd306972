"""The improved one-stage baseline (ATSS + IoU branch + GIoU, focal / EFL / QFL / EQFL) and `ltk study efl`."""
import json
import os

import pytest
import torch
from test_training import data, tiny_cfg  # noqa: F401 (the training tests' tiny synthetic set and schedule)
from torchvision.ops import box_iou

from ltkernels._ext import has_op
from ltkernels.models.cli import main as ltk
from ltkernels.models.configs import get_config
from ltkernels.models.detectors import ATSSDetector, build_model
from ltkernels.models.detectors.atss import aligned_iou, atss_assign
from ltkernels.models.engine.study import summarize
from ltkernels.models.engine.trainer import train

pytestmark = pytest.mark.skipif(not has_op("equalized_quality_focal_loss"), reason="EQFL not built")


def brute_force_atss(anchors, level_sizes, gt, labels, k):
    """ATSS written as its paper states it, one ground truth and one level at a time."""
    a_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    best = torch.full((len(anchors),), -1.0, dtype=torch.float64)
    out = torch.zeros(len(anchors), dtype=torch.int64)
    for g in range(len(gt)):
        g_ctr = (gt[g, :2] + gt[g, 2:]) / 2
        cand, start = [], 0
        for size in level_sizes:
            d = ((a_ctr[start: start + size] - g_ctr) ** 2).sum(1).sqrt()
            cand += (d.argsort()[: min(k, size)] + start).tolist()
            start += size
        ious = box_iou(anchors[cand].double(), gt[g: g + 1].double())[:, 0]
        thr = ious.mean() + ious.std()
        for a, iou in zip(cand, ious.tolist()):
            cx, cy = a_ctr[a].tolist()
            inside = min(cx - gt[g, 0], cy - gt[g, 1], gt[g, 2] - cx, gt[g, 3] - cy) > 0.01
            if iou >= thr and inside and iou > best[a]:
                best[a], out[a] = iou, int(labels[g])
    return out


def test_atss_assignment_matches_the_definition():
    torch.manual_seed(0)
    cfg = get_config("atss_efl")["model"]
    model = build_model(cfg, 5, [10] * 5)
    from ltkernels.models.detectors.two_stage import batch_images

    il = batch_images([torch.zeros(3, 160, 160)], 32)
    feats = list(model.backbone(il.tensors).values())
    anchors = model.anchor_generator(il, feats)[0]
    sizes = [f.shape[-2] * f.shape[-1] * 2 for f in feats]
    for trial in range(5):
        xy = torch.rand(6, 2) * 120
        wh = torch.rand(6, 2) * 50 + 10
        gt = torch.cat([xy, xy + wh], 1)
        gt[1] = gt[0] + 2.0  # two overlapping boxes: an anchor claimed by both goes to the higher IoU
        labels = torch.randint(1, 6, (6,))
        lab, idx = atss_assign(anchors, sizes, gt, labels, 18)
        assert torch.equal(lab, brute_force_atss(anchors, sizes, gt, labels, 18))
        fg = lab > 0
        assert torch.equal(labels[idx[fg]], lab[fg])
        assert fg.sum() >= 6  # every box gets positives
    lab, idx = atss_assign(anchors, sizes, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 18)
    assert (lab == 0).all()


def test_aligned_iou():
    a = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 2, 2]])
    b = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10], [5, 5, 6, 6]])
    torch.testing.assert_close(aligned_iou(a, b), torch.tensor([1.0, 50 / 150, 0.0]))


@pytest.mark.parametrize("name", ["atss_efl", "atss_eqfl"])
def test_trains_resumes_exactly_and_evaluates(data, tmp_path, name):
    n = 6
    a = train(tiny_cfg(name, n, ckpt_every=n // 2), data["train_ann"], data["image_root"], str(tmp_path / "a"),
              progress=False)
    model = a["model"]
    assert isinstance(model, ATSSDetector)
    losses = {k for h in a["history"] for k in h if k.startswith("loss_")}
    assert losses == ({"loss_cls", "loss_box", "loss_iou"} if name == "atss_efl" else {"loss_cls", "loss_box"})
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in a["history"])
    mid = tmp_path / "a" / f"checkpoint_{n // 2:07d}.pt"
    b = train(tiny_cfg(name, n, ckpt_every=n // 2), data["train_ann"], data["image_root"], str(tmp_path / "b"),
              resume=str(mid), progress=False)
    assert [h["loss"] for h in b["history"]] == [h["loss"] for h in a["history"][n // 2:]]
    sa, sb = a["model"].state_dict(), b["model"].state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    efl = b["model"].cls_loss_fn
    assert (efl.pos_grad > 0).any() and (efl.neg_grad > 0).any()  # the statistics run (and resumed: state_dict)
    # evaluation through the engine (the LVIS API)
    cfg = tiny_cfg(name, 2)
    cfg["train"]["eval"] = True
    cfg["model"]["score_thresh"] = 0.0
    r = train(cfg, data["train_ann"], data["image_root"], str(tmp_path / "e"), val_ann=data["val_ann"],
              progress=False)
    assert 0.0 <= r["metrics"]["AP"] <= 1.0


def test_loss_choice_and_iou_branch():
    counts = [10] * 4
    for loss, quality, branch in (("focal", False, True), ("efl", False, True), ("qfl", True, False),
                                  ("eqfl", True, False)):
        m = build_model(get_config(f"atss_{loss}")["model"], 4, counts)
        assert m.quality_targets == quality and (m.head.iou_pred is not None) == branch
        assert m.cls_loss_fn.scale == (8.0 if loss in ("efl", "eqfl") else 0.0)
    m = build_model({**get_config("atss_qfl")["model"], "iou_branch": True}, 4, counts)
    assert m.head.iou_pred is not None
    lvis = get_config("lvis_v1_atss_efl")
    assert lvis["model"]["anchor_scales"] == [6.0, 8.0] and lvis["model"]["atss_topk"] == 18
    assert lvis["solver"]["warmup_iters"] == 6000 and lvis["solver"]["clip_grad"] == 35.0
    assert lvis["data"]["repeat_threshold"] == 0.001 and lvis["solver"]["max_iter"] == 180000


def test_study_summary_and_verdict():
    seeds = [0, 1, 2]
    mk = lambda ap: {"AP": ap, "AP50": ap, "APr": ap, "APc": ap, "APf": ap}
    runs = {"focal": {0: mk(0.50), 1: mk(0.52), 2: mk(0.48)}, "efl": {0: mk(0.60), 1: mk(0.61), 2: mk(0.59)},
            "qfl": {0: mk(0.50), 1: mk(0.55), 2: mk(0.45)}, "eqfl": {0: mk(0.51), 1: mk(0.54), 2: mk(0.46)}}
    s = summarize(runs, seeds)
    assert s["methods"]["focal"]["AP"]["mean"] == pytest.approx(0.50)
    assert s["methods"]["focal"]["AP"]["std"] == pytest.approx(0.02)
    assert s["pairs"]["efl-focal"]["AP"]["mean"] == pytest.approx(0.10)
    assert s["pairs"]["efl-focal"]["AP"]["beats"] is True
    assert s["pairs"]["eqfl-qfl"]["AP"]["beats"] is False  # +0.01 within a spread of 0.05
    runs["focal"][1]["APr"] = -1.0  # undefined metric: left out of the mean and the paired difference
    s = summarize(runs, seeds)
    assert s["methods"]["focal"]["APr"]["mean"] == pytest.approx(0.49)
    assert s["pairs"]["efl-focal"]["APr"]["mean"] == pytest.approx((0.10 + 0.11) / 2)


def test_study_command_quick(tmp_path):
    out = str(tmp_path / "study")
    assert ltk(["study", "efl", "--quick", "--out", out, "--seeds", "0", "1", "--max-iter", "2"]) == 0
    with open(os.path.join(out, "study.json")) as f:
        res = json.load(f)
    assert res["seeds"] == [0, 1] and set(res["runs"]) == {"focal", "efl", "qfl", "eqfl"}
    for m in res["runs"]:
        assert set(res["runs"][m]) == {"0", "1"}
    assert "efl-focal" in res["summary"]["pairs"] and "eqfl-qfl" in res["summary"]["pairs"]
    table = open(os.path.join(out, "study.md")).read()
    assert "ATSS + EFL" in table and "±" in table


def test_study_reuses_only_finished_runs_of_the_same_config(tmp_path):
    """`--reuse` keeps a finished run of the identical config and retrains anything else."""
    out = str(tmp_path / "study")
    base = ["study", "efl", "--quick", "--out", out, "--methods", "focal"]
    assert ltk(base + ["--seeds", "0", "--max-iter", "2"]) == 0
    log0 = os.path.join(out, "focal_seed0", "train_log.json")
    first = os.stat(log0).st_mtime_ns
    assert ltk(base + ["--seeds", "0", "1", "--max-iter", "2", "--reuse"]) == 0
    assert os.stat(log0).st_mtime_ns == first  # seed 0 reused, seed 1 trained
    with open(os.path.join(out, "study.json")) as f:
        res = json.load(f)
    assert set(res["runs"]["focal"]) == {"0", "1"}
    assert ltk(base + ["--seeds", "0", "--max-iter", "3", "--reuse"]) == 0
    assert os.stat(log0).st_mtime_ns != first  # another config: trained again


def test_losses_study_command_quick(tmp_path):
    """`ltk study losses`: the two-stage baseline and the three other LVIS losses, paired against it."""
    out = str(tmp_path / "losses")
    assert ltk(["study", "losses", "--quick", "--out", out, "--seeds", "0", "--max-iter", "2"]) == 0
    with open(os.path.join(out, "study.json")) as f:
        res = json.load(f)
    assert res["study"] == "losses" and set(res["runs"]) == {"softmax", "seesaw", "eqlv2", "federated"}
    assert set(res["summary"]["pairs"]) == {"seesaw-softmax", "eqlv2-softmax", "federated-softmax"}
    table = open(os.path.join(out, "study.md")).read()
    assert "Faster R-CNN + EQL v2" in table and "Seesaw - softmax" in table
