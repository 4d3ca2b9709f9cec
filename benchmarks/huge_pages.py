"""Tables on 4 KiB pages against tables on transparent huge pages (src/lazydp/huge_pages.py).

    python benchmarks/huge_pages.py                 # 10 tables of 1M x 32, pooling 1, ~3 minutes
    python benchmarks/huge_pages.py --scale 0.04 --pooling 20 --steps 20

Builds sgd and lazydp twice each, once with ``LAZYDP_HUGE_PAGES=0`` (tables and history tables on
4 KiB pages) and once with huge pages, and steps all four in turn in one process (each timed step
after an untimed one, as ``lazydp bench``'s interleaving does). Prints the median step and its
row update per model, lazydp / sgd for each page size, and how many MB the kernel really backed
with huge pages (it may give fewer when memory is fragmented).
"""

from __future__ import annotations

import argparse
import os
import statistics

import lazydp
from lazydp.bench.harness import _ModeRunner
from lazydp.bench.memory import meminfo_bytes
from lazydp.bench.workload import BenchSpec


def anon_huge_mb() -> int:
    return (meminfo_bytes("AnonHugePages") or 0) >> 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="rmc1")
    ap.add_argument("--scale", type=float, default=0.013333333)  # rmc1: 10 tables of 1M rows
    ap.add_argument("--pooling", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--embedding-dim", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    lazydp.tune_malloc()  # as `lazydp bench` and the README's training set-up do
    spec = BenchSpec(
        args.config,
        args.scale,
        args.batch_size,
        pooling=args.pooling,
        embedding_dim=args.embedding_dim,
        iterations=args.steps,
        measure_last=args.steps,
    )
    before = anon_huge_mb()
    runners: dict[str, _ModeRunner] = {}
    for pages, flag in (("4K", "0"), ("2M", "1")):
        os.environ["LAZYDP_HUGE_PAGES"] = flag  # read when each table is allocated
        for mode in ("sgd", "lazydp"):
            runners[f"{mode} {pages}"] = _ModeRunner(spec, mode, steps=2 * args.steps)
    os.environ.pop("LAZYDP_HUGE_PAGES")
    print(f"{spec.label}: {anon_huge_mb() - before} MB of tables on huge pages")
    for i in range(args.steps):
        for runner in runners.values():
            runner.step(timed=False)
            runner.step()
        print(f"\rstep {i + 1}/{args.steps}", end="", flush=True)
    print()
    step = {k: statistics.median(r.result.steps_ms) for k, r in runners.items()}
    rows = (
        "forward",
        "backward (per-batch)",
        "update: parameter update",
        "update: lazy bookkeeping",
    )
    print(
        f"{'':10s} {'step':>8s}" + "".join(f" {row.removeprefix('update: '):>18s}" for row in rows)
    )
    for k, r in runners.items():
        parts = [statistics.median(x[row] for x in r.rows) for row in rows]
        print(f"{k:10s} {step[k]:8.2f}" + "".join(f" {v:18.2f}" for v in parts))
    for pages in ("4K", "2M"):
        print(f"lazydp/sgd on {pages} pages: {step[f'lazydp {pages}'] / step[f'sgd {pages}']:.3f}")
    for mode in ("sgd", "lazydp"):
        print(f"{mode} 4K/2M: {step[f'{mode} 4K'] / step[f'{mode} 2M']:.3f}")


if __name__ == "__main__":
    main()
