"""The CPU losses' gradients above 32 MiB come from a slot that hands the previous step's gradient out again once
nothing references it any more (csrc/cpu/output_slot.h): that saves the page faults of a fresh allocation on every
step. It must never hand out memory that something still sees: a gradient that is kept, a view of it, or a weak
reference to its storage each make the next step allocate afresh, and the kept one keeps its values. The BAGS scores,
an output the caller keeps, come from a slot of depth 2: the output before last is reused."""
import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

import ltkernels
from ltkernels.reference.group_softmax import group_softmax_scores_reference

N, C = 7200, 1203  # a 34.6 MB float32 gradient, above the slot's 32 MiB
GROUPS = ltkernels.BalancedGroups.from_instance_counts([1, 5, 50, 500] * 300)


def _labels(gen, n=N, classes=C):
    return torch.randint(0, classes + 1, (n,), generator=gen)


def _efl(x, gen):
    return ltkernels.equalized_focal_loss(x, _labels(gen))


def _eqfl(x, gen):
    return ltkernels.equalized_quality_focal_loss(x, _labels(gen), torch.rand(N, generator=gen))


def _bags(x, gen):
    return ltkernels.group_softmax_loss(x, _labels(gen, classes=1200), GROUPS,
                                        generator=torch.Generator().manual_seed(1))


def _seesaw(x, gen):
    return ltkernels.seesaw_loss(x, _labels(gen, classes=C - 2), torch.rand(C - 1, generator=gen) * 100)


def _eqlv2(x, gen):
    return ltkernels.eqlv2_loss(x, _labels(gen, classes=C - 1))


def _federated(x, gen):
    return ltkernels.federated_loss(x, _labels(gen), torch.rand(C, generator=gen) < 0.05)


LOSSES = {"equalized_focal_loss": (_efl, C), "equalized_quality_focal_loss": (_eqfl, C),
          "group_softmax_loss": (_bags, GROUPS.num_logits), "seesaw_loss": (_seesaw, C), "eqlv2_loss": (_eqlv2, C),
          "federated_loss": (_federated, C)}


def _grad(name, seed):
    fn, width = LOSSES[name]
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, width, generator=gen) * 2 - 2).requires_grad_()
    return torch.autograd.grad(fn(x, gen), x)[0]


@pytest.mark.parametrize("name", list(LOSSES))
def test_a_released_gradient_is_reused_and_a_kept_one_never(name):
    first = _grad(name, 0)
    assert first.nbytes > 32 << 20
    want_first = first.clone()
    second = _grad(name, 1)  # `first` is kept: the step must not write into it
    assert second.data_ptr() != first.data_ptr()
    assert torch.equal(first, want_first)
    want_second = second.clone()
    view = second[10:20]
    del first, second
    third = _grad(name, 1)  # a view of `second` is left: still not free
    assert torch.equal(third, want_second) and third.data_ptr() != view.data_ptr()
    assert torch.equal(view, want_second[10:20])
    del view
    ptr = third.data_ptr()
    del third
    again = _grad(name, 1)  # nothing references the last gradient: its memory comes back, rewritten in full
    assert again.data_ptr() == ptr
    assert torch.equal(again, want_second)


@pytest.mark.parametrize("name", ["equalized_focal_loss", "group_softmax_loss"])
def test_a_weak_reference_to_the_storage_keeps_it_out_of_reuse(name):
    grad = _grad(name, 0)
    want = grad.clone()
    ref = StorageWeakRef(grad.untyped_storage())
    del grad
    nxt = _grad(name, 0)
    assert ref.expired(), "the slot kept a storage that a weak reference can still reach"
    assert torch.equal(nxt, want)


def test_other_sizes_and_dtypes_get_their_own_gradient():
    a = _grad("equalized_focal_loss", 0)
    ptr = a.data_ptr()
    del a
    x = torch.randn(N + 64, C, requires_grad=True)
    g = torch.autograd.grad(ltkernels.equalized_focal_loss(x, torch.randint(0, C + 1, (N + 64,))), x)[0]
    assert g.shape == (N + 64, C) and torch.isfinite(g).all()
    xd = torch.randn(N // 2 + 8, C, dtype=torch.float64, requires_grad=True)
    gd = torch.autograd.grad(ltkernels.equalized_focal_loss(xd, torch.randint(0, C + 1, (N // 2 + 8,))), xd)[0]
    assert gd.dtype == torch.float64 and gd.data_ptr() != g.data_ptr() and torch.isfinite(gd).all()
    del ptr


def test_release_cpu_buffers_frees_what_the_slots_keep():
    grad = _grad("equalized_focal_loss", 0)
    want = grad.clone()
    nbytes = grad.nbytes
    ltkernels.release_cpu_buffers()  # `grad` is still in use: it keeps its memory (and its values)
    assert torch.equal(grad, want)
    del grad
    _grad("equalized_focal_loss", 0)  # dropped at once: kept by the slot, referenced by nothing else
    assert ltkernels.release_cpu_buffers() >= nbytes
    assert ltkernels.release_cpu_buffers() == 0
    assert torch.equal(_grad("equalized_focal_loss", 0), want)


def _scores(seed):
    x = torch.randn(N, GROUPS.num_logits, generator=torch.Generator().manual_seed(seed)) * 2
    return ltkernels.group_softmax_scores(x, GROUPS), x


def test_scores_reuse_the_output_before_last_and_never_one_in_use():
    # `scores = f(x)` in a loop keeps the previous result while the next is made: a slot of depth 2 (the outputs of
    # the last two calls) serves it from memory already faulted in, and never hands out an output still referenced.
    kept = [_scores(seed) for seed in range(3)]  # all three in use: three buffers, each keeps its values
    assert kept[0][0].nbytes > 32 << 20
    assert len({s.data_ptr() for s, _ in kept}) == 3
    for s, x in kept:
        assert torch.allclose(s, group_softmax_scores_reference(x.double(), GROUPS).float(), rtol=1e-5, atol=1e-7)
    del kept, s, x
    ptrs = []
    scores = None
    for seed in range(6):
        scores, x = _scores(seed)
        ptrs.append(scores.data_ptr())
        want = group_softmax_scores_reference(x.double(), GROUPS).float()
        assert torch.allclose(scores, want, rtol=1e-5, atol=1e-7)  # a reused buffer is rewritten in full
    assert len(set(ptrs[1:])) == 2 and ptrs[2:] == ptrs[:2] * 2  # two buffers, taken in turn
    del scores
    assert ltkernels.release_cpu_buffers() >= 2 * want.nbytes
