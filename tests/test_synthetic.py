"""Synthetic DLRM inputs: shapes, id ranges, access locality statistics, the planted signal."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from lazydp.data.synthetic import (
    ZIPF_HEAD,
    RowSampler,
    SyntheticDLRMData,
    movielens_popularity,
    parse_locality,
)
from lazydp.errors import ConfigError
from lazydp.models import DLRM, DLRMConfig, paper_config

LOCALITIES = ["uniform", "zipf:1.05", "zipf:0.5", "movielens"]


def _share_of_top(ranks: np.ndarray, k: int) -> float:
    return float((ranks < k).mean())


@pytest.mark.parametrize("locality", LOCALITIES)
def test_batch_shapes_ranges_and_bag_sizes(locality):
    cfg = paper_config("mlperf", scale=1e-5, pooling=3)  # tables of 1..400 rows
    data = SyntheticDLRMData(cfg, batch_size=64, locality=locality, seed=1)
    for dense, sparse, label in data.batches(3):
        assert dense.shape == (64, 13) and dense.dtype == torch.float32
        assert label.shape == (64,) and set(label.unique().tolist()) <= {0.0, 1.0}
        assert len(sparse) == 26
        for (ids, offsets), rows in zip(sparse, cfg.table_rows):
            assert ids.dtype == offsets.dtype == torch.int64 and ids.shape == (64 * 3,)
            assert torch.equal(offsets, torch.arange(0, 192, 3))  # exactly `pooling` ids per bag
            assert ids.min() >= 0 and ids.max() < rows
    dense, sparse, label = data.batch(batch_size=5)  # e.g. a Poisson-sampled size
    assert dense.shape == (5, 13) and sparse[0][1].shape == (5,) and label.shape == (5,)


def test_batches_are_seeded_and_layout_is_fixed():
    cfg = paper_config("rmc2", scale=1e-6)
    a, b, c = (SyntheticDLRMData(cfg, 16, "zipf:1.1", seed=s) for s in (3, 3, 4))
    (da, sa, la), (db, sb, lb), (dc, _, _) = a.batch(), b.batch(), c.batch()
    assert torch.equal(da, db) and torch.equal(la, lb) and torch.equal(sa[7][0], sb[7][0])
    assert not torch.equal(da, dc)
    ids = np.arange(cfg.table_rows[0])
    assert np.array_equal(a.is_hot(0, ids), c.is_hot(0, ids))  # same layout_seed, same hot set
    assert not np.array_equal(a.is_hot(0, ids), a.is_hot(1, ids))  # tables differ


def test_zipf_concentrates_and_uniform_does_not():
    rng = np.random.default_rng(0)
    rows, k = 100_000, 1000  # top 1% of rows
    zipf = RowSampler(rows, "zipf:1.05").ranks(rng, 200_000)
    uniform = RowSampler(rows, "uniform").ranks(rng, 200_000)
    assert _share_of_top(zipf, k) > 0.5  # far more than 1%
    assert _share_of_top(uniform, k) == pytest.approx(0.01, abs=0.002)
    assert _share_of_top(zipf, k) == pytest.approx(
        RowSampler(rows, "zipf:1.05").top_share(k), abs=0.005
    )


def _chi2_pvalue(ranks: np.ndarray, probs: np.ndarray) -> float:
    observed = np.bincount(ranks, minlength=probs.size)
    return float(stats.chisquare(observed, probs * ranks.size).pvalue)


def test_zipf_small_table_matches_exact_pmf_and_rejects_wrong_exponent():
    rows, n = 40, 100_000
    pmf = np.arange(1, rows + 1, dtype=float) ** -1.0
    pmf /= pmf.sum()
    right = RowSampler(rows, "zipf:1.0").ranks(np.random.default_rng(1), n)
    wrong = RowSampler(rows, "zipf:1.1").ranks(np.random.default_rng(1), n)
    assert _chi2_pvalue(right, pmf) > 1e-3
    assert _chi2_pvalue(wrong, pmf) < 1e-6


def test_zipf_huge_table_is_o_head_memory_and_matches_its_law():
    rows = 10**8
    sampler = RowSampler(rows, "zipf:1.2")
    assert sampler._cdf.size == ZIPF_HEAD  # never O(rows)
    ranks = sampler.ranks(np.random.default_rng(2), 400_000)
    assert ranks.min() >= 0 and ranks.max() < rows
    for k in (1, 10, ZIPF_HEAD, 10 * ZIPF_HEAD, 10**6, 10**7):
        assert _share_of_top(ranks, k) == pytest.approx(sampler.top_share(k), abs=0.004), k
    # the continuous tail joins the exact head: rank windows just below and above the seam keep
    # the ratio of the exact law (about 1.27 for a = 1.2, so a flat join would fail)
    below = (ranks >= ZIPF_HEAD - 200) & (ranks < ZIPF_HEAD)
    above = (ranks >= ZIPF_HEAD) & (ranks < ZIPF_HEAD + 200)
    k = np.arange(ZIPF_HEAD - 199, ZIPF_HEAD + 201, dtype=float) ** -1.2
    expected = k[:200].sum() / k[200:].sum()
    sigma = expected * math.sqrt(1 / below.sum() + 1 / above.sum())
    assert below.sum() / above.sum() == pytest.approx(expected, abs=4 * sigma)
    assert abs(expected - 1.0) > 6 * sigma
    exact_head = sum(k**-1.2 for k in range(1, 11)) / sum(k**-1.2 for k in range(1, ZIPF_HEAD + 1))
    assert sampler.top_share(10) == pytest.approx(
        sampler.top_share(ZIPF_HEAD) * exact_head, rel=1e-9
    )
    assert sampler.top_share(rows) == pytest.approx(1.0)


def test_movielens_matches_empirical_popularity_head():
    counts = movielens_popularity()
    assert counts.sum() == 100_004 and np.all(np.diff(counts) <= 0)
    movies = counts.size
    rows = movies * 20
    sampler = RowSampler(rows, "movielens")
    ranks = sampler.ranks(np.random.default_rng(3), 300_000)
    for fraction in (0.01, 0.1, 0.5):
        k = round(fraction * rows)
        head = counts[: round(fraction * movies)].sum() / counts.sum()  # top movies' rating share
        assert sampler.top_share(k) == pytest.approx(head, abs=2e-3), fraction
        assert _share_of_top(ranks, k) == pytest.approx(head, abs=0.006), fraction
    assert sampler.top_share(round(0.1 * rows)) > 0.4  # a real, heavily skewed head
    # a uniform trace would fail the same check
    uniform = RowSampler(rows, "uniform").ranks(np.random.default_rng(3), 300_000)
    assert _share_of_top(uniform, round(0.1 * rows)) < 0.2


def test_hot_rows_are_spread_by_a_fixed_bijection():
    for locality in ("zipf:1.0", "movielens"):
        sampler = RowSampler(1000, locality, layout_seed=5)
        ids = sampler.ids_of_ranks(np.arange(1000))
        assert np.array_equal(np.sort(ids), np.arange(1000))  # a permutation
        assert not np.array_equal(ids[:10], np.arange(10))  # hot rows not at id 0..9
        again = RowSampler(1000, locality, layout_seed=5).ids_of_ranks(np.arange(1000))
        assert np.array_equal(ids, again)


def test_locality_parsing():
    assert parse_locality("zipf") == ("zipf", 1.0)
    assert parse_locality("zipf:0.8") == ("zipf", 0.8)
    assert parse_locality("movielens") == ("movielens", 0.0)
    for bad in ("zipf:0", "zipf:-1", "zipf:x", "pareto", "uniform:2"):
        with pytest.raises(ConfigError, match="locality"):
            parse_locality(bad)
    with pytest.raises(ConfigError, match="hot_fraction"):
        SyntheticDLRMData(paper_config("rmc1", 1e-6), 4, hot_fraction=1.0)


def _bernoulli_entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def _trained_loss(planted: bool) -> tuple[float, float]:
    """Held-out BCE of a tiny DLRM after Adam steps, and the base-rate entropy of the labels."""
    cfg = DLRMConfig("toy", (40, 40, 40), 8, (13, 16, 8), (16, 1), 4)
    train = SyntheticDLRMData(cfg, 256, "zipf:0.5", seed=0, planted_signal=planted)
    held_out = SyntheticDLRMData(cfg, 4096, "zipf:0.5", seed=99, planted_signal=planted)
    torch.manual_seed(0)
    model = DLRM.from_config(cfg, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for dense, sparse, label in train.batches(120):
        opt.zero_grad()
        loss_fn(model(dense, sparse), label).backward()
        opt.step()
    dense, sparse, label = held_out.batch()
    with torch.no_grad():
        loss = loss_fn(model(dense, sparse), label).item()
    return loss, _bernoulli_entropy(label.mean().item())


@pytest.fixture
def one_thread():
    # Tiny ops on a busy 2-core machine: OpenMP spin-waiting makes 2 threads ~50x slower than 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_planted_signal_is_learnable_and_absent_without_it(one_thread):
    loss, entropy = _trained_loss(planted=True)
    assert loss < entropy - 0.1
    loss, entropy = _trained_loss(planted=False)
    assert loss > entropy - 0.02  # nothing to learn: the same check fails


def test_planted_signal_uses_the_hot_set():
    cfg = DLRMConfig("toy", (50, 50), 4, (13, 4), (1,), 5)
    data = SyntheticDLRMData(cfg, 8, seed=0)
    dense = np.zeros((1, 13))
    cold = [np.flatnonzero(~data.is_hot(t, np.arange(50)))[:1].repeat(5) for t in range(2)]
    hot = [np.flatnonzero(data.is_hot(t, np.arange(50)))[:1].repeat(5) for t in range(2)]
    f = data.hot_fraction
    z = math.sqrt(5 / (f * (1 - f)))
    assert data.signal_score(dense, cold)[0] == pytest.approx(1.5 * 2 * (-f * z) / math.sqrt(2) - 1)
    assert data.signal_score(dense, hot)[0] == pytest.approx(
        1.5 * 2 * ((1 - f) * z) / math.sqrt(2) - 1
    )
