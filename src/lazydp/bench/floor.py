"""The noise floor of high-pooling workloads: drawing fresh noise for every row a step reads.

Any exact DP-SGD step must give each embedding row that the next forward observes its pending
noise, so a step that reads ``u`` distinct rows of dim ``d`` needs at least ``u * d`` fresh
Gaussians (``2 u d`` with table momentum: the velocity's too). ``measure_noise_floor`` times
exactly that with lazydp's generator (``lazydp.noise.GaussianNoise``), on the same batches the
harness feeds the modes: it regenerates the workload's batch stream, counts the distinct rows of
each measured step, and times ONE ``normal_`` call per step into a preallocated buffer (the
generator's best case: one call spreads over all threads, no allocation). lazydp / (sgd +
floor) is then the overhead LazyDP adds beyond what exact noise costs.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from lazydp.bench.harness import aggregate
from lazydp.bench.workload import BenchSpec, make_batches
from lazydp.noise import GaussianNoise


@dataclass(frozen=True)
class NoiseFloor:
    """Over the measured steps: mean distinct rows read and Gaussians drawn; the draw's time
    (and its rate) by the spec's ``statistic``, as the modes' step times."""

    label: str
    unique_rows: float
    elements: float
    floor_ms: float
    samples_per_s: float

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)


def unique_rows(batch_sparse: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Distinct rows read by one batch, summed over tables.

    Example: ``unique_rows([(torch.tensor([1, 1, 2]), torch.tensor([0]))]) == 2``.
    """
    return sum(int(torch.unique(ids).numel()) for ids, _ in batch_sparse)


def measure_noise_floor(spec: BenchSpec) -> NoiseFloor:
    """Time one Gaussian per element of every distinct row read, per step (last measure_last),
    summarised by ``spec.statistic``.

    Example: ``measure_noise_floor(BenchSpec("rmc1", 1e-5, 16, pooling=2, iterations=2,
    measure_last=1)).elements > 0``.
    """
    # With table momentum a row owes noise on its velocity too: two Gaussians per element
    # (lazy_momentum's joint catch-up), so the floor is twice as many draws.
    dim = spec.model_config.embedding_dim * (2 if spec.table_momentum else 1)
    counts = [unique_rows(sparse) for _, sparse, _ in make_batches(spec)][-spec.measure_last :]
    if spec.dense_only:
        counts = [0] * len(counts)
    buffer = torch.empty(max(counts) * dim if counts else 0)
    noise = GaussianNoise(seed=0, stream=99)  # a benchmark: seeded, never used for a model
    # Warm the thread pool and EVERY page: a step must not pay first-touch faults the timed
    # steps of the modes (warmed by their own earlier steps) do not pay.
    noise.normal_(buffer)
    steps = []
    for rows in counts:
        t0 = time.perf_counter()
        if rows:
            noise.normal_(buffer[: rows * dim])
        steps.append({"total": 1e3 * (time.perf_counter() - t0), "elements": float(rows * dim)})
    # The spec's statistic, as for the modes' steps (median/min: one whole step, its own size).
    step = aggregate(steps, spec.statistic)
    return NoiseFloor(
        label=spec.label,
        unique_rows=sum(counts) / len(counts),
        elements=sum(counts) * dim / len(counts),
        floor_ms=step["total"],
        samples_per_s=1e3 * step["elements"] / step["total"] if step["total"] > 0 else math.nan,
    )
