"""Repeat factor sampling and SimCal's bi-level class-balanced sampler."""
import math
from collections import Counter

import pytest
import torch

from ltkernels.models.data.samplers import BiLevelClassSampler, RepeatFactorSampler, repeat_factors

# five toy images: class 1 in 4 of them, class 2 in 2, class 3 in 1, one image without annotations
TOY = [{1}, {1, 2}, {1, 3}, set(), {1, 2}]


def test_repeat_factors_hand_computed():
    t = 0.5
    # f_1 = 4/5, f_2 = 2/5, f_3 = 1/5; r_c = max(1, sqrt(t / f_c))
    r1 = max(1.0, math.sqrt(t / 0.8))  # = 1 (0.79 clipped)
    r2 = math.sqrt(t / 0.4)             # 1.1180
    r3 = math.sqrt(t / 0.2)             # 1.5811
    expected = [r1, max(r1, r2), max(r1, r3), 1.0, max(r1, r2)]
    got = repeat_factors(TOY, threshold=t)
    assert got.dtype == torch.float64 and got.shape == (5,)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64))
    assert got.tolist() == pytest.approx([1.0, 1.118034, 1.581139, 1.0, 1.118034], abs=1e-6)
    # with the LVIS threshold 0.001 nothing this frequent is repeated
    assert torch.equal(repeat_factors(TOY), torch.ones(5, dtype=torch.float64))
    # explicit per-class image counts (e.g. from the full dataset) override the counts over image_classes
    got = repeat_factors(TOY, num_images_per_class={1: 4, 2: 1, 3: 1}, threshold=t)
    assert got[1].item() == pytest.approx(math.sqrt(t / 0.2))


def test_stochastic_rounding_mean_and_support():
    r = torch.tensor([1.0, 1.25, 2.7, 0.5], dtype=torch.float64)
    s = RepeatFactorSampler(r, seed=3)
    epochs = 400
    totals = torch.zeros(4, dtype=torch.float64)
    for e in range(epochs):
        s.set_epoch(e)
        idx = list(s)
        assert len(idx) == len(s)
        c = Counter(idx)
        for i in range(4):
            lo = math.floor(r[i].item())
            assert c[i] in (lo, lo + 1)  # floor(r) or floor(r) + 1 copies
            totals[i] += c[i]
    mean = totals / epochs
    # per-epoch std <= 0.5 -> std of the mean <= 0.025; 5 sigma tolerance
    assert torch.allclose(mean, r, atol=0.125), mean
    assert mean[0].item() == 1.0


def test_epochs_differ_and_are_reproducible():
    r = repeat_factors(TOY, threshold=0.5)
    a, b = RepeatFactorSampler(r, seed=1), RepeatFactorSampler(r, seed=1)
    seqs = []
    for e in range(6):
        a.set_epoch(e)
        b.set_epoch(e)
        la = list(a)
        assert la == list(b)
        seqs.append(la)
    assert len({tuple(x) for x in seqs}) > 1


def test_distributed_split_partitions_the_epoch():
    r = torch.tensor([1.0, 2.5, 1.3, 3.9, 1.0, 1.7, 1.0], dtype=torch.float64)
    for epoch in range(5):
        full = RepeatFactorSampler(r, seed=7, num_replicas=1, rank=0)
        full.set_epoch(epoch)
        whole = list(full)
        parts = []
        for rank in range(2):
            s = RepeatFactorSampler(r, seed=7, num_replicas=2, rank=rank)
            s.set_epoch(epoch)
            parts.append(list(s))
            assert len(parts[-1]) == len(s) == math.ceil(len(whole) / 2)
        pad = 2 * len(parts[0]) - len(whole)
        assert pad in (0, 1)
        interleaved = [x for pair in zip(parts[0], parts[1]) for x in pair]
        assert interleaved == whole + whole[:pad]


def test_state_dict_resume_reproduces_rest_of_epoch():
    r = torch.tensor([1.0, 2.5, 1.3, 3.9, 1.0, 1.7, 1.0, 5.2], dtype=torch.float64)
    s = RepeatFactorSampler(r, seed=11)
    s.set_epoch(3)
    full = list(s)
    s2 = RepeatFactorSampler(r, seed=11)
    s2.set_epoch(3)
    it = iter(s2)
    head = [next(it) for _ in range(7)]
    state = s2.state_dict()
    assert state["epoch"] == 3 and state["index"] == 7
    s3 = RepeatFactorSampler(r, seed=11)
    s3.load_state_dict(state)
    rest = list(s3)
    assert head + rest == full
    # the resume offset applies once: the next pass over the same epoch is whole again
    assert list(s3) == full
    with pytest.raises(ValueError):
        RepeatFactorSampler(r, seed=12).load_state_dict(state)


# chi-square critical values at false-failure rate 1e-4 (scipy.stats.chi2.ppf(1 - 1e-4, dof))
CHI2_1E4 = {4: 23.513, 9: 33.720}


def _chi2(counts, expected):
    return sum((c - expected) ** 2 / expected for c in counts)


def _long_tail_images():
    # class c (1..10) is in 2 ** (c - 1) images (1 .. 512), some images hold several classes
    images = []
    for c in range(1, 11):
        for j in range(2 ** (c - 1)):
            s = {c}
            if j % 3 == 0 and c > 1:
                s.add(1 + (j % (c - 1)))
            images.append(s)
    return images


def test_bilevel_sampler_draws_classes_uniformly():
    images = _long_tail_images()
    n = 20000
    sampler = BiLevelClassSampler(images, num_samples=n, seed=0)
    pairs = list(sampler)
    assert len(pairs) == len(sampler) == n
    assert all(c in images[i] for i, c in pairs)  # the drawn image contains the drawn class
    classes = Counter(c for _, c in pairs)
    stat = _chi2([classes[c] for c in range(1, 11)], n / 10)
    assert stat < CHI2_1E4[9], stat
    # the test has power: uniform sampling over images is far from class-uniform
    g = torch.Generator().manual_seed(0)
    naive = Counter()
    for i in torch.randint(len(images), (n,), generator=g).tolist():
        naive[min(images[i])] += 1
    assert _chi2([naive[c] for c in range(1, 11)], n / 10) > 100 * CHI2_1E4[9]


def test_bilevel_sampler_second_level_uniform_and_reproducible():
    images = [{1}, {1}, {1, 2}, {1}, {1}, {2}, set()]
    sampler = BiLevelClassSampler(images, num_samples=10000, seed=5)
    pairs = list(sampler)
    assert pairs == list(BiLevelClassSampler(images, num_samples=10000, seed=5))
    assert pairs != list(BiLevelClassSampler(images, num_samples=10000, seed=6))
    ones = Counter(i for i, c in pairs if c == 1)
    assert set(ones) == {0, 1, 2, 3, 4}
    total = sum(ones.values())
    assert _chi2([ones[i] for i in range(5)], total / 5) < CHI2_1E4[4]
    assert 6 not in {i for i, _ in pairs}  # images without classes are never drawn
    with pytest.raises(ValueError):
        BiLevelClassSampler([set(), set()], 10)
