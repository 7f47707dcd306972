"""The conventions every op follows (csrc/README.md): private backward ops, one accumulation-dtype rule, one answer
to "may this op read values now", fake kernels and C++ host wrappers that check shapes."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import ltkernels  # noqa: F401  (loads and registers the ops)
from ltkernels._ext import has_op
from ltkernels._validate import acc_dtype, can_read_values, tracing


def _ltkernels_ops():
    return sorted({s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("ltkernels::")})


def test_backward_ops_are_private():
    names = _ltkernels_ops()
    assert "roi_align" in names and "equalized_focal_loss" in names
    backward = [n for n in names if "backward" in n]
    assert backward and all(n.startswith("_") and n.endswith("_backward") for n in backward), backward
    assert {"_roi_align_backward", "_equalized_focal_loss_backward", "_equalized_quality_focal_loss_backward"} <= \
        set(backward)


def test_accumulation_dtype_rule():
    assert acc_dtype(torch.float64) == torch.float64
    for d in (torch.float32, torch.float16, torch.bfloat16):
        assert acc_dtype(d) == torch.float32
    # the kernels follow the same rule: EFL's loss dtype
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        loss = ltkernels.equalized_focal_loss(torch.randn(4, 3, dtype=d), torch.tensor([0, 1, 2, 3]))
        assert loss.dtype == acc_dtype(d)


def test_can_read_values():
    cpu = torch.ones(3)
    assert can_read_values(cpu) and can_read_values(cpu, sync=True) and not tracing()
    meta = torch.ones(3, device="meta")  # stands for an accelerator tensor: reading costs a sync
    assert not can_read_values(meta) and can_read_values(meta, sync=True)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(cpu)
        assert tracing() and not can_read_values(fake, sync=True)
    seen = []

    @torch.compile(backend="eager", fullgraph=True)
    def f(x):
        seen.append(tracing())
        return x + 1

    f(cpu)
    assert seen == [True]


def _fake_calls():
    """(op, good arguments, the same with one wrong shape) for every op whose output shape follows its inputs'."""
    n, c = 6, 5
    b4, s1 = torch.rand(n, 4), torch.rand(n)
    calls = [
        ("nms", (b4, s1, 0.5), (torch.rand(n, 5), s1, 0.5)),
        ("batched_nms", (b4, s1, torch.zeros(n, dtype=torch.long), 0.5),
         (b4, s1, torch.zeros(n + 1, dtype=torch.long), 0.5)),
        ("multiclass_nms", (b4, torch.rand(n, c), torch.zeros(n, dtype=torch.long), 1, 0.1, 0.5, 10),
         (torch.rand(n, c + 1, 4), torch.rand(n, c), torch.zeros(n, dtype=torch.long), 1, 0.1, 0.5, 10)),
        ("multiclass_nms_images", ([b4, b4[:2]], [torch.rand(n, c), torch.rand(2, c)], 0.1, 0.5, 10),
         ([b4, b4[:2]], [torch.rand(n, c), torch.rand(2, c + 1)], 0.1, 0.5, 10)),
        ("equalized_focal_loss", (torch.randn(n, c), torch.zeros(n, dtype=torch.long), torch.ones(c),
                                  torch.ones(()), 2.0, 4.0, 0.25, -1),
         (torch.randn(n, c), torch.zeros(n, dtype=torch.long), torch.ones(c + 1), torch.ones(()), 2.0, 4.0, 0.25,
          -1)),
        ("equalized_quality_focal_loss", (torch.randn(n, c), torch.zeros(n, dtype=torch.long), torch.rand(n),
                                          torch.ones(c), torch.ones(()), 2.0, 4.0, 0.25, -1),
         (torch.randn(n, c), torch.zeros(n, dtype=torch.long), torch.rand(n - 1), torch.ones(c), torch.ones(()),
          2.0, 4.0, 0.25, -1)),
        ("_equalized_focal_loss_backward", (torch.ones(()), torch.randn(n, c), torch.zeros(n, dtype=torch.long),
                                            torch.ones(c), torch.ones(()), 2.0, 4.0, 0.25, -1),
         (torch.ones(()), torch.randn(n, c), torch.zeros(n + 2, dtype=torch.long), torch.ones(c), torch.ones(()),
          2.0, 4.0, 0.25, -1)),
        ("roi_align", (torch.rand(1, 2, 8, 8), torch.tensor([[0.0, 1, 1, 5, 5]]), 1.0, 2, 2, 2, True),
         (torch.rand(1, 2, 8, 8), torch.tensor([[1.0, 1, 5, 5]]), 1.0, 2, 2, 2, True)),
    ]
    return [pytest.param(*call, id=call[0]) for call in calls]


@pytest.mark.parametrize("name,good,bad", _fake_calls())
def test_fake_kernels_check_shapes_like_the_kernels(name, good, bad):
    if not has_op(name):
        pytest.skip(f"{name} not built")
    op = getattr(torch.ops.ltkernels, name)
    op(*good)  # the real kernel accepts the good arguments ...
    with pytest.raises(RuntimeError):
        op(*bad)  # ... and its host checks refuse the bad ones
    # a shape environment that allows data-dependent output sizes (NMS)
    with FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(allow_dynamic_output_shape_ops=True)) as mode:
        def fake_one(a):
            if isinstance(a, list):
                return [fake_one(t) for t in a]
            return mode.from_tensor(a) if torch.is_tensor(a) else a

        fake = lambda args: tuple(fake_one(a) for a in args)  # noqa: E731
        op(*fake(good))
        with pytest.raises(RuntimeError):
            op(*fake(bad))


def test_group_softmax_fake_and_host_checks():
    groups = ltkernels.BalancedGroups.from_instance_counts([1, 5, 50, 500])
    logits = torch.randn(4, groups.num_logits)
    offsets, label_group, score_column = groups.group_offsets, groups.label_group, groups.score_column
    op = torch.ops.ltkernels.group_softmax_scores
    assert op(logits, offsets, label_group, score_column).shape == (4, groups.num_classes + 1)
    with pytest.raises(RuntimeError, match="label_group and score_column"):
        op(logits, offsets, label_group[:-1], score_column)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        with pytest.raises(RuntimeError, match="label_group and score_column"):
            op(mode.from_tensor(logits), offsets, label_group[:-1], score_column)
