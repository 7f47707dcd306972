"""label_layout="background_last" (mmdet / detectron2: classes 0..C-1, background C) gives exactly the results of the
default layout on the converted labels, for the losses, the BAGS score merge and multiclass NMS."""
import pytest
import torch

import ltkernels

COUNTS = [3, 50, 500, 5000, 7, 120]


def _to_last(labels, c):
    """Default-layout labels (0 = background, 1..C) to mmdet's (class j - 1, background C); -1 stays ignored."""
    return torch.where(labels == -1, labels, torch.where(labels == 0, torch.full_like(labels, c), labels - 1))


def test_bags_loss_and_scores():
    groups = ltkernels.BalancedGroups.from_instance_counts(COUNTS)
    c = groups.num_classes
    logits = torch.randn(40, groups.num_logits, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(-1, c + 1, (40,))
    g = torch.Generator().manual_seed(3)
    ref = ltkernels.group_softmax_loss(logits, labels, groups, 2.0, g)
    g.manual_seed(3)
    got = ltkernels.group_softmax_loss(logits, _to_last(labels, c), groups, 2.0, g, label_layout="background_last")
    assert torch.equal(got, ref)
    module = ltkernels.GroupSoftmaxLoss(COUNTS, others_ratio=float("inf"), label_layout="background_last")
    assert "label_layout='background_last'" in repr(module)
    assert torch.equal(module(logits, _to_last(labels, c)),
                       ltkernels.group_softmax_loss(logits, labels, groups, float("inf")))
    sel = ltkernels.group_softmax_selection(_to_last(labels, c), groups, float("inf"), label_layout="background_last")
    assert torch.equal(sel, ltkernels.group_softmax_selection(labels, groups, float("inf")))
    scores = ltkernels.group_softmax_scores(logits, groups)
    last = ltkernels.group_softmax_scores(logits, groups, label_layout="background_last")
    assert torch.equal(last[:, :c], scores[:, 1:]) and torch.equal(last[:, c], scores[:, 0])
    last[:, 2].sum().backward()
    assert logits.grad is not None
    with pytest.raises(ValueError, match="label_layout must be"):
        ltkernels.group_softmax_scores(logits, groups, label_layout="mmdet")
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.6"):  # the same range in both layouts
        ltkernels.group_softmax_loss(logits, torch.full((40,), c + 1), groups, label_layout="background_last")


def test_efl():
    c = 5
    logits = torch.randn(30, c, dtype=torch.float64)
    labels = torch.randint(-1, c + 1, (30,))
    ref = ltkernels.equalized_focal_loss(logits, labels)
    assert torch.equal(ltkernels.equalized_focal_loss(logits, _to_last(labels, c), label_layout="background_last"),
                       ref)
    a, b = ltkernels.EqualizedFocalLoss(c).double(), ltkernels.EqualizedFocalLoss(
        c, label_layout="background_last").double()
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    a(x1, labels).backward()
    b(x2, _to_last(labels, c)).backward()
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(a.pos_neg, b.pos_neg) and torch.equal(a.pos_grad, b.pos_grad)
    with pytest.raises(ValueError, match="label_layout must be"):
        ltkernels.EqualizedFocalLoss(c, label_layout="detectron2")


def test_multiclass_nms():
    boxes = torch.rand(20, 4) * 30
    boxes[:, 2:] += boxes[:, :2] + 1
    scores = torch.rand(20, 4)
    b, s, labels, rows = ltkernels.multiclass_nms(boxes, scores, 0.05, 0.5, 50)
    b2, s2, labels2, rows2 = ltkernels.multiclass_nms(boxes, scores, 0.05, 0.5, 50, label_layout="background_last")
    assert torch.equal(labels2, labels - 1) and torch.equal(b2, b) and torch.equal(rows2, rows)
    assert int(labels2.min()) == 0
    image = torch.tensor([0] * 10 + [1] * 10)
    per_image = ltkernels.batched_multiclass_nms(boxes, scores, image, 2, 0.05, 0.5, 50,
                                                 label_layout="background_last")
    for i, (_, _, lab, _) in enumerate(per_image):
        assert torch.equal(lab, ltkernels.multiclass_nms(boxes[image == i], scores[image == i], 0.05, 0.5, 50)[2] - 1)
