"""Federated loss (docs/spec.md §11): the float64 reference and the draw of the class set against a port of
detectron2's code, then the public API (`ltkernels.federated_loss`, `ltkernels.federated_loss_classes`,
`ltkernels.FederatedLoss`) against both."""
import itertools
import math
from statistics import NormalDist

import pytest
import torch

import ltkernels
from ltkernels._validate import ArgumentTypeError, ArgumentValueError
from ltkernels.data import lvis_categories
from ltkernels.reference.federated_loss import class_weight, federated_targets, num_negatives, present_classes
from ltkernels.reference.federated_loss import federated_loss as ref_loss
from ltkernels.testing.official_ports import (
    FedLossFastRCNN,
    class_set_to_official,
    get_fed_loss_classes,
    get_fed_loss_cls_weights,
    to_official_labels,
)

from conftest import CudaSide, cuda_devices, devices


def make_batch(n, c, device="cpu", dtype=torch.float64, p_ignore=0.1, p_bg=0.5, spread=2.5):
    """Long-tailed labels (class k with probability ~ k^-1.2) and logits [n, c], drawn on the CPU, then moved."""
    freq = 1.0 / torch.arange(1, c + 1, dtype=torch.float64) ** 1.2
    labels = torch.multinomial(freq, n, replacement=True) + 1 if n else torch.zeros(0, dtype=torch.long)
    r = torch.rand(n)
    labels[r < p_bg] = 0
    labels[r < p_ignore] = -1
    logits = torch.randn(n, c, dtype=torch.float64) * spread - 1.0
    return logits.to(device=device, dtype=dtype), labels.to(device)


def assert_close(a, b, rtol=1e-9, atol=1e-12):
    torch.testing.assert_close(a.detach().double().cpu(), b.detach().double().cpu(), rtol=rtol, atol=atol)


def port_loss(logits, labels, classes, c):
    """detectron2's sigmoid_cross_entropy_loss with use_fed_loss on the non-ignored rows, the class set given
    (ltkernels' bool mask turned into detectron2's index list) and a background column appended (it carries no
    loss). Returns (loss, dloss/dlogits of all rows)."""
    off, keep = to_official_labels(labels.cpu(), c, drop_ignored=True)
    x = logits.detach().cpu().double().clone().requires_grad_()
    pred = torch.cat([x[keep], torch.zeros(int(keep.sum()), 1, dtype=x.dtype)], dim=1)
    port = FedLossFastRCNN(torch.ones(c))
    loss = port.sigmoid_cross_entropy_loss(pred, off, fed_loss_classes=class_set_to_official(classes.cpu(),
                                                                                            labels.cpu()))
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


def check_class_set(classes, labels, weight, num_fed):
    """§11's invariants of a drawn set: every present class, never a zero-weight class that is not present, and
    exactly min(num_negatives, #eligible nonzero-weight classes) negatives."""
    labels, weight, classes = labels.cpu(), weight.cpu(), classes.cpu()
    c = weight.shape[0]
    assert classes.dtype == torch.bool and classes.shape == (c,)
    present = present_classes(labels, c)
    assert classes[present].all()
    extra = classes & ~present
    assert not (extra & (weight == 0)).any()
    eligible = int(((weight > 0) & ~present).sum())
    assert int(extra.sum()) == min(num_negatives(labels, c, num_fed), eligible)


def successive_sampling_inclusion(weight, k):
    """Exact inclusion probabilities of k draws without replacement, each in proportion to the remaining
    weights (the law of torch.multinomial(weight, k, replacement=False)), by enumerating the ordered draws."""
    w = [float(v) for v in weight]
    total = sum(w)
    incl = [0.0] * len(w)
    for seq in itertools.permutations([i for i, v in enumerate(w) if v > 0], k):
        prob, rest = 1.0, total
        for i in seq:
            prob *= w[i] / rest
            rest -= w[i]
        for i in seq:
            incl[i] += prob
    return torch.tensor(incl, dtype=torch.float64)


# a fixed case for the statistical tests: 12 classes, classes 2 and 5 and background present (3 distinct labels),
# num_fed_classes = 7, so 4 negatives are drawn from the 10 other classes
SAMPLER_WEIGHT = torch.tensor([1.0, 30.0, 2.0, 8.0, 5.0, 0.5, 12.0, 3.0, 20.0, 1.5, 6.0, 40.0])
SAMPLER_LABELS = torch.tensor([2, 5, 0, 0, 2, -1, 0, 5])
SAMPLER_NUM_FED = 7
SAMPLER_DRAWS = 6000


def sampler_expectation():
    """(eligible columns, their exact inclusion probabilities, the per-class bound on |count - T p| at
    z = the 1 - 1e-6 / (2 m) normal quantile: a false failure below about 1e-6 per test)."""
    present = present_classes(SAMPLER_LABELS, 12)
    eligible = torch.nonzero(~present).flatten()
    k = num_negatives(SAMPLER_LABELS, 12, SAMPLER_NUM_FED)
    assert k == 4 and len(eligible) == 10
    p = successive_sampling_inclusion(SAMPLER_WEIGHT[eligible], k)
    z = NormalDist().inv_cdf(1 - 1e-6 / (2 * len(eligible)))
    bound = z * torch.sqrt(SAMPLER_DRAWS * p * (1 - p))
    return eligible, p, bound


# ---- the reference and the draw against detectron2's code (run without the kernels) -----------------------------

@pytest.mark.parametrize("n,c,num_fed", [(37, 11, 5), (128, 60, 50), (1, 3, 2), (64, 30, 8), (203, 120, 50)])
def test_port_detectron2_equals_reference_over_three_steps(n, c, num_fed):
    """Three steps: detectron2's draw (its unique gt classes plus torch.multinomial negatives) has the size
    present + num_negatives predicts; on that set the reference's loss and gradient equal detectron2's in
    float64, and the columns outside the set get no gradient."""
    weight = torch.rand(c) + 0.1
    for step in range(3):
        logits, labels = make_batch(n, c, p_ignore=0.1 if n > 1 else 0.0)
        off, keep = to_official_labels(labels, c, drop_ignored=True)
        fed = get_fed_loss_classes(off, num_fed, c, weight, torch.Generator().manual_seed(step))
        distinct = len(torch.unique(off))
        assert len(fed) == distinct + num_negatives(labels, c, num_fed)
        classes = torch.zeros(c, dtype=torch.bool)
        classes[fed[fed < c]] = True
        assert classes[present_classes(labels, c)].all()
        x = logits.clone().requires_grad_()
        loss = ref_loss(x, labels, classes)
        (g,) = torch.autograd.grad(loss, x)
        lp, gp = port_loss(logits, labels, classes, c)
        assert_close(loss, lp)
        assert_close(g, gp)
        assert (g[:, ~classes] == 0).all() and (g[labels == -1] == 0).all()


def test_reference_gradient_is_sigmoid_minus_target_on_the_class_set():
    n, c = 70, 15
    logits, labels = make_batch(n, c)
    classes = torch.rand(c) < 0.5
    x = logits.clone().requires_grad_()
    (g,) = torch.autograd.grad(ref_loss(x, labels, classes, normalizer=3.0), x)
    t, valid = federated_targets(labels, c)
    expected = (torch.sigmoid(logits) - t.double()) * classes[None, :] * valid[:, None] / 3.0
    assert_close(g, expected)


def test_reference_counts_as_detectron2():
    c = 10
    labels = torch.tensor([3, 3, 7, -1, 0])
    assert present_classes(labels, c).nonzero().flatten().tolist() == [2, 6]
    assert num_negatives(labels, c, 50) == 47          # 3, 7 and background
    assert num_negatives(labels[:3], c, 50) == 48      # no background row
    assert num_negatives(torch.tensor([-1, -1]), c, 50) == 50
    assert num_negatives(torch.arange(1, 11), c, 5) == 0


def test_port_detectron2_sampler_follows_successive_sampling():
    """torch.multinomial(replacement=False), as detectron2 draws, has the exact inclusion probabilities of
    successive sampling in the fixed case; the bound is tight enough to reject a look-alike law (inclusion in
    proportion to the weights)."""
    eligible, p, bound = sampler_expectation()
    off, _ = to_official_labels(SAMPLER_LABELS, 12, drop_ignored=True)
    gen = torch.Generator().manual_seed(11)
    counts = torch.zeros(13, dtype=torch.float64)
    for _ in range(SAMPLER_DRAWS):
        fed = get_fed_loss_classes(off, SAMPLER_NUM_FED, 12, SAMPLER_WEIGHT, gen)
        assert len(fed) == SAMPLER_NUM_FED
        counts[fed] += 1
    assert counts[12] == SAMPLER_DRAWS and (counts[[1, 4]] == SAMPLER_DRAWS).all()  # background, 2 and 5
    dev = (counts[eligible] - SAMPLER_DRAWS * p).abs()
    assert (dev < bound).all(), (dev / bound).max()
    w = SAMPLER_WEIGHT[eligible].double()
    proportional = (4 * w / w.sum()).clamp(max=1)
    assert ((proportional - p).abs() * SAMPLER_DRAWS > 2 * bound).any()


def test_port_detectron2_weights_from_lvis_categories():
    cats = lvis_categories("v1")
    w = get_fed_loss_cls_weights(cats, 0.5)
    assert w.shape == (1203,)
    assert_close(w, class_weight(cats, 0.5), rtol=1e-6, atol=0)


# ---- the public API ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
def test_loss_matches_float64_reference_and_detectron2(device):
    n, c = 37, 11
    for step in range(3):
        logits, labels = make_batch(n, c)
        classes = (torch.rand(c) < 0.4) | present_classes(labels, c)
        for normalizer in (5.5, torch.tensor(2.0), None):
            x = logits.to(device, copy=True).requires_grad_()
            loss = ltkernels.federated_loss(x, labels.to(device), classes.to(device), normalizer=normalizer)
            loss.backward()
            xr = logits.clone().requires_grad_()
            lr = ref_loss(xr, labels, classes, normalizer)
            lr.backward()
            assert_close(loss, lr)
            assert_close(x.grad, xr.grad)
        lp, gp = port_loss(logits, labels, classes, c)  # detectron2's N: the default normalizer
        assert_close(loss, lp)
        assert_close(x.grad, gp)


@pytest.mark.parametrize("device", devices())
def test_columns_outside_the_class_set_get_zero_gradient(device):
    n, c = 37, 11
    logits, labels = make_batch(n, c)
    classes = torch.zeros(c, dtype=torch.bool)
    classes[[0, 3, 4, 9]] = True
    x = logits.to(device, copy=True).requires_grad_()
    ltkernels.federated_loss(x, labels.to(device), classes.to(device)).backward()
    g = x.grad.cpu()
    assert (g[:, ~classes] == 0).all()
    assert (g[labels == -1] == 0).all()
    assert (g[labels != -1][:, classes] != 0).all()


@pytest.mark.parametrize("device", devices())
def test_float32_within_tolerance_of_float64_reference(device):
    n, c = 37, 11
    logits, labels = make_batch(n, c, dtype=torch.float32)
    classes = torch.rand(c) < 0.6
    x = logits.to(device, copy=True).requires_grad_()
    loss = ltkernels.federated_loss(x, labels.to(device), classes.to(device))
    loss.backward()
    xr = logits.double().requires_grad_()
    lr = ref_loss(xr, labels, classes)
    lr.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert_close(loss, lr, rtol=1e-5, atol=1e-6)
    assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("device", devices())
def test_drawn_classes_hold_the_present_ones_and_the_official_count(device):
    """Present classes always in; max(num_fed - distinct labels (background included), 0) negatives; ignored rows
    do not count."""
    c = 11
    weight = torch.rand(c) + 0.2
    cases = [
        (torch.tensor([2, 2, 7, 0, -1, 0]), 5),      # 3 distinct with background: 2 negatives
        (torch.tensor([2, 2, 7, -1]), 5),            # no background row: 3 negatives
        (torch.tensor([1, 2, 3, 4, 5, 0]), 5),       # 6 distinct >= 5: nothing drawn
        (torch.tensor([-1, -1, -1]), 4),             # nothing present: 4 negatives
        (torch.tensor([0, 0]), 3),                   # background only: 2 negatives
        (torch.zeros(0, dtype=torch.long), 6),       # empty batch: 6 negatives
    ]
    gen = torch.Generator(device=device).manual_seed(0)
    for labels, num_fed in cases:
        for _ in range(5):
            classes = ltkernels.federated_loss_classes(labels.to(device), weight.to(device), num_fed,
                                                       generator=gen)
            assert classes.device.type == torch.device(device).type
            check_class_set(classes, labels, weight, num_fed)


@pytest.mark.parametrize("device", devices())
def test_drawn_classes_never_zero_weight_and_fewer_only_when_weights_run_out(device):
    c = 20
    weight = torch.rand(c) + 0.5
    weight[[0, 3, 6, 7, 12, 13, 14, 15, 18]] = 0
    gen = torch.Generator(device=device).manual_seed(1)
    # a zero-weight class that is present is in; the negatives never have zero weight
    labels = torch.tensor([4, 0, 9, 9])
    for _ in range(20):
        classes = ltkernels.federated_loss_classes(labels.to(device), weight.to(device), 6, generator=gen)
        check_class_set(classes, labels, weight, 6)
        assert classes.cpu()[3] and int(classes.sum()) == 2 + 3
    # more negatives wanted (47) than nonzero-weight classes left (10): all of them, and no other
    labels = torch.tensor([1, 2, 0])
    classes = ltkernels.federated_loss_classes(labels.to(device), weight.to(device), 50, generator=gen).cpu()
    check_class_set(classes, labels, weight, 50)
    assert torch.equal(classes, present_classes(labels, c) | (weight > 0))


@pytest.mark.parametrize("device", devices(emulated=False))
def test_drawn_classes_follow_torch_multinomial_law(device):
    """Inclusion frequencies of the device draw over T = 6000 draws: within the bound of the exact successive-
    sampling probabilities (torch.multinomial's law) and, two-sample, of torch.multinomial's own frequencies."""
    eligible, p, bound = sampler_expectation()
    gen = torch.Generator(device=device).manual_seed(5)
    labels, weight = SAMPLER_LABELS.to(device), SAMPLER_WEIGHT.to(device)
    counts = torch.zeros(12, dtype=torch.float64, device=device)
    for _ in range(SAMPLER_DRAWS):
        classes = ltkernels.federated_loss_classes(labels, weight, SAMPLER_NUM_FED, generator=gen)
        counts += classes.double()
    counts = counts.cpu()
    assert (counts[[1, 4]] == SAMPLER_DRAWS).all()
    assert counts.sum() == SAMPLER_DRAWS * 6  # 2 present + 4 negatives, every time
    dev = (counts[eligible] - SAMPLER_DRAWS * p).abs()
    assert (dev < bound).all(), (dev / bound).max()
    # two-sample against torch.multinomial on the same weights (variance of a difference: twice)
    g = torch.Generator().manual_seed(6)
    w = SAMPLER_WEIGHT[eligible]
    ref = torch.zeros(len(eligible), dtype=torch.float64)
    for _ in range(SAMPLER_DRAWS):
        ref[torch.multinomial(w, 4, replacement=False, generator=g)] += 1
    assert ((counts[eligible] - ref).abs() < math.sqrt(2) * bound).all()


@pytest.mark.parametrize("device", devices())
def test_generator_reproduces_and_draws_vary(device):
    c = 40
    weight = torch.rand(c, device=device) + 0.1
    labels = torch.tensor([3, 0, 0, 17], device=device)
    draw = lambda seed: ltkernels.federated_loss_classes(labels, weight, 10,
                                                         generator=torch.Generator(device=device).manual_seed(seed))
    assert torch.equal(draw(3), draw(3))
    assert len({tuple(draw(s).nonzero().flatten().tolist()) for s in range(6)}) > 1


@pytest.mark.parametrize("device", devices())
def test_module_draws_its_classes_and_computes_the_loss_on_them(device):
    n, c = 37, 11
    weight = torch.rand(c) + 0.1
    mod = ltkernels.FederatedLoss(weight, num_fed_classes=6).to(device)
    assert set(mod.state_dict()) == {"weight"}
    assert_close(mod.weight, weight, rtol=0, atol=0)
    seen = set()
    for _ in range(3):
        logits, labels = make_batch(n, c)
        x = logits.to(device, copy=True).requires_grad_()
        loss = mod(x, labels.to(device))
        loss.backward()
        classes = mod.last_classes.cpu()
        check_class_set(classes, labels, weight, 6)
        seen.add(tuple(classes.tolist()))
        xr = logits.clone().requires_grad_()
        lr = ref_loss(xr, labels, classes)
        lr.backward()
        assert_close(loss, lr)
        assert_close(x.grad, xr.grad)
        lp, _ = port_loss(logits, labels, classes, c)
        assert_close(loss, lp)


def test_module_state_dict_round_trip(tmp_path):
    weight = torch.rand(30) + 0.1
    mod = ltkernels.FederatedLoss(weight, num_fed_classes=8)
    torch.save(mod.state_dict(), tmp_path / "fed.pt")
    other = ltkernels.FederatedLoss(torch.ones(30), num_fed_classes=8)
    other.load_state_dict(torch.load(tmp_path / "fed.pt"))
    assert torch.equal(other.weight, mod.weight)
    logits, labels = make_batch(50, 30, dtype=torch.float32)
    torch.manual_seed(9)
    a = mod(logits, labels)
    torch.manual_seed(9)
    b = other(logits, labels)
    assert torch.equal(mod.last_classes, other.last_classes) and torch.equal(a, b)


@pytest.mark.parametrize("power", [0.5, 1.0])
def test_from_categories_weight_is_image_count_to_the_power(power):
    cats = lvis_categories("v1")
    mod = ltkernels.FederatedLoss.from_categories(cats, power=power)
    assert mod.weight.shape == (1203,)
    assert_close(mod.weight, class_weight(cats, power), rtol=1e-6, atol=0)
    assert_close(mod.weight, get_fed_loss_cls_weights(cats, power), rtol=1e-6, atol=0)
    # the order is that of the ids, not of the list
    shuffled = list(reversed(cats))
    assert torch.equal(ltkernels.FederatedLoss.from_categories(shuffled, power=power).weight, mod.weight)
    if power == 0.5:  # the default power
        assert torch.equal(ltkernels.FederatedLoss.from_categories(cats).weight, mod.weight)


def test_gradcheck():
    c = 5
    logits, labels = make_batch(10, c, p_ignore=0.2, spread=1.5)
    classes = torch.tensor([True, False, True, True, False])
    x = logits.clone().requires_grad_()
    fn = lambda t: ltkernels.federated_loss(t, labels, classes, normalizer=3.0)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


def test_opcheck():
    c = 5
    logits, labels = make_batch(20, c, dtype=torch.float32)
    classes = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    norm = torch.tensor(3.0)
    torch.library.opcheck(torch.ops.ltkernels.federated_loss,
                          (logits.clone().requires_grad_(), labels, classes, norm, -1))
    _, grad = torch.ops.ltkernels.federated_loss(logits, labels, classes, norm, -1)  # dL/dlogits, d(loss) = 1
    x = logits.double().requires_grad_()
    (want,) = torch.autograd.grad(ref_loss(x, labels, classes > 0, normalizer=3.0), x)
    assert_close(grad, want, rtol=1e-5, atol=1e-6)


def test_torch_compile_fullgraph_training_step():
    """The compiled module draws a valid set each step and computes the loss on it (`last_classes` set as in
    eager); the compiled functional loss equals the eager one."""
    c = 40
    weight = torch.rand(c) + 0.1
    mod = ltkernels.FederatedLoss(weight, num_fed_classes=10)

    def step(m, x, labels):
        return m(x, labels)

    compiled = torch.compile(step, fullgraph=True)
    for _ in range(3):
        logits, labels = make_batch(120, c, dtype=torch.float32)
        x = logits.clone().requires_grad_()
        loss = compiled(mod, x, labels)
        (2.0 * loss).backward()
        classes = mod.last_classes
        check_class_set(classes, labels, weight, 10)
        xr = logits.double().requires_grad_()
        (2.0 * ref_loss(xr, labels, classes)).backward()
        torch.testing.assert_close(loss.double(), ref_loss(logits.double(), labels, classes), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-6)
    fn = torch.compile(ltkernels.federated_loss, fullgraph=True)
    torch.testing.assert_close(fn(logits, labels, classes), ltkernels.federated_loss(logits, labels, classes))


@pytest.mark.parametrize("device", devices())
def test_empty_batch(device):
    c = 5
    mod = ltkernels.FederatedLoss(torch.ones(c), num_fed_classes=3).to(device)
    x = torch.randn(0, c, device=device, requires_grad=True)
    loss = mod(x, torch.zeros(0, dtype=torch.long, device=device))
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad.shape == (0, c)


@pytest.mark.parametrize("device", devices())
def test_all_rows_ignored(device):
    c = 5
    logits, _ = make_batch(12, c, device=device, dtype=torch.float32)
    x = logits.clone().requires_grad_()
    labels = torch.full((12,), -1, dtype=torch.long, device=device)
    loss = ltkernels.federated_loss(x, labels, torch.ones(c, dtype=torch.bool, device=device))
    assert loss.item() == 0.0
    loss.backward()
    assert (x.grad == 0).all()


def test_other_ignore_index_and_int32_labels():
    c = 6
    logits, labels = make_batch(60, c)
    classes = torch.tensor([True, True, False, True, False, True])
    other = torch.where(labels == -1, torch.full_like(labels, -100), labels).int()
    a = ltkernels.federated_loss(logits, labels, classes)
    b = ltkernels.federated_loss(logits, other, classes, ignore_index=-100)
    assert_close(a, b)
    assert_close(a, ref_loss(logits, labels, classes))
    drawn = ltkernels.federated_loss_classes(other, torch.ones(c), 4, ignore_index=-100)
    check_class_set(drawn, labels, torch.ones(c), 4)


# ---- bad input ---------------------------------------------------------------------------------------------------

def test_labels_out_of_range_raise():
    c = 4
    logits, labels = make_batch(10, c)
    classes = torch.ones(c, dtype=torch.bool)
    for bad in (c + 1, -2):
        labels[3] = bad
        with pytest.raises(ArgumentValueError, match=f"labels must lie in 0..{c}"):
            ltkernels.federated_loss(logits, labels, classes)
        with pytest.raises(ArgumentValueError, match=f"labels must lie in 0..{c}"):
            ltkernels.federated_loss_classes(labels, torch.ones(c), 3)
        with pytest.raises(ArgumentValueError, match=f"labels must lie in 0..{c}"):
            ltkernels.FederatedLoss(torch.ones(c), 3)(logits, labels)


def test_bad_shapes_and_types_raise():
    c = 4
    logits, labels = make_batch(10, c)
    classes = torch.ones(c, dtype=torch.bool)
    mod = ltkernels.FederatedLoss(torch.ones(c), 3)
    with pytest.raises(ArgumentValueError, match="logits must be 2-D"):
        ltkernels.federated_loss(logits.flatten(), labels, classes)
    with pytest.raises(ArgumentValueError, match="labels must have 10 entries"):
        ltkernels.federated_loss(logits, labels[:9], classes)
    with pytest.raises(ArgumentTypeError, match="labels must be int64 or int32"):
        ltkernels.federated_loss(logits, labels.float(), classes)
    with pytest.raises(ArgumentTypeError, match="logits must have dtype"):
        ltkernels.federated_loss(logits.long(), labels, classes)
    with pytest.raises(ArgumentValueError, match="classes"):
        ltkernels.federated_loss(logits, labels, torch.ones(c + 1, dtype=torch.bool))
    with pytest.raises(ArgumentValueError, match=r"(?=.*\b4\b)(?=.*\b5\b)"):  # names both sizes
        mod(torch.randn(10, c + 1, dtype=torch.float64), labels)
    with pytest.raises(ArgumentValueError, match="normalizer must be > 0"):
        ltkernels.federated_loss(logits, labels, classes, normalizer=0.0)
    with pytest.raises(ArgumentValueError, match="weight"):
        ltkernels.FederatedLoss(torch.ones(c, 2))


# ---- CUDA --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", cuda_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(side, dtype):
    side = CudaSide(side)
    n, c = (37, 11) if side.emulated else (3001, 1203)
    logits, labels = make_batch(n, c, dtype=dtype)
    classes = (torch.rand(c) < 0.3) | present_classes(labels, c)

    def run(s):
        with s:
            x = s.put(logits).requires_grad_()
            loss = ltkernels.federated_loss(x, s.put(labels), s.put(classes))
            (1.7 * loss).backward()
        return loss, x.grad

    tol = {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]
    for a, b in zip(run(CudaSide("cpu")), run(side)):
        torch.testing.assert_close(b.detach().cpu().double(), a.detach().double(), rtol=tol,
                                   atol=tol * max(a.abs().max().item(), 1e-30))
    weight = torch.rand(c) + 0.1
    with side:
        drawn = ltkernels.federated_loss_classes(side.put(labels), side.put(weight), 5)
    check_class_set(drawn, labels, weight, 5)


@pytest.mark.cuda
@pytest.mark.gpu
def test_cuda_draw_and_loss_without_host_sync():
    c = 1203
    mod = ltkernels.FederatedLoss(torch.rand(c) + 0.1).cuda()
    logits, labels = make_batch(500, c, device="cuda", dtype=torch.float32)
    x = logits.clone().requires_grad_()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = mod(x, labels)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    check_class_set(mod.last_classes, labels, mod.weight, 50)
    xr = logits.double().cpu().requires_grad_()
    ref_loss(xr, labels.cpu(), mod.last_classes.cpu()).backward()
    torch.testing.assert_close(x.grad.cpu().double(), xr.grad, rtol=1e-4, atol=1e-7)
