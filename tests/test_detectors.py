"""The thin detectors of ltkernels.models: each trains a few iterations on a tiny synthetic set with its loss going
down and evaluates; BAGS's classifier has the group layout; SimCal's dual head takes exactly the calibrated
scores for the tail classes; the decoupled stages train only their classifier."""
import math

import pytest
import torch

import ltkernels
from ltkernels.models.configs import get_config, merge
from ltkernels.models.data.synthetic import write_synthetic_lvis
from ltkernels.models.detectors import OneStageDetector, TwoStageDetector, build_model
from ltkernels.models.engine.checkpoint import load_checkpoint
from ltkernels.models.engine.trainer import train

EVAL_KEYS = {"AP", "APr", "APc", "APf", "AP1", "AP2", "AP3", "AP4", "per_class_ap"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_lvis(str(tmp_path_factory.mktemp("synth")), num_classes=8, num_train_images=24,
                                num_val_images=8, image_size=(96, 96), seed=0)


def tiny_cfg(name, max_iter=12, **solver):
    return merge(get_config(name), {"data": {"min_size": 96, "max_size": 96},
                                    "solver": {"max_iter": max_iter, "batch_size": 4, "warmup_iters": 2,
                                               "steps": [], **solver}})


def run(data, name, out, base=None, **kw):
    return train(tiny_cfg(name, **kw), data["train_ann"], data["image_root"], str(out), val_ann=data["val_ann"],
                 base=base, progress=False)


def mean_loss(history, key="loss", first=True, k=3):
    part = history[:k] if first else history[-k:]
    return sum(h[key] for h in part) / len(part)


def assert_learns_and_evaluates(res):
    h = res["history"]
    assert all(math.isfinite(r["loss"]) for r in h)
    assert mean_loss(h, first=False) < 0.9 * mean_loss(h), [round(r["loss"], 3) for r in h]
    m = res["metrics"]
    assert EVAL_KEYS <= set(m) and 0.0 <= m["AP"] <= 1.0


@pytest.fixture(scope="module")
def baseline(data, tmp_path_factory):
    return run(data, "two_stage_softmax", tmp_path_factory.mktemp("softmax"), max_iter=16)


def test_two_stage_softmax_trains_and_evaluates(baseline):
    assert_learns_and_evaluates(baseline)
    assert baseline["model"].roi_heads.cls_score.out_features == 8 + 1


@pytest.mark.parametrize("loss,outputs,state", [("seesaw", 8 + 2, "cum_samples"), ("eqlv2", 8 + 1, "pos_neg"),
                                                  ("federated", 8, "weight")])
def test_two_stage_with_the_other_lvis_losses_trains_and_evaluates(data, tmp_path, loss, outputs, state):
    res = run(data, f"two_stage_{loss}", tmp_path / loss, max_iter=16)
    assert_learns_and_evaluates(res)
    head = res["model"].roi_heads
    assert head.cls_score.out_features == outputs
    assert f"roi_heads.cls_loss_fn.{state}" in res["model"].state_dict()
    if loss == "seesaw":  # the sampled RoIs were counted: background and classes
        cum = head.cls_loss_fn.cum_samples
        assert cum[0] > 0 and cum[1:].sum() > 0 and float(cum.sum()) == int(cum.sum())
    if loss == "eqlv2":
        assert torch.isfinite(head.cls_loss_fn.pos_neg).all() and (head.cls_loss_fn.neg_grad > 0).all()
    if loss == "federated":  # sampling weights: the synthetic categories' image counts ** 0.5
        assert (head.cls_loss_fn.weight > 0).all()
    ckpt = load_checkpoint(res["checkpoint"])
    assert f"roi_heads.cls_loss_fn.{state}" in ckpt["model"]


def _frozen_unchanged(model, base_ckpt, trainable_prefix):
    base = load_checkpoint(base_ckpt)["model"]
    for k, v in model.state_dict().items():
        if k.startswith(trainable_prefix) or k not in base or base[k].shape != v.shape:
            continue
        assert torch.equal(v.cpu(), base[k]), f"{k} changed although frozen"


def test_bags_stage_two(data, baseline, tmp_path):
    res = run(data, "two_stage_bags", tmp_path, base=baseline["checkpoint"], max_iter=10, lr=0.05)
    head = res["model"].roi_heads
    groups = ltkernels.BalancedGroups.from_instance_counts(res["meta"]["instance_counts"], (10, 100, 1000))
    assert head.groups == groups
    # [bg, fg] + per group [others, classes...]: C + G + 2 columns (1236 on LVIS v0.5's 1230 classes, 4 groups)
    assert groups.num_logits == 8 + groups.num_groups + 2
    assert head.cls_score.out_features == groups.num_logits, (head.cls_score, groups)
    assert_learns_and_evaluates(res)
    _frozen_unchanged(res["model"], baseline["checkpoint"], "roi_heads.cls_score")
    # the classifier was re-initialised, not copied from the baseline
    base_w = load_checkpoint(baseline["checkpoint"])["model"]["roi_heads.cls_score.weight"]
    assert base_w.shape != head.cls_score.weight.shape
    # BAGS inference scores: group softmax, background column 0
    x = torch.randn(5, head.fc7.out_features)
    expected = ltkernels.group_softmax_scores(head.cls_score(x).float(), groups)
    torch.testing.assert_close(head.class_scores(x), expected)


def test_simcal_stage_two(data, baseline, tmp_path):
    res = run(data, "two_stage_simcal", tmp_path, base=baseline["checkpoint"], max_iter=10, lr=0.05)
    assert set(res["history"][0]) >= {"loss_calib"}
    assert_learns_and_evaluates(res)
    _frozen_unchanged(res["model"], baseline["checkpoint"], "roi_heads.calib_score")
    head = res["model"].roi_heads
    assert not torch.equal(head.calib_score.weight, head.cls_score.weight)  # it trained


def test_simcal_dual_head_takes_calibrated_scores_for_tail_classes():
    counts = [500, 120, 99, 100, 3, 0, 1000, 42]
    cfg = merge(get_config("two_stage_simcal")["model"], {"simcal_tail_threshold": 100})
    model = TwoStageDetector(cfg, len(counts), counts)
    head = model.roi_heads
    torch.nn.init.normal_(head.calib_score.weight)
    torch.nn.init.normal_(head.cls_score.weight)
    x = torch.randn(64, head.fc7.out_features)
    dual = head.class_scores(x)
    orig = head.cls_score(x).softmax(-1)
    cal = head.calib_score(x).softmax(-1)
    tail = [c for c, n in enumerate(counts, start=1) if n < 100]
    assert tail == [3, 5, 6, 8]
    for col in range(len(counts) + 1):
        src = cal if col in tail else orig
        assert torch.equal(dual[:, col], src[:, col]), col
    assert not torch.allclose(dual.sum(1), torch.ones(64))  # nothing renormalised
    head.use_dual_head = False
    assert torch.equal(head.class_scores(x), orig)


@pytest.mark.parametrize("loss", ["focal", "efl"])
def test_one_stage_trains_and_evaluates(data, tmp_path, loss):
    res = run(data, f"one_stage_{loss}", tmp_path, max_iter=16)
    assert_learns_and_evaluates(res)
    model = res["model"]
    assert isinstance(model.cls_loss_fn, ltkernels.EqualizedFocalLoss)
    assert model.cls_loss_fn.scale == (8.0 if loss == "efl" else 0.0)
    pos_grad = model.cls_loss_fn.pos_grad
    assert (pos_grad > 0).any() and (model.cls_loss_fn.neg_grad > 0).all()
    if loss == "efl":  # the statistics are in the state_dict (saved with checkpoints)
        assert "cls_loss_fn.pos_neg" in model.state_dict()


def test_one_stage_prior_bias_init():
    model = OneStageDetector(get_config("one_stage_efl")["model"], 8)
    b = model.head.cls_logits.bias
    torch.testing.assert_close(torch.sigmoid(b), torch.full_like(b, 0.01))
    with torch.no_grad():
        model.eval()
        out = model([torch.randn(3, 96, 96), torch.randn(3, 64, 80)])
    assert len(out) == 2 and out[1]["boxes"].shape[1] == 4
    assert (out[1]["boxes"][:, 2] <= 80).all() and (out[1]["boxes"][:, 3] <= 64).all()
    assert len(out[0]["scores"]) <= 300 and (out[0]["labels"] >= 1).all() and (out[0]["labels"] <= 8).all()


def test_two_stage_postprocess_uses_class_specific_boxes_and_limits():
    counts = [50] * 5
    model = build_model(get_config("two_stage_softmax")["model"], 5, counts).eval()
    with torch.no_grad():
        out = model([torch.randn(3, 96, 128)])
    d = out[0]
    assert len(d["boxes"]) <= 300 and (d["labels"] >= 1).all() and (d["labels"] <= 5).all()
    assert (d["scores"][:-1] >= d["scores"][1:]).all()
    assert (d["boxes"][:, 2] <= 128).all() and (d["boxes"][:, 3] <= 96).all()


@pytest.mark.parametrize("name", ["lvis_v1_two_stage_bags", "lvis_v1_one_stage_efl"])
def test_lvis_configs_build_resnet50_fpn(name):
    counts = [(7 * c) % 1500 for c in range(1, 1204)]  # 1203 LVIS v1 classes
    model = build_model(get_config(name)["model"], 1203, counts).eval()
    if name.endswith("bags"):
        groups = model.roi_heads.groups
        assert groups.num_groups == 4 and model.roi_heads.cls_score.out_features == 1203 + 4 + 2
        assert model.roi_heads.pooler.strides == (4, 8, 16, 32)
    else:
        assert model.head.cls_logits.out_channels == 9 * 1203 and model.backbone.strides[0] == 8
    frozen = [n for n, p in model.backbone.named_parameters() if not p.requires_grad]
    assert any("conv1" in n for n in frozen) and any("layer4" in n for n, p in model.backbone.named_parameters()
                                                     if p.requires_grad)
    with torch.no_grad():
        out = model([torch.randn(3, 128, 160)])
    assert out[0]["boxes"].shape[-1] == 4


@pytest.mark.parametrize("num_images,pre_nms,post_nms", [(1, 50, 20), (3, 300, 100), (2, 2000, 1000)])
def test_rpn_proposals_equal_torchvision_filter(num_images, pre_nms, post_nms):
    """One batched ltkernels NMS over (image, level) segments == torchvision's per-image filter_proposals."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

    from ltkernels.models.detectors.rpn import RPN

    g = torch.Generator().manual_seed(num_images * 7 + pre_nms)
    levels = [1200, 600, 300, 75]  # anchors per level, the last below pre_nms on purpose
    n = sum(levels)
    args = (AnchorGenerator(), RPNHead(8, 3), 0.7, 0.3, 256, 0.5,
            dict(training=pre_nms, testing=pre_nms), dict(training=post_nms, testing=post_nms), 0.7)
    ours, theirs = RPN(*args).eval(), RegionProposalNetwork(*args).eval()
    ours.score_thresh = theirs.score_thresh = 0.05
    xy = torch.rand(num_images, n, 2, generator=g) * 300 - 20  # some boxes leave the image, some are tiny
    wh = torch.rand(num_images, n, 2, generator=g) * 80 * (torch.rand(num_images, n, 1, generator=g) > 0.05)
    proposals = torch.cat([xy, xy + wh], -1)
    objectness = torch.randn(num_images * n, 1, generator=g) * 3
    shapes = [(256 - 16 * i, 240 + 8 * i) for i in range(num_images)]
    got_b, got_s = ours.filter_proposals(proposals, objectness, shapes, levels)
    exp_b, exp_s = theirs.filter_proposals(proposals, objectness, shapes, levels)
    assert len(got_b) == num_images
    for gb, gs, eb, es in zip(got_b, got_s, exp_b, exp_s):
        assert gb.shape[0] > 0
        torch.testing.assert_close(gs, es, rtol=0, atol=0)
        torch.testing.assert_close(gb, eb, rtol=0, atol=0)
