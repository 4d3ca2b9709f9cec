"""When should LazyDP catch a row up: at read time (lazydp's choice) or one batch ahead (the paper)?

    python benchmarks/catch_up_schedule.py [--rows 1M,3M] [--pooling 1,20] [--steps 30]

The LazyDP paper fuses the catch-up of batch t+1's rows into step t's update: one pass over the
union of the rows step t updates and the rows batch t+1 will read (gradient into the first,
pending noise into the second), written once. lazydp instead catches rows up when a forward
reads them, keeps the caught-up rows in a block the forward reads from, and writes block +
gradient once in the update (``LazyTable.catch_up(defer=True)`` then ``update``).

This script times the table-side work of one step under both schedules, side by side in one
process (each timed step right after an untimed step of the same schedule, on tables of their
own): the forward's read of the batch's rows, the catch-up, and the update.

* ``read time``: the product's own ``LazyTable`` (the fast paths lazydp trains with).
* ``lookahead``: a prototype of the paper's schedule written here with the same building
  blocks (``RowGroups``, ``LrPrefix``, ``HistoryTable``, the noise pool). It is checked
  against read time before timing: under ``lazydp.testing.constant_noise`` both give the same
  tables after a flush.

A matmul of the size of a DLRM MLP layer runs between the forward and the update (not timed),
as in a real step, so neither schedule finds the rows still in cache. Not a test: it prints a
table and the ratio lookahead / read time per workload.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor
from torch.nn import functional as F

import lazydp
from lazydp.clipping._base import SparseRows
from lazydp.noise import GaussianNoise
from lazydp.noise_pool import NoisePool
from lazydp.optim.lazy import LazyTable, LrPrefix
from lazydp.row_groups import RowGroups
from lazydp.testing import constant_noise

DIM, BATCH, LR, STD = 32, 2048, 0.05, 0.01
_UNITS = {"K": 1000, "M": 1_000_000}


def parse_count(text: str) -> int:
    """``"3M"`` -> 3000000.

    >>> parse_count("3M"), parse_count("100")
    (3000000, 100)
    """
    text = text.strip().upper()
    return int(text[:-1]) * _UNITS[text[-1]] if text[-1] in _UNITS else int(text)


def new_table(rows: int, seed: int) -> LazyTable:
    weight = torch.nn.Parameter(
        torch.empty(rows, DIM).uniform_(-0.01, 0.01, generator=torch.Generator().manual_seed(seed))
    )
    return LazyTable(weight, LrPrefix(), NoisePool(GaussianNoise(seed=seed)), STD)


def read(weight_or_block: Tensor, ids: Tensor, pooling: int) -> Tensor:
    """The forward's embedding read of (BATCH bags of ``pooling`` ids)."""
    if pooling == 1:
        return weight_or_block.index_select(0, ids)
    offsets = torch.arange(0, ids.numel(), pooling)
    return F.embedding_bag(ids, weight_or_block, offsets, mode="sum")


class ReadTime:
    """lazydp's schedule: catch up at read (deferred write), update writes block + gradient."""

    def __init__(self, table: LazyTable, pooling: int) -> None:
        self.table, self.pooling, self.t = table, pooling, 0

    def forward(self, ids: Tensor) -> Tensor:
        self.table.catch_up(ids, self.t, defer=True)
        block = self.table.deferred_block()
        assert block is not None
        return read(block, self.table.last_read.positions(), self.pooling)

    def update(self, ids: Tensor, grads: Tensor, next_ids: Tensor) -> None:
        del next_ids  # read time does not look ahead
        self.table.prefix.append(LR)
        self.table.update(SparseRows(ids, grads, self.table.weight.shape[0]), -LR)
        self.t += 1


class Lookahead:
    """The paper's schedule: step t's update also catches up batch t+1's rows, one pass."""

    def __init__(self, table: LazyTable, pooling: int, first_ids: Tensor) -> None:
        self.table, self.pooling, self.t = table, pooling, 0
        self.groups = RowGroups(first_ids, table.weight.shape[0])  # batch 0: nothing pending

    def forward(self, ids: Tensor) -> Tensor:
        return read(self.table.weight, ids, self.pooling)  # rows are already caught up

    @torch.no_grad()
    def update(self, ids: Tensor, grads: Tensor, next_ids: Tensor) -> None:
        tab, weight = self.table, self.table.weight
        tab.prefix.append(LR)
        rows, summed = self.groups.rows, self.groups.sum_per_row(grads)
        nxt = RowGroups(next_ids, weight.shape[0])
        union, where = torch.unique(torch.cat([rows, nxt.rows]), return_inverse=True)
        block = weight.index_select(0, union)
        block.index_add_(0, where[: rows.numel()], summed, alpha=-LR)
        # Batch t+1's rows: all noise pending before step t+1 (step t's included).
        at = where[rows.numel() :]
        # plain SGD: no decay factor
        s1, s2, _ = tab.prefix.pending(tab.history.applied.index_select(0, nxt.rows), self.t + 1)
        caught = block.index_select(0, at)
        tab.noise.add_aggregated_(caught, s1, s2, tab.noise_std, pool=tab.pool, checked=True)
        block.index_copy_(0, at, caught)
        tab.history.applied.index_fill_(0, nxt.rows, self.t + 1)
        weight.index_copy_(0, union, block)
        self.groups = nxt
        self.t += 1


def batches(rows: int, pooling: int, steps: int, seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, rows, (BATCH * pooling,), generator=gen) for _ in range(steps + 1)]


def check_equal(pooling: int) -> None:
    """Both schedules give the same tables (constant noise, then a flush): the prototype is
    the same algorithm, so its timing is a fair comparison."""
    rows, steps = 5000, 12
    ids = batches(rows, pooling, steps, seed=1)
    grads = [
        torch.randn(BATCH * pooling, DIM, generator=torch.Generator().manual_seed(i))
        for i in range(steps)
    ]
    with constant_noise(1.0):
        a, b = new_table(rows, 7), new_table(rows, 7)
        sched_a, sched_b = ReadTime(a, pooling), Lookahead(b, pooling, ids[0])
        for t in range(steps):
            for sched in (sched_a, sched_b):
                sched.forward(ids[t])
                sched.update(ids[t], grads[t], ids[t + 1])
        a.flush(steps)
        b.flush(steps)
    err = float((a.weight - b.weight).detach().abs().max())
    if err > 1e-5:
        raise SystemExit(f"lookahead prototype differs from read time by {err}: not comparable")


def time_workload(rows: int, pooling: int, steps: int) -> dict[str, float]:
    ids = batches(rows, pooling, steps + 2, seed=2)
    grads = torch.randn(BATCH * pooling, DIM)
    mlp_x, mlp_w = torch.randn(BATCH, 512), torch.randn(512, 512)
    scheds = {
        "read time": ReadTime(new_table(rows, 3), pooling),
        "lookahead": Lookahead(new_table(rows, 4), pooling, ids[0]),
    }
    times: dict[str, list[float]] = {name: [] for name in scheds}
    for t in range(steps + 1):
        for name, sched in scheds.items():
            start = time.perf_counter()
            sched.forward(ids[t])
            mid = time.perf_counter()
            mlp_x @ mlp_w  # the MLPs run here in a real step: caches go cold
            resume = time.perf_counter()
            sched.update(ids[t], grads, ids[t + 1])
            if t:  # step 0 warms up
                times[name].append((mid - start + time.perf_counter() - resume) * 1e3)
    return {name: statistics.median(ms) for name, ms in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1M,3M", help="rows per table, comma-separated")
    parser.add_argument("--pooling", default="1,20", help="pooling factors, comma-separated")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per workload")
    args = parser.parse_args(argv)
    lazydp.tune_malloc()
    poolings = [int(p) for p in args.pooling.split(",")]
    for pooling in poolings:
        check_equal(pooling)
    print(f"prototype checked against read time (constant noise, pooling {poolings}): equal")
    print(f"one table, d={DIM}, batch {BATCH}; median ms of the table work per step")
    print(f"{'rows':>9} {'pooling':>7} {'read time':>10} {'lookahead':>10} {'lookahead/read':>15}")
    for rows in (parse_count(r) for r in args.rows.split(",")):
        for pooling in poolings:
            ms = time_workload(rows, pooling, args.steps)
            ratio = ms["lookahead"] / ms["read time"]
            print(
                f"{rows:>9} {pooling:>7} {ms['read time']:>10.2f} {ms['lookahead']:>10.2f} {ratio:>15.2f}"
            )


if __name__ == "__main__":
    main()
