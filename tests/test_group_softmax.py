"""Balanced Group Softmax (docs/spec.md §1): layout, loss (with and without sampling), scores."""
import math
from statistics import NormalDist

import pytest
import torch

from ltkernels import (
    BalancedGroups,
    GroupSoftmaxLoss,
    group_softmax_loss,
    group_softmax_scores,
    group_softmax_selection,
)
from ltkernels.data import lvis_categories_path
from ltkernels.reference.group_softmax import (
    group_softmax_loss_reference,
    group_softmax_scores_reference,
    official_group_softmax_loss,
)
from ltkernels.testing import cuda_emulation as emulation

from conftest import EMULATION, devices

INF = math.inf


def small_groups(num_classes=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    counts = (10 ** (torch.rand(num_classes, generator=g) * 4)).long().tolist()  # 1..10^4: all four groups
    return BalancedGroups.from_instance_counts(counts)


def make_labels(n, groups, device, bg=0.5, ignored=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(1, groups.num_classes + 1, (n,), generator=g)
    u = torch.rand(n, generator=g)
    labels[u < bg] = 0
    labels[u > 1 - ignored] = -1
    return labels.to(device)


def rows_with_grad(grad, groups):
    """[G + 1, N] bool: which rows received a (non-zero) gradient in each group's columns."""
    return torch.stack([grad[:, groups.group_slice(g)].ne(0).any(1) for g in range(groups.num_groups + 1)])


# ---- layout ---------------------------------------------------------------------------------------------------
def test_layout_from_counts():
    counts = [5, 50, 500, 5000, 3, 20, 999, 1000, 10, 9]
    G = BalancedGroups.from_instance_counts(counts)
    assert (G.num_classes, G.num_groups, G.group_sizes) == (10, 4, (3, 3, 2, 2))
    assert G.num_logits == 10 + 4 + 2
    assert G.members(1).tolist() == [1, 5, 10]          # n < 10
    assert G.members(2).tolist() == [2, 6, 9]           # 10 <= n < 100 (bisect_right: 10 goes up)
    assert G.members(3).tolist() == [3, 7]
    assert G.members(4).tolist() == [4, 8]
    assert G.group_slice(0) == slice(0, 2)
    assert G.group_slice(1) == slice(2, 6) and G.group_slice(4) == slice(13, 16)
    assert G.group_offsets.tolist() == [0, 2, 6, 10, 13, 16]
    assert G.label_group.tolist() == [0, 1, 2, 3, 4, 1, 2, 3, 4, 2, 1]
    assert G.label_position.tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    assert G.column_label.tolist() == [0, -1, -1, 1, 5, 10, -1, 2, 6, 9, -1, 3, 7, -1, 4, 8]
    for c in range(1, 11):
        assert G.column_label[G.score_column[c]] == c
    t = G.tables("cpu")
    assert t is G.tables("cpu")  # cached
    assert t["label_targets"][5].tolist() == [1, 2, 0, 0, 0]


def test_layout_drops_empty_groups():
    G = BalancedGroups.from_instance_counts([1, 2, 500, 700])  # nothing in [10, 100) nor >= 1000
    assert G.num_groups == 2 and G.group_sizes == (2, 2) and G.num_logits == 4 + 2 + 2
    assert G.label_group.tolist() == [0, 1, 1, 2, 2]
    with pytest.raises(IndexError, match="0..2"):
        G.group_slice(3)


def test_layout_errors():
    with pytest.raises(ValueError, match="strictly increasing"):
        BalancedGroups.from_instance_counts([1, 2], bounds=(10, 10))
    with pytest.raises(ValueError, match=r"counts\[1\]"):
        BalancedGroups.from_instance_counts([1, -2])
    with pytest.raises(ValueError, match="at least one"):
        BalancedGroups.from_instance_counts([])
    with pytest.raises(ValueError, match="1..2"):
        BalancedGroups.from_lvis([{"id": 1, "instance_count": 3}, {"id": 3, "instance_count": 4}])
    with pytest.raises(ValueError, match="instance_count"):
        BalancedGroups.from_lvis([{"id": 1}])


@pytest.mark.parametrize("version,sizes", [("v0.5", (294, 453, 302, 181)), ("v1", (200, 412, 334, 257))])
def test_lvis_groups(version, sizes):
    path = lvis_categories_path(version)
    G = BalancedGroups.from_lvis(path)
    assert G.group_sizes == sizes
    assert G.num_classes == sum(sizes) and G.num_logits == sum(sizes) + 4 + 2
    import json
    cats = json.loads(path.read_text())["categories"]
    assert BalancedGroups.from_lvis(cats) == G == BalancedGroups.from_lvis(str(path))
    assert BalancedGroups.from_lvis(version) == G  # the bundled statistics by version name
    counts = {c["id"]: c["instance_count"] for c in cats}
    assert all(counts[int(c)] < 10 for c in G.members(1))
    assert all(counts[int(c)] >= 1000 for c in G.members(4))
    if version == "v0.5":
        assert G.num_logits == 1236


# ---- loss without sampling: exact against the float64 reference ---------------------------------------------
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5), (torch.float16, 3e-3),
                                       (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("ratio", [INF, 1e9])
def test_loss_matches_reference_without_sampling(device, dtype, tol, ratio):
    G = small_groups()
    N = 157
    labels = make_labels(N, G, device)
    x64 = (torch.randn(N, G.num_logits, dtype=torch.float64) * 3).to(device)
    x = x64.to(dtype).requires_grad_()
    loss = group_softmax_loss(x, labels, G, others_ratio=ratio)
    loss.backward()
    assert loss.dtype == dtype and loss.shape == ()
    sel = group_softmax_selection(labels, G, INF)
    ref_x = x.detach().to(torch.float64).requires_grad_()  # the rounded inputs
    ref = group_softmax_loss_reference(ref_x, labels, G, sel)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=tol, atol=tol / 10)
    # no sampling: every non-ignored row takes part in every group that has a positive
    valid = labels != -1
    got = rows_with_grad(x.grad.float(), G)
    assert torch.equal(got[0], valid)


def test_official_port_matches_reference():
    G = small_groups()
    labels = make_labels(120, G, "cpu")
    x = torch.randn(120, G.num_logits, dtype=torch.float64)
    sel = group_softmax_selection(labels, G, 1.5, torch.Generator().manual_seed(5))
    torch.testing.assert_close(official_group_softmax_loss(x, labels, G, selected=sel),
                               group_softmax_loss_reference(x, labels, G, sel))
    # and its own np.random draw gives a loss of the same kind (finite, every group with positives)
    assert torch.isfinite(official_group_softmax_loss(x, labels, G, others_ratio=1.5))


# ---- loss with sampling -------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("ratio", [0.0, 0.5, 2.0, 8.0])
def test_sampling_selection(device, ratio):
    G = small_groups()
    N = 300
    labels = make_labels(N, G, device, bg=0.7, ignored=0.1)
    x = torch.randn(N, G.num_logits, device=device, dtype=torch.float64, requires_grad=True)
    gen = torch.Generator(device=device).manual_seed(11)
    loss = group_softmax_loss(x, labels, G, others_ratio=ratio, generator=gen)
    loss.backward()
    got = rows_with_grad(x.grad, G).cpu()
    lab = labels.cpu()
    valid = lab != -1
    assert torch.equal(got[0], valid)
    for g in range(1, G.num_groups + 1):
        pos = valid & (G.label_group[lab.clamp(min=0)] == g)
        n_pos, n_elig = int(pos.sum()), int((valid & ~pos).sum())
        k = min(math.floor(n_pos * ratio), n_elig) if n_pos else 0
        assert torch.equal(got[g] & pos, pos)                     # every positive
        assert int((got[g] & ~pos).sum()) == k                    # exactly k others
        assert not (got[g] & ~valid).any()                        # never an ignored row
    # the same generator state draws the same selection, and the loss is the reference's on it
    sel = group_softmax_selection(labels, G, ratio, torch.Generator(device=device).manual_seed(11))
    assert torch.equal(sel.cpu(), got)
    ref_x = x.detach().clone().requires_grad_()
    ref = group_softmax_loss_reference(ref_x, labels, G, sel)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-10, atol=1e-12)
    off = official_group_softmax_loss(x.detach(), labels, G, selected=sel)
    torch.testing.assert_close(loss.detach(), off, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", devices())
def test_sampling_differs_between_calls_and_generator_reproduces(device):
    G = small_groups()
    labels = make_labels(400, G, device, bg=0.8, ignored=0.05)
    draws = [group_softmax_selection(labels, G, 1.0) for _ in range(3)]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    x = torch.randn(400, G.num_logits, device=device)
    a = group_softmax_loss(x, labels, G, 1.0, generator=torch.Generator(device=device).manual_seed(3))
    b = group_softmax_loss(x, labels, G, 1.0, generator=torch.Generator(device=device).manual_seed(3))
    c = group_softmax_loss(x, labels, G, 1.0, generator=torch.Generator(device=device).manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("device", devices())
def test_sampling_is_uniform(device):
    """Every eligible row is drawn with probability k / n_eligible.

    N = 40 rows: group A has 3 positives, 3 rows are ignored, so 34 rows are eligible and others_ratio = 2 draws
    k = 6 of them per call; T = 1000 calls. For draws without replacement the per-row counts O_i have
    Var = T p (1 - p) (p = k / n) and covariance -Var / (n - 1), so X = (n - 1) / n * sum (O_i - E)^2 / (T p (1 - p))
    is chi-square with n - 1 = 33 degrees of freedom (T large). The threshold is its 1 - 1e-6 quantile
    (Wilson-Hilferty), i.e. a false-failure rate of about 1e-6 per group checked (two groups are checked); the
    generator is seeded, so the test is deterministic anyway.
    """
    counts = [5] * 4 + [50] * 4 + [500] * 4 + [5000] * 4
    G = BalancedGroups.from_instance_counts(counts)
    labels = torch.zeros(40, dtype=torch.int64)
    labels[:3] = torch.tensor([1, 2, 3])       # group 1: 3 positives
    labels[3:6] = -1                           # ignored
    labels[6:9] = torch.tensor([13, 14, 16])   # group 4: 3 positives
    labels = labels.to(device)
    T = 1000
    gen = torch.Generator(device=device).manual_seed(1234)
    total = torch.zeros(G.num_groups + 1, 40, dtype=torch.float64)
    for _ in range(T):
        total += group_softmax_selection(labels, G, 2.0, gen).cpu().double()
    df = 33
    z = NormalDist().inv_cdf(1 - 1e-6)
    threshold = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    for g, pos in ((1, range(0, 3)), (4, range(6, 9))):
        assert torch.all(total[g, list(pos)] == T) and torch.all(total[g, 3:6] == 0)
        elig = [i for i in range(40) if i not in pos and not 3 <= i < 6]
        assert len(elig) == 34
        O = total[g, elig]
        assert O.sum() == T * 6
        p = 6 / 34
        X = float(((O - T * p) ** 2).sum() / (T * p * (1 - p))) * (len(elig) - 1) / len(elig)
        assert X < threshold, (g, X, threshold)
    assert torch.all(total[2:4] == 0)  # groups 2 and 3 have no positive: nothing drawn


# ---- edge cases -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
def test_group_without_positives_contributes_nothing(device):
    G = small_groups()
    g1 = G.members(1)
    labels = torch.cat([torch.zeros(20, dtype=torch.int64), g1[:3]]).to(device)  # only bg and group 1
    x = torch.randn(23, G.num_logits, device=device, dtype=torch.float64, requires_grad=True)
    loss = group_softmax_loss(x, labels, G, 2.0)
    loss.backward()
    for g in range(2, G.num_groups + 1):
        assert torch.all(x.grad[:, G.group_slice(g)] == 0)
    sel = group_softmax_selection(labels, G, INF)
    sel[1] = rows_with_grad(x.grad, G)[1]
    torch.testing.assert_close(loss, group_softmax_loss_reference(x.detach(), labels, G, sel))


@pytest.mark.parametrize("device", devices())
def test_all_ignored_single_row_and_empty(device):
    G = small_groups()
    x = torch.randn(5, G.num_logits, device=device, requires_grad=True)
    loss = group_softmax_loss(x, torch.full((5,), -1, device=device), G)
    loss.backward()
    assert loss.item() == 0 and torch.all(x.grad == 0)
    # a single positive row: no other row to draw, group 0 and its group each a plain cross-entropy
    x1 = torch.randn(1, G.num_logits, device=device, dtype=torch.float64, requires_grad=True)
    lab = G.members(2)[:1].to(device)
    loss = group_softmax_loss(x1, lab, G)
    loss.backward()
    s0, s2 = G.group_slice(0), G.group_slice(2)
    want = -torch.log_softmax(x1[0, s0], 0)[1] - torch.log_softmax(x1[0, s2], 0)[1]
    torch.testing.assert_close(loss, want)
    assert rows_with_grad(x1.grad, G)[:, 0].tolist() == [True, False, True, False, False]
    # N = 0
    x0 = torch.randn(0, G.num_logits, device=device, requires_grad=True)
    loss = group_softmax_loss(x0, torch.zeros(0, dtype=torch.int64, device=device), G)
    loss.backward()
    assert loss.item() == 0 and x0.grad.shape == (0, G.num_logits)
    assert group_softmax_scores(x0.detach(), G).shape == (0, G.num_classes + 1)


def test_bad_inputs():
    G = small_groups()
    x = torch.randn(4, G.num_logits)
    with pytest.raises(ValueError, match=f"labels must lie in 0..{G.num_classes}.*found {G.num_classes + 1}"):
        group_softmax_loss(x, torch.tensor([0, 1, G.num_classes + 1, -1]), G)
    with pytest.raises(ValueError, match="found -2"):
        group_softmax_loss(x, torch.tensor([0, 1, -2, -1]), G)
    with pytest.raises(ValueError, match=f"logits has 30 columns but the group layout has {G.num_logits} logits"):
        group_softmax_loss(torch.randn(4, 30), torch.zeros(4, dtype=torch.int64), G)
    with pytest.raises(ValueError, match=f"logits has 30 columns .* {G.num_logits}"):
        group_softmax_scores(torch.randn(4, 30), G)
    with pytest.raises(ValueError, match="labels has 3 rows but logits has 4"):
        group_softmax_loss(x, torch.zeros(3, dtype=torch.int64), G)
    with pytest.raises(TypeError, match="labels must be int64 or int32"):
        group_softmax_loss(x, torch.zeros(4), G)
    with pytest.raises(TypeError, match="logits must have dtype"):
        group_softmax_loss(x.long(), torch.zeros(4, dtype=torch.int64), G)
    with pytest.raises(ValueError, match="others_ratio must be >= 0"):
        group_softmax_loss(x, torch.zeros(4, dtype=torch.int64), G, others_ratio=-1.0)
    with pytest.raises(TypeError, match="groups must be a ltkernels.BalancedGroups"):
        group_softmax_loss(x, torch.zeros(4, dtype=torch.int64), [1, 2])
    with pytest.raises(ValueError, match="exactly one of instance_counts and groups"):
        GroupSoftmaxLoss()


def test_module_and_int32_labels():
    counts = [5, 50, 500, 5000, 3, 20]
    m = GroupSoftmaxLoss(counts, others_ratio=2.0)
    assert m.groups == BalancedGroups.from_instance_counts(counts) and "others_ratio=2.0" in repr(m)
    labels = torch.tensor([0, 1, 2, 0, 0, 4, -1, 6, 0, 0], dtype=torch.int32)
    x = torch.randn(10, m.groups.num_logits)
    a = m(x, labels, generator=torch.Generator().manual_seed(0))
    b = group_softmax_loss(x, labels.long(), m.groups, 2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    m2 = GroupSoftmaxLoss(groups=m.groups, ignore_index=-100)
    labels[6] = -100
    torch.testing.assert_close(m2(x, labels), group_softmax_loss(x, labels.long(), m.groups, 8.0,
                                                                 ignore_index=-100))


def test_backward_scaling_and_retain_graph():
    G = small_groups()
    labels = make_labels(50, G, "cpu")
    x = torch.randn(50, G.num_logits, dtype=torch.float64, requires_grad=True)
    loss = group_softmax_loss(x, labels, G, INF)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g3,) = torch.autograd.grad(loss * 3, x, retain_graph=True)
    torch.testing.assert_close(g3, 3 * g1)
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * g1)


def test_noncontiguous_logits():
    G = small_groups()
    labels = make_labels(40, G, "cpu")
    big = torch.randn(G.num_logits, 40, dtype=torch.float64)
    x = big.t()
    assert not x.is_contiguous()
    torch.testing.assert_close(group_softmax_loss(x, labels, G, INF),
                               group_softmax_loss(x.contiguous(), labels, G, INF))
    torch.testing.assert_close(group_softmax_scores(x, G), group_softmax_scores_reference(x, G))


@pytest.mark.parametrize("device", devices())
def test_gradcheck(device):
    G = BalancedGroups.from_instance_counts([5, 50, 500, 5000, 3, 20, 7])
    labels = torch.tensor([0, 1, 2, 0, 4, -1, 6, 7, 0, 3], device=device)
    x = torch.randn(10, G.num_logits, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: group_softmax_loss(t, labels, G, INF), (x,))
    # with sampling: the same draw every call
    assert torch.autograd.gradcheck(
        lambda t: group_softmax_loss(t, labels, G, 1.0, generator=torch.Generator(device=device).manual_seed(2)),
        (x,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda t: group_softmax_scores(t, G), (x,), fast_mode=True)


# ---- scores ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.float16, 2e-3),
                                       (torch.bfloat16, 1e-2)])
def test_scores_match_reference(device, dtype, tol):
    G = small_groups()
    x = (torch.randn(77, G.num_logits, dtype=torch.float64) * 4).to(device=device, dtype=dtype)
    out = group_softmax_scores(x, G)
    ref = group_softmax_scores_reference(x.double(), G)
    assert out.shape == (77, G.num_classes + 1) and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    # what is dropped: the `others` mass of every group, times P(fg)
    p0 = torch.softmax(x.double()[:, :2], 1)
    others = sum(torch.softmax(x.double()[:, G.group_slice(g)], 1)[:, 0] for g in range(1, G.num_groups + 1))
    want = p0[:, 0] + p0[:, 1] * (G.num_groups - others)
    torch.testing.assert_close(out.double().sum(1), want, rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_masked_logits_in_a_wide_group(device, dtype, tol):
    """-inf logits (masked classes) anywhere in a group wider than a CUDA block, its first columns included, give
    exp(-inf) = 0 as in the reference: finite loss, gradient and scores; a NaN logit makes its row's loss NaN."""
    G = BalancedGroups.from_instance_counts([50] * 300 + [5] * 6 + [5000] * 6)
    wide = next(g for g in range(1, G.num_groups + 1) if G.members(g).numel() == 300)
    cols = G.group_slice(wide)
    N = 64
    g = torch.Generator().manual_seed(5)
    labels = G.members(wide)[250 + torch.randint(0, 40, (N,), generator=g)]  # classes far from the masked ones
    labels[::4] = torch.randint(301, 313, (N // 4,), generator=g)
    labels[1::8] = 0
    labels = labels.to(device)
    x64 = torch.randn(N, G.num_logits, dtype=torch.float64, generator=g) * 3
    x64[:, cols.start + 1: cols.start + 41] = -INF  # the group's first classes
    x64[:, cols.start + 200] = -INF
    x = x64.to(device=device, dtype=dtype).requires_grad_()
    loss = group_softmax_loss(x, labels, G, others_ratio=INF)
    loss.backward()
    ref_x = x.detach().double().requires_grad_()
    ref = group_softmax_loss_reference(ref_x, labels, G, group_softmax_selection(labels, G, INF))
    ref.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=tol, atol=tol / 10)
    scores = group_softmax_scores(x.detach(), G)
    torch.testing.assert_close(scores.double(), group_softmax_scores_reference(x.detach().double(), G),
                               rtol=tol, atol=tol)
    assert bool((scores[:, 1:41] == 0).all())  # classes 1..40 are the wide group's first members
    x_nan = x.detach().clone()
    x_nan[3, cols.start + 7] = float("nan")
    assert torch.isnan(group_softmax_loss(x_nan, labels, G, others_ratio=INF))
    assert torch.isnan(group_softmax_scores(x_nan, G)[3]).any()


# ---- torch.compile, opcheck, CPU vs CUDA ----------------------------------------------------------------------
def test_opcheck():
    G = small_groups()
    labels = make_labels(30, G, "cpu")
    t = G.tables("cpu")
    from ltkernels.ops.group_softmax import _row_groups, _select
    lab, valid, counts, positive = _row_groups(labels, t, -1)
    selected, scale = _select(valid, counts, positive, 2.0, None)
    x = torch.randn(30, G.num_logits, requires_grad=True)
    torch.library.opcheck(torch.ops.ltkernels.group_softmax_loss,
                          (x, lab, selected, scale.float(), t["label_targets"], t["group_offsets"]))
    torch.library.opcheck(torch.ops.ltkernels.group_softmax_scores,
                          (x, t["group_offsets"], t["label_group"], t["score_column"]))


def test_torch_compile_inductor():
    """Inductor (the default backend) on the whole loss + scores step, sampling included."""
    torch._dynamo.reset()
    G = BalancedGroups.from_instance_counts([5, 50, 500, 5000, 3, 20, 7])
    labels = torch.tensor([0, 1, 2, 0, 4, -1, 6, 7, 0, 3, 0, 0])
    x = torch.randn(12, G.num_logits, requires_grad=True)
    step = torch.compile(lambda x, l: (group_softmax_loss(x, l, G, 1.0), group_softmax_scores(x.detach(), G)),
                         fullgraph=True)
    loss, scores = step(x, labels)
    loss.backward()
    got = rows_with_grad(x.grad, G)
    ref_x = x.detach().double().requires_grad_()
    ref = group_softmax_loss_reference(ref_x, labels, G, got)  # the loss on the selection it made
    ref.backward()
    torch.testing.assert_close(loss, ref.float())
    torch.testing.assert_close(x.grad, ref_x.grad.float())
    assert got.sum(1).tolist() == [11, 4, 4, 2, 2]  # groups 1, 2: 2 positives + 2 others; 3, 4: 1 + 1
    torch.testing.assert_close(scores, group_softmax_scores_reference(x.detach(), G))


def test_cpu_vs_cuda(cuda_side):
    G = small_groups()
    labels = make_labels(333, G, "cpu")
    dev = cuda_side.device
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
        x = torch.randn(333, G.num_logits, dtype=dtype) * 3
        xc = x.clone().requires_grad_()
        lc = group_softmax_loss(xc, labels, G, INF)
        lc.backward()
        sc = group_softmax_scores(x, G)
        with cuda_side:
            xg = cuda_side.put(x).requires_grad_()
            lg = group_softmax_loss(xg, cuda_side.put(labels), G, INF)
            lg.backward()
            sg = group_softmax_scores(cuda_side.put(x), G)
        torch.testing.assert_close(lg.cpu().float(), lc.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(xg.grad.cpu().float(), xc.grad.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(sg.cpu().float(), sc.float(), rtol=tol, atol=tol)
    # a sampled CUDA loss equals the CPU kernel on the same (device-drawn) selection
    x = torch.randn(333, G.num_logits, dtype=torch.float64)
    with cuda_side:
        sel = group_softmax_selection(cuda_side.put(labels), G, 2.0, torch.Generator(device=dev).manual_seed(9))
        lg = group_softmax_loss(cuda_side.put(x), cuda_side.put(labels), G, 2.0,
                                generator=torch.Generator(device=dev).manual_seed(9))
    torch.testing.assert_close(lg.cpu(), group_softmax_loss_reference(x, labels, G, sel.cpu()))


@pytest.mark.cuda
@pytest.mark.parametrize("sms", [2, 132])
def test_cuda_bitwise_identical_in_every_order(sms):
    """One block per row, a fixed reduction tree: loss, gradient and scores bit-identical in every order."""
    if not EMULATION:
        pytest.skip("this build has no CUDA emulation")
    G = small_groups()
    labels = make_labels(64, G, "cpu")
    x = torch.randn(64, G.num_logits) * 3
    results = []
    for order in emulation.ORDERS:
        with emulation.cuda_emulation(order=order, seed=3, sms=sms):
            xg = x.clone().requires_grad_()
            loss = group_softmax_loss(xg, labels, G, INF)
            loss.backward()
            results.append((loss, xg.grad, group_softmax_scores(x, G)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.gpu
def test_no_host_sync_cuda():
    """Sampling, counts, normalisers, the kernel, backward and the score merge never synchronise with the host."""
    G = small_groups()
    labels = make_labels(500, G, "cuda")
    x = torch.randn(500, G.num_logits, device="cuda", requires_grad=True)
    G.tables("cuda")  # the layout's one-time copy to the device
    gen = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = group_softmax_loss(x, labels, G, 2.0, generator=gen)
        loss.backward()
        scores = group_softmax_scores(x.detach(), G)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item() and scores.shape == (500, G.num_classes + 1)
