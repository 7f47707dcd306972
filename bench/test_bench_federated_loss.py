"""Federated loss, forward + backward with the class draw, at the two-stage LVIS v1 size (8192 RoIs, C = 1203
sigmoid classes, 50 classes per step, weights = LVIS v1 image counts ** 0.5). Peers: the eager reference in float32
(our device draw, then BCE over the class set by autograd), the port of detectron2's federated loss (torch.unique
and torch.multinomial: host syncs) and torch.compile of the reference."""
import pytest
import torch
from test_bench_seesaw_loss import C, _step, make_rois, run

import ltkernels
from ltkernels._ext import has_op
from ltkernels.reference import federated_loss as ref
from ltkernels.testing.official_ports import FedLossFastRCNN, to_official_labels

pytestmark = pytest.mark.skipif(not has_op("federated_loss"), reason="federated_loss not built")

OP = "federated_loss"


def _weight(device):
    return ltkernels.FederatedLoss.from_lvis("v1").weight.to(device)


def test_federated_ltkernels(run_bench, device):
    logits, labels = make_rois(device, C)
    mod = ltkernels.FederatedLoss(_weight(device)).to(device)
    run(run_bench, device, "ltkernels", _step(logits, lambda: mod(logits, labels)), logits, op=OP)


def test_federated_eager(run_bench, device):
    logits, labels = make_rois(device, C)
    weight = _weight(device)

    def fn():
        return ref.federated_loss(logits, labels, ltkernels.federated_loss_classes(labels, weight))

    run(run_bench, device, "eager", _step(logits, fn), logits, op=OP)


def test_federated_official(run_bench, device):
    # detectron2's head has a background column the federated loss drops: K + 1 logits
    logits, labels = make_rois(device, C + 1)
    port = FedLossFastRCNN(_weight(device))
    off, _ = to_official_labels(labels, C)
    run(run_bench, device, "official", _step(logits, lambda: port.sigmoid_cross_entropy_loss(logits, off)), logits,
        op=OP, columns=C)


def test_federated_compile(run_bench, device):
    logits, labels = make_rois(device, C)
    weight = _weight(device)
    loss_fn = torch.compile(ref.federated_loss, fullgraph=True)

    def fn():
        return loss_fn(logits, labels, ltkernels.federated_loss_classes(labels, weight))

    run(run_bench, device, "compile", _step(logits, fn), logits, op=OP)
