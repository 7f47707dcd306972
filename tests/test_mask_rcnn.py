"""Mask R-CNN: mask targets by ltkernels.roi_align, the mask loss on the box head's positives, masks of the
predicted class at inference, frozen mask head in the decoupled BAGS / SimCal stages, training and exact resume."""
import math

import pytest
import torch

from ltkernels.models.configs import get_config, merge
from ltkernels.models.data.synthetic import write_synthetic_lvis
from ltkernels.models.detectors import build_model
from ltkernels.models.detectors.mask_head import MaskHead, mask_loss, mask_targets
from ltkernels.models.engine.trainer import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_lvis(str(tmp_path_factory.mktemp("synth")), num_classes=6, num_train_images=16,
                                num_val_images=4, image_size=(64, 64), seed=1)


def mask_cfg(name, max_iter, **train_kw):
    return merge(get_config(name), {"model": {"mask_head": True, "mask_head_channels": 32},
                                    "data": {"min_size": 64, "max_size": 64},
                                    "solver": {"max_iter": max_iter, "batch_size": 4, "warmup_iters": 2,
                                               "steps": []},
                                    "train": {"eval": False, **train_kw}})


def test_mask_targets_cut_the_instance_to_the_box():
    masks = torch.zeros(2, 40, 50, dtype=torch.uint8)
    masks[0, 10:30, 5:25] = 1  # a 20 x 20 square
    masks[1, :, 25:] = 1  # the right half
    boxes = torch.tensor([[5.0, 10.0, 25.0, 30.0],  # exactly the square: all ones
                          [5.0, 10.0, 45.0, 30.0],  # twice as wide: the left half
                          [0.0, 0.0, 50.0, 40.0]])  # instance 1 over the whole image: the right half
    t = mask_targets(masks, torch.tensor([0, 0, 1]), boxes, 28)
    assert t.shape == (3, 28, 28)
    assert t[0].all()
    assert t[1][:, :14].all() and not t[1][:, 14:].any()
    assert not t[2][:, :14].any() and t[2][:, 14:].all()
    assert mask_targets(masks, torch.zeros(0, dtype=torch.long), torch.zeros(0, 4), 28).shape == (0, 28, 28)


def test_mask_loss_is_the_mean_binary_cross_entropy():
    logits = torch.zeros(2, 4, 4)
    logits[0] = 10.0  # RoI 0: confident foreground
    targets = torch.ones(2, 4, 4)
    loss = mask_loss(logits, targets)
    assert math.isclose(float(loss), (math.log1p(math.exp(-10.0)) + math.log(2)) / 2, rel_tol=1e-6)
    empty = mask_loss(torch.zeros(0, 28, 28, requires_grad=True), torch.zeros(0, 28, 28))
    assert float(empty) == 0.0 and empty.requires_grad


def test_head_shapes_and_predicted_class_masks():
    head = MaskHead(8, [8, 16], num_classes=5, channels=16)
    feats = [torch.randn(1, 8, 12, 12), torch.randn(1, 8, 6, 6)]
    boxes = torch.tensor([[4.0, 4.0, 40.0, 50.0], [10.0, 20.0, 30.0, 35.0]])
    logits = head.logits(feats, [boxes])
    assert logits.shape == (2, 5, 28, 28)
    labels = torch.tensor([3, 5])
    # the class channel alone (training's and inference's path) is that channel of the full logits, gradients too
    picked = head.class_logits(feats, [boxes], labels)
    torch.testing.assert_close(picked, logits[[0, 1], [2, 4]])
    g_picked = torch.autograd.grad(picked.square().sum(), head.predictor.weight)[0]
    g_full = torch.autograd.grad(head.logits(feats, [boxes])[[0, 1], [2, 4]].square().sum(), head.predictor.weight)[0]
    torch.testing.assert_close(g_picked, g_full)
    dets = [{"boxes": boxes, "labels": torch.tensor([3, 5]), "scores": torch.tensor([0.9, 0.5])}]
    head.predict(feats, dets)
    torch.testing.assert_close(dets[0]["masks"], logits[[0, 1], [2, 4]].sigmoid())
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    head.predict(feats, empty)
    assert empty[0]["masks"].shape == (0, 28, 28)


@pytest.mark.parametrize("name", ["two_stage_bags", "two_stage_simcal"])
def test_decoupled_stages_freeze_the_mask_head(name, data):
    model = build_model(mask_cfg(name, 1)["model"], 6, [5, 50, 500, 5, 50, 500])
    model.freeze_for_stage("bags" if name.endswith("bags") else "simcal")
    assert not any(p.requires_grad for p in model.mask_head.parameters())
    model.train()
    assert not model.mask_head.training


@pytest.mark.slow
def test_mask_rcnn_trains_and_resumes_exactly(data, tmp_path):
    n = 6
    a = train(mask_cfg("two_stage_softmax", n, ckpt_every=n // 2), data["train_ann"], data["image_root"],
              str(tmp_path / "a"), progress=False)
    h = a["history"]
    assert all(math.isfinite(r["loss_mask"]) for r in h) and h[0]["loss_mask"] > 0.3
    assert min(r["loss_mask"] for r in h[-3:]) < h[0]["loss_mask"]
    mid = tmp_path / "a" / f"checkpoint_{n // 2:07d}.pt"
    b = train(mask_cfg("two_stage_softmax", n, ckpt_every=n // 2), data["train_ann"], data["image_root"],
              str(tmp_path / "b"), resume=str(mid), progress=False)
    assert [r["loss"] for r in b["history"]] == [r["loss"] for r in h[n // 2:]]
    sa, sb = a["model"].state_dict(), b["model"].state_dict()
    assert any(k.startswith("mask_head.") for k in sa)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    model = b["model"].eval()
    images = [torch.randn(3, 64, 64)]
    with torch.no_grad():
        det = model(images)[0]
    assert det["masks"].shape == (len(det["boxes"]), 28, 28)
    assert ((det["masks"] >= 0) & (det["masks"] <= 1)).all()
