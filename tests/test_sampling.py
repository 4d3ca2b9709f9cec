"""Batch samplers: the Poisson law (with tests that reject wrong ones), shards, seeds, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from lazydp.errors import ConfigError
from lazydp.sampling import DistributedPoissonSampling, PoissonSampling, ShuffledFixedSize

ALPHA = 1e-4  # false-alarm rate of each statistical test (seeded, so the tests are stable)


def binomial_law_pvalue(sizes: np.ndarray, n: int, q: float) -> float:
    """Smaller p-value of a z-test on the mean and a chi-square test on the variance."""
    t = len(sizes)
    mean, var = n * q, n * q * (1 - q)
    z = (sizes.mean() - mean) / np.sqrt(var / t)
    p_mean = 2 * stats.norm.sf(abs(z))
    chi2 = (t - 1) * sizes.var(ddof=1) / var
    p_var = 2 * min(stats.chi2.cdf(chi2, t - 1), stats.chi2.sf(chi2, t - 1))
    return min(p_mean, p_var)


def inclusion_uniformity_pvalue(counts: np.ndarray, t: int, q: float) -> float:
    """Chi-square test that every example was included Binomial(t, q) times."""
    chi2 = ((counts - t * q) ** 2 / (t * q * (1 - q))).sum()
    return stats.chi2.sf(chi2, len(counts))


def batch_sizes(sampler) -> np.ndarray:
    return np.array([len(b) for b in sampler])


def inclusion_counts(sampler, n: int) -> np.ndarray:
    counts = np.zeros(n)
    for b in sampler:
        counts[b] += 1
    return counts


def test_batch_size_is_binomial_and_wrong_laws_are_rejected():
    n, q = 1000, 0.05
    sizes = batch_sizes(PoissonSampling(n, q, steps=3000, seed=1))
    assert binomial_law_pvalue(sizes, n, q) > ALPHA
    # The same test rejects a 10% wrong rate, and fixed-size batches (variance 0).
    assert (
        binomial_law_pvalue(batch_sizes(PoissonSampling(n, 1.1 * q, steps=3000, seed=2)), n, q)
        < ALPHA
    )
    fixed = batch_sizes(ShuffledFixedSize(n, int(n * q), seed=3))
    assert binomial_law_pvalue(np.tile(fixed, 150), n, q) < ALPHA


def test_every_example_is_included_at_rate_q_and_bias_is_rejected():
    n, q, t = 500, 0.1, 2000
    counts = inclusion_counts(PoissonSampling(n, q, steps=t, seed=4), n)
    assert inclusion_uniformity_pvalue(counts, t, q) > ALPHA
    # A sampler that favours half of the examples (rate 1.1q there) is caught.
    favoured = inclusion_counts(PoissonSampling(n // 2, 1.1 * q, steps=t, seed=5), n // 2)
    rest = inclusion_counts(PoissonSampling(n - n // 2, q, steps=t, seed=6), n - n // 2)
    assert inclusion_uniformity_pvalue(np.concatenate([favoured, rest]), t, q) < ALPHA


def test_batches_are_sorted_distinct_and_in_range():
    for b in PoissonSampling(300, 0.3, steps=50, seed=7):
        assert b == sorted(set(b))
        assert all(isinstance(i, int) and 0 <= i < 300 for i in b)


def test_empty_batches_happen_at_the_poisson_rate():
    n, q, t = 100, 0.005, 1000
    empty = (batch_sizes(PoissonSampling(n, q, steps=t, seed=8)) == 0).sum()
    p_empty = (1 - q) ** n  # about 0.61
    assert stats.binomtest(int(empty), t, p_empty).pvalue > ALPHA


def test_huge_population_is_sampled_in_o_batch():
    # An O(N) draw would need 800 GB here.
    sampler = PoissonSampling(10**11, 1e-8, steps=3, seed=9)
    for b in sampler:
        assert len(b) == len(set(b)) and max(b, default=0) < 10**11


def test_length_and_attributes():
    sampler = PoissonSampling(1000, 0.03)
    assert len(sampler) == round(1 / 0.03) == 33
    assert len(list(sampler)) == 33
    assert sampler.expected_batch_size == pytest.approx(30.0)
    assert sampler.name == "poisson" and sampler.sample_rate == 0.03 and not sampler.seeded
    assert len(PoissonSampling(10, 0.5, steps=7)) == 7


def test_seeds_reproduce_and_os_entropy_differs():
    def draw(seed):
        return list(PoissonSampling(1000, 0.05, steps=20, seed=seed))

    assert draw(11) == draw(11)
    assert draw(11) != draw(12)
    assert draw(None) != draw(None)
    assert PoissonSampling(10, 0.5, seed=0).seeded


def test_epochs_draw_fresh_batches():
    sampler = PoissonSampling(1000, 0.05, steps=10, seed=13)
    assert list(sampler) != list(sampler)


def test_distributed_shards_are_disjoint_and_union_is_poisson():
    n, q, w, t = 1001, 0.05, 3, 2000  # n not divisible by w
    samplers = [
        DistributedPoissonSampling(n, q, rank=r, world_size=w, steps=t, seed=14) for r in range(w)
    ]
    assert [len(s) for s in samplers] == [t] * w
    assert sum(s.shard_size for s in samplers) == n
    union_sizes, counts = [], np.zeros(n)
    for batches in zip(*samplers):
        for r, b in enumerate(batches):
            assert all(i % w == r for i in b)
        union = sum(batches, [])
        assert len(union) == len(set(union))
        union_sizes.append(len(union))
        counts[union] += 1
    assert binomial_law_pvalue(np.array(union_sizes), n, q) > ALPHA
    assert inclusion_uniformity_pvalue(counts, t, q) > ALPHA


def test_distributed_rank_streams_are_independent():
    a = list(DistributedPoissonSampling(1000, 0.1, rank=0, world_size=2, steps=5, seed=15))
    b = list(DistributedPoissonSampling(1000, 0.1, rank=1, world_size=2, steps=5, seed=15))
    assert [[i // 2 for i in x] for x in a] != [[i // 2 for i in x] for x in b]
    # World size 1 is the single-process sampler.
    one = DistributedPoissonSampling(1000, 0.1, rank=0, world_size=1, steps=5, seed=15)
    assert list(one) == list(PoissonSampling(1000, 0.1, steps=5, seed=15))


def test_seeded_resume_reproduces_the_uninterrupted_run():
    full = list(PoissonSampling(500, 0.1, steps=10, seed=16))
    first = PoissonSampling(500, 0.1, steps=10, seed=16)
    it = iter(first)
    head = [next(it) for _ in range(4)]
    state = json.loads(json.dumps(first.state_dict()))  # plain data
    resumed = PoissonSampling(500, 0.1, steps=10, seed=16)
    resumed.load_state_dict(state)
    assert head + list(resumed) == full
    assert len(list(resumed)) == 10  # the next epoch is whole again


def test_unseeded_resume_never_replays():
    first = PoissonSampling(500, 0.1, steps=10)
    it = iter(first)
    [next(it) for _ in range(4)]
    state = first.state_dict()
    rest_original = list(it)
    resumed = PoissonSampling(500, 0.1, steps=10)
    resumed.load_state_dict(state)
    rest_resumed = list(resumed)
    assert len(rest_resumed) == len(rest_original) == 6
    assert rest_resumed != rest_original


def test_shuffled_fixed_size_epochs():
    sampler = ShuffledFixedSize(103, 10, seed=17)
    assert len(sampler) == 10 and sampler.name == "shuffle" and sampler.sample_rate == 10 / 103
    epoch = list(sampler)
    assert all(len(b) == 10 and b == sorted(b) for b in epoch)
    flat = sum(epoch, [])
    assert len(set(flat)) == 100  # each example at most once per epoch; 3 dropped
    assert list(sampler) != epoch  # a new permutation each epoch


def test_shuffled_resume_keeps_the_permutation_even_without_seed():
    first = ShuffledFixedSize(100, 10)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    resumed = ShuffledFixedSize(100, 10)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    tail = list(resumed)
    assert len(tail) == 7
    assert sorted(sum(head + tail, [])) == list(range(100))  # no example twice in one epoch


def test_bad_arguments():
    with pytest.raises(ConfigError, match="sample_rate"):
        PoissonSampling(100, 0.0)
    with pytest.raises(ConfigError, match="num_samples"):
        PoissonSampling(0, 0.1)
    with pytest.raises(ConfigError, match="seed"):
        PoissonSampling(100, 0.1, seed=-1)
    with pytest.raises(ConfigError, match="rank"):
        DistributedPoissonSampling(100, 0.1, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="batch_size"):
        ShuffledFixedSize(10, 11)
    with pytest.raises(ConfigError, match="name"):
        PoissonSampling(100, 0.1).load_state_dict(ShuffledFixedSize(10, 2).state_dict())
    with pytest.raises(ConfigError, match="position"):
        PoissonSampling(100, 0.1, steps=5).load_state_dict(
            {"name": "poisson", "step": 9, "position": 9}
        )
