"""TorchScript and torch.fx: the public RoIAlign / NMS functions and modules, the losses and the BAGS scores script,
survive save/load, give the eager results (and statistics) and keep their error messages; torch.fx treats the ops as
leaves."""
import pytest
import torch

import ltkernels

FUNCTIONS = [ltkernels.roi_align, ltkernels.nms, ltkernels.batched_nms, ltkernels.multiclass_nms]


def _boxes(n=30):
    b = torch.rand(n, 4) * 40
    b[:, 2:] += b[:, :2] + 1
    return b


@pytest.fixture(scope="module")
def scripted():
    return {f.__name__: torch.jit.script(f) for f in FUNCTIONS}


def test_functions_match_eager(scripted):
    x = torch.rand(2, 3, 12, 12)
    rois = torch.cat([torch.randint(0, 2, (6, 1)).float(), _boxes(6) * 0.25], 1)
    for args in ((x, rois, 3), (x, rois, [2, 3], 0.5, 2, True), (x, [rois[:3, 1:], rois[3:, 1:]], 2)):
        torch.testing.assert_close(scripted["roi_align"](*args), ltkernels.roi_align(*args))
    boxes, scores = _boxes(), torch.rand(30)
    assert torch.equal(scripted["nms"](boxes, scores, 0.3), ltkernels.nms(boxes, scores, 0.3))
    idxs = torch.randint(0, 4, (30,))
    assert torch.equal(scripted["batched_nms"](boxes, scores, idxs, 0.3),
                       ltkernels.batched_nms(boxes, scores, idxs, 0.3))
    cls_scores = torch.rand(30, 5)
    for got, want in zip(scripted["multiclass_nms"](boxes, cls_scores, 0.05, 0.5, 10, "background_last"),
                         ltkernels.multiclass_nms(boxes, cls_scores, 0.05, 0.5, 10, "background_last")):
        assert torch.equal(got, want)


def test_scripted_errors_keep_their_messages(scripted):
    x = torch.rand(2, 3, 12, 12)
    cases = [
        (lambda: scripted["roi_align"](x, torch.zeros(3, 4), 2), r"boxes must have shape \[K, 5\]"),
        (lambda: scripted["roi_align"](x[0], torch.zeros(3, 5), 2), "input must be 4-D"),
        (lambda: scripted["roi_align"](x, torch.tensor([[0.5, 0, 0, 4, 4]]), 2), "batch index"),
        (lambda: scripted["roi_align"](x, torch.tensor([[0.0, -1e10, -1e10, 1e10, 1e10]]), 2),
         "adaptive sampling grid"),
        (lambda: scripted["nms"](_boxes()[:, :3], torch.rand(30), 0.5), "boxes must have size 4"),
        (lambda: scripted["nms"](_boxes(), torch.rand(30).double(), 0.5), r"dtype of boxes \(float32\)"),
        (lambda: scripted["batched_nms"](_boxes(), torch.rand(30), torch.zeros(29, dtype=torch.long), 0.5),
         "idxs must have one entry per box"),
        (lambda: scripted["multiclass_nms"](_boxes(), torch.rand(30, 2), 0.1, 0.5, 0), "max_per_image"),
        (lambda: scripted["multiclass_nms"](_boxes(), torch.rand(30, 2), 0.1, 0.5, 5, "mmdet"), "label_layout"),
    ]
    for call, message in cases:
        with pytest.raises(Exception, match=message):
            call()


def test_modules_script_and_save(tmp_path):
    x = torch.rand(2, 3, 16, 16)
    feats = [torch.rand(2, 3, 16, 16), torch.rand(2, 3, 8, 8)]
    boxes = [_boxes(5), _boxes(4)]
    modules = [
        (ltkernels.RoIAlign((2, 3), 0.25, 2), (x, boxes)),
        (ltkernels.MultiLevelRoIAlign(2, strides=(4, 8)), (feats, boxes)),
        (ltkernels.MultiLevelRoIAlign(2, strides=None), (feats, boxes, [64, 64])),
        (ltkernels.MultiScaleRoIAlign(["a", "b"], 2, 2), ({"a": feats[0], "b": feats[1]}, boxes, [(64, 64)] * 2)),
    ]
    for i, (module, args) in enumerate(modules):
        path = tmp_path / f"m{i}.pt"
        torch.jit.script(module).save(str(path))
        torch.testing.assert_close(torch.jit.load(str(path))(*args), module(*args))


def test_fx_symbolic_trace_keeps_the_ops_as_leaves():
    feats = {"a": torch.rand(1, 2, 16, 16), "b": torch.rand(1, 2, 8, 8)}
    boxes = [_boxes(5)]
    for module, args in ((ltkernels.RoIAlign(2, 0.25, 2), (feats["a"], boxes)),
                         (ltkernels.MultiScaleRoIAlign(["a", "b"], 2, 2), (feats, boxes, [(64, 64)])),
                         (ltkernels.MultiLevelRoIAlign(2, strides=(4, 8)), ([feats["a"], feats["b"]], boxes))):
        gm = torch.fx.symbolic_trace(module)
        calls = [n for n in gm.graph.nodes if n.op == "call_function"]
        assert len(calls) == 1 and calls[0].target.__module__.startswith("ltkernels")
        torch.testing.assert_close(gm(*args), module(*args))

    class Detector(torch.nn.Module):
        def forward(self, boxes, scores, idxs):
            keep = ltkernels.batched_nms(boxes, scores, idxs, 0.5)
            return ltkernels.nms(boxes[keep], scores[keep], 0.3)

    gm = torch.fx.symbolic_trace(Detector())
    boxes, scores, idxs = _boxes(), torch.rand(30), torch.randint(0, 3, (30,))
    assert torch.equal(gm(boxes, scores, idxs), Detector()(boxes, scores, idxs))

    class Head(torch.nn.Module):  # calls from another module are leaves too (not only those of our modules)
        def forward(self, x, rois, boxes):
            return ltkernels.roi_align(x, rois, 2) + ltkernels.roi_align(x, [boxes], 2)

    gm = torch.fx.symbolic_trace(Head())
    x, b = feats["a"], _boxes(5)
    rois = torch.cat([torch.zeros(5, 1), b], 1)
    assert sum(getattr(n.target, "__name__", "") == "roi_align" for n in gm.graph.nodes) == 2
    torch.testing.assert_close(gm(x, rois, b), Head()(x, rois, b))


# ---- the losses, the BAGS scores and batched multi-class NMS ------------------------------------------------------
COUNTS = [1, 20, 200, 2000, 5, 50, 3000]  # 7 classes in 4 groups: 13 logits


def _same(a, b):
    assert type(a) is type(b) or (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)))
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        _same(list(a.values()), list(b.values()))
    else:
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)


def _steps(eager, scripted, make_inputs, call, steps=3):
    """The same inputs through both modules for a few steps: equal losses, gradients and buffers after each."""
    for step in range(steps):
        args = make_inputs(step)
        grads = []
        for module in (eager, scripted):
            x = args[0].clone().requires_grad_(True)
            loss = call(module, x, *args[1:])
            (0.5 * loss).backward()  # an upstream loss weight reaches the statistics
            grads.append((loss.detach(), x.grad))
        _same(grads[0], grads[1])
        for (name, a), (_, b) in zip(eager.named_buffers(), scripted.named_buffers()):
            assert torch.equal(a, b), (step, name)


def test_efl_module_scripts_with_its_statistics(tmp_path):
    import copy

    eager = ltkernels.EqualizedFocalLoss(6, label_layout="background_first")
    scripted = torch.jit.script(copy.deepcopy(eager))  # scripting shares the buffers: script a copy

    def inputs(step):
        return torch.randn(40, 6), torch.randint(-1, 7, (40,)), [None, 3.0, torch.tensor(2.5)][step]

    _steps(eager, scripted, inputs, lambda m, x, y, norm: m(x, y, norm))
    assert not torch.equal(eager.pos_neg, torch.ones(6))  # the statistics did move
    # state_dict round trip both ways, and a saved scripted module resumes with its buffers
    fresh = ltkernels.EqualizedFocalLoss(6)
    fresh.load_state_dict(scripted.state_dict())
    _same(dict(fresh.state_dict()), dict(eager.state_dict()))
    path = tmp_path / "efl.pt"
    scripted.save(str(path))
    loaded = torch.jit.load(str(path))
    _same(dict(loaded.state_dict()), dict(eager.state_dict()))
    _steps(eager, loaded, inputs, lambda m, x, y, norm: m(x, y, norm), steps=1)
    with pytest.raises(Exception, match="the loss was built for num_classes=6"):
        scripted(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(Exception, match=r"labels must lie in 0..6"):
        scripted(torch.randn(4, 6), torch.full((4,), 9))
    with pytest.raises(Exception, match="normalizer must be > 0"):
        scripted(torch.randn(4, 6), torch.zeros(4, dtype=torch.long), 0.0)


def test_group_softmax_module_scripts(tmp_path):
    import copy

    for layout in ("background_first", "background_last"):
        eager = ltkernels.GroupSoftmaxLoss(COUNTS, others_ratio=2.0, label_layout=layout)
        scripted = torch.jit.script(copy.deepcopy(eager))

        def call(module, x, y, seed):
            # the draw of the `others` rows: the same generator state gives the same draw, scripted or not
            return module(x, y, torch.Generator().manual_seed(seed))

        def inputs(step):
            return torch.randn(50, 13), torch.randint(-1, 8, (50,)), 10 + step

        _steps(eager, scripted, inputs, call)
        assert dict(scripted.state_dict()) == {} == dict(eager.state_dict())  # the tables follow from the layout
        assert copy.deepcopy(eager).to("meta").label_targets.device.type == "meta"  # they follow .to() though
        path = tmp_path / f"bags-{layout}.pt"
        scripted.save(str(path))
        loaded = torch.jit.load(str(path))
        _steps(eager, loaded, inputs, call, steps=1)
    with pytest.raises(Exception, match=r"logits has 12 columns but the group layout has 13 logits"):
        scripted(torch.randn(4, 12), torch.zeros(4, dtype=torch.long))
    with pytest.raises(Exception, match="labels must lie in 0..7"):
        scripted(torch.randn(4, 13), torch.full((4,), 9))


def test_group_softmax_functions_script():
    groups = ltkernels.BalancedGroups.from_instance_counts(COUNTS)
    loss = torch.jit.script(ltkernels.group_softmax_loss)
    scores = torch.jit.script(ltkernels.group_softmax_scores)
    selection = torch.jit.script(ltkernels.group_softmax_selection)
    x, y = torch.randn(30, 13), torch.randint(-1, 8, (30,))
    for ratio in (1.0, 8.0, float("inf")):
        got = loss(x, y, groups, ratio, torch.Generator().manual_seed(1))  # a BalancedGroups passes as GroupTables
        want = ltkernels.group_softmax_loss(x, y, groups, ratio, torch.Generator().manual_seed(1))
        assert torch.equal(got, want)
        assert torch.equal(selection(y, groups, ratio, torch.Generator().manual_seed(2)),
                           ltkernels.group_softmax_selection(y, groups, ratio, torch.Generator().manual_seed(2)))
    for layout in ("background_first", "background_last"):
        assert torch.equal(scores(x, groups, layout), ltkernels.group_softmax_scores(x, groups, layout))
    with pytest.raises(Exception, match="label_layout must be"):
        scores(x, groups, "mmdet")

    class Head(torch.nn.Module):  # a module that keeps the layout and calls the functions
        def __init__(self):
            super().__init__()
            self.layout = groups.script_tables()

        def forward(self, x, y):
            return ltkernels.group_softmax_scores(x, self.layout), ltkernels.group_softmax_loss(x, y, self.layout)

    head = torch.jit.script(Head())
    got = head(x, y)
    assert torch.equal(got[0], ltkernels.group_softmax_scores(x, groups))
    assert torch.equal(got[1], ltkernels.group_softmax_loss(x, y, groups, 8.0))  # ratio 8 >= N: no draw


def test_efl_function_scripts():
    f = torch.jit.script(ltkernels.equalized_focal_loss)
    x, y = torch.randn(30, 5), torch.randint(-1, 6, (30,))
    pos_neg = torch.rand(5)
    for args in ((x, y), (x, y, pos_neg, 2.0), (x, y, pos_neg, torch.tensor([4.0]), 1.5, 4.0, -1.0)):
        assert torch.equal(f(*args), ltkernels.equalized_focal_loss(*args))
    with pytest.raises(Exception, match=r"alpha must lie in \[0, 1\]"):
        f(x, y, None, None, 2.0, 8.0, 1.5)
    with pytest.raises(Exception, match="pass both pos_grad and neg_grad"):
        f(x, y, pos_neg, None, 2.0, 8.0, 0.25, -1, torch.zeros(5))


def test_eqfl_module_and_function_script(tmp_path):
    import copy

    eager = ltkernels.EqualizedQualityFocalLoss(6)
    scripted = torch.jit.script(copy.deepcopy(eager))

    def inputs(step):
        return torch.randn(40, 6), torch.randint(-1, 7, (40,)), torch.rand(40), [None, 3.0, torch.tensor(2.5)][step]

    _steps(eager, scripted, inputs, lambda m, x, y, q, norm: m(x, y, q, norm))
    assert not torch.equal(eager.pos_neg, torch.ones(6))
    path = tmp_path / "eqfl.pt"
    scripted.save(str(path))
    _same(dict(torch.jit.load(str(path)).state_dict()), dict(eager.state_dict()))
    f = torch.jit.script(ltkernels.equalized_quality_focal_loss)
    x, y, q = torch.randn(30, 5), torch.randint(-1, 6, (30,)), torch.rand(30)
    for args in ((x, y, q), (x, y, q, torch.rand(5), 2.0)):
        assert torch.equal(f(*args), ltkernels.equalized_quality_focal_loss(*args))
    with pytest.raises(Exception, match=r"quality of the positive rows must lie in \[0, 1\]"):
        f(x, torch.ones(30, dtype=torch.long), q + 2)
    with pytest.raises(Exception, match="quality must have 30 entries"):
        f(x, y, q[:3])


def test_batched_multiclass_nms_scripts():
    f = torch.jit.script(ltkernels.batched_multiclass_nms)
    f_concat = torch.jit.script(ltkernels.batched_multiclass_nms_concat)
    boxes, scores = [_boxes(20), _boxes(0), _boxes(15)], [torch.rand(20, 4), torch.rand(0, 4), torch.rand(15, 4)]
    _same(f(boxes, scores, None, None, 0.05, 0.5, 10), ltkernels.batched_multiclass_nms(boxes, scores, None, None,
                                                                                         0.05, 0.5, 10))
    index = torch.tensor([2] * 15 + [0] * 20)
    cat_b, cat_s = torch.cat(boxes[::-1]), torch.cat(scores[::-1])
    _same(f(cat_b, cat_s, index, 3), ltkernels.batched_multiclass_nms(cat_b, cat_s, index, 3))
    _same(f_concat(cat_b, cat_s, index, 3, label_layout="background_last"),
          ltkernels.batched_multiclass_nms(cat_b, cat_s, index, 3, concat=True, label_layout="background_last"))
    _same(f_concat(cat_b, cat_s, index, 3), ltkernels.batched_multiclass_nms_concat(cat_b, cat_s, index, 3))
    with pytest.raises(Exception, match="call batched_multiclass_nms_concat"):
        f(cat_b, cat_s, index, 3, concat=True)
    with pytest.raises(Exception, match="one entry per image"):
        f(boxes, scores[:2])
    with pytest.raises(Exception, match="num_images must lie in"):
        f(cat_b, cat_s, index, 10 ** 12)


def test_scripted_losses_on_the_cuda_kernels(cuda_side):
    """The scripted modules on the CUDA side (a GPU, or the emulated CUDA kernels) match eager on the CPU."""
    import copy

    efl = ltkernels.EqualizedFocalLoss(6)
    bags = ltkernels.GroupSoftmaxLoss(COUNTS, others_ratio=float("inf"))  # no draw: the CPU and CUDA sides agree
    scripted = [torch.jit.script(cuda_side.put(copy.deepcopy(m))) for m in (efl, bags)]
    for step in range(2):
        for eager, module, width in ((efl, scripted[0], 6), (bags, scripted[1], 13)):
            x, y = torch.randn(40, width, dtype=torch.float64), torch.randint(-1, 7, (40,))
            xs = cuda_side.put(x).requires_grad_(True)
            x.requires_grad_(True)
            want = eager(x, y)
            want.backward()
            with cuda_side:
                got = module(xs, cuda_side.put(y))
                got.backward()
            torch.testing.assert_close(got.cpu(), want)
            torch.testing.assert_close(xs.grad.cpu(), x.grad)
    for (name, a), (_, b) in zip(efl.named_buffers(), scripted[0].named_buffers()):
        torch.testing.assert_close(b.cpu(), a, msg=name)


@pytest.mark.parametrize("name", ["seesaw_loss", "seesaw_scores", "eqlv2_loss", "eqlv2_scores", "federated_loss",
                                  "federated_loss_classes"])
def test_other_lvis_loss_functions_script(name):
    """Scripted, each gives the eager result (the class draw: the same set from the same generator state)."""
    fn = getattr(ltkernels, name)
    scripted = torch.jit.script(fn)
    gen = torch.Generator().manual_seed(0)
    c = 7
    labels = torch.randint(-1, c + 1, (30,), generator=gen)
    if name.startswith("seesaw"):
        args = (torch.randn(30, c + 2, generator=gen),) + ((labels, torch.rand(c + 1, generator=gen) * 9)
                                                            if name == "seesaw_loss" else ())
    elif name.startswith("eqlv2"):
        args = (torch.randn(30, c + 1, generator=gen),) + ((labels,) if name == "eqlv2_loss" else ())
    elif name == "federated_loss":
        args = (torch.randn(30, c, generator=gen), labels, torch.rand(c, generator=gen) > 0.5)
    else:
        args = (labels, torch.rand(c, generator=gen) + 0.1, 4)
    torch.manual_seed(1)
    want = fn(*args)
    torch.manual_seed(1)
    got = scripted(*args)
    assert torch.equal(got, want)


@pytest.mark.parametrize("make", [lambda: ltkernels.SeesawLoss(5), lambda: ltkernels.EQLv2Loss(5),
                                  lambda: ltkernels.FederatedLoss(torch.rand(5) + 0.1, num_fed_classes=3)],
                         ids=["seesaw", "eqlv2", "federated"])
def test_other_lvis_loss_modules_script_and_update_their_state(make):
    import copy

    eager = make()
    scripted = torch.jit.script(copy.deepcopy(eager))
    cols = {"SeesawLoss": 7, "EQLv2Loss": 6, "FederatedLoss": 5}[type(eager).__name__]
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        logits = torch.randn(20, cols, generator=gen)
        labels = torch.randint(0, 6, (20,), generator=gen)
        x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        torch.manual_seed(3)
        a = eager(x1, labels)
        torch.manual_seed(3)
        b = scripted(x2, labels)
        a.backward()
        b.backward()
        assert torch.allclose(a, b) and torch.allclose(x1.grad, x2.grad)
    for name, buf in eager.state_dict().items():
        assert torch.equal(buf, scripted.state_dict()[name]), name
