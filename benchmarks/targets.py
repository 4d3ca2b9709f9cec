"""Issue 6's performance targets, one `lazydp bench` invocation each, summarised as Markdown.

    python benchmarks/targets.py pooling1      # target 1: mlperf/basic, pooling 1, s=0.001/0.01
    python benchmarks/targets.py rmc           # target 1: rmc1-3 with the noise floor
    python benchmarks/targets.py scaling       # targets 2, 3, 6: mlperf scale sweep (minutes)
    python benchmarks/targets.py scaling_basic # target 2, 6: basic scale sweep
    python benchmarks/targets.py growth        # target 2: each mode at s=0.001 and 0.15 in one process
    python benchmarks/targets.py opacus        # target 4: 8 x 100k model against Opacus
    python benchmarks/targets.py mlp_only      # target 5: dpsgd_f on the mlperf MLPs alone
    python benchmarks/targets.py overhead      # lazydp's per-step overhead: batch 4 vs 2048
    python benchmarks/targets.py all

Each writes its CSV/JSON/PNGs to runs/targets-<name>/ and prints the command it ran and the
ratios (paste them into benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lazydp import cli
from lazydp.bench.report import markdown_summary
from lazydp.errors import ConfigError

TARGETS: dict[str, list[str]] = {
    "pooling1": ["--sweep", "configs/bench_pooling1.yaml"],
    "rmc": ["--sweep", "configs/bench_rmc.yaml"],
    "scaling": ["--sweep", "configs/bench_sweep.yaml"],
    "scaling_basic": ["--sweep", "configs/bench_sweep_basic.yaml"],
    "growth": ["--sweep", "configs/bench_growth.yaml"],
    "overhead": ["--sweep", "configs/bench_overhead.yaml"],
    "opacus": [
        "--config",
        "small8",
        "--scale",
        "1",
        "--batch-size",
        "256",
        "--modes",
        "sgd,dpsgd_f,lazydp",
        "--compare",
        "opacus",
        "--iterations",
        "12",
        "--measure-last",
        "8",
        "--statistic",
        "median",
    ],  # fmt: skip
    "mlp_only": [
        "--config",
        "mlperf",
        "--mlp-only",
        "--scale",
        "0.001",
        "--batch-size",
        "2048",
        "--modes",
        "sgd,dpsgd_f",
        "--iterations",
        "20",
        "--measure-last",
        "10",
        "--statistic",
        "median",
        "--interleave",
    ],  # fmt: skip
}


def target_names(names: list[str]) -> list[str]:
    """The targets to run, ``all`` expanded; ConfigError listing the known names for any other
    (checked before anything runs: a typo after a target of minutes should not cost them)."""
    unknown = [n for n in names if n not in TARGETS and n != "all"]
    if unknown:
        raise _unknown(unknown)
    return list(TARGETS) if "all" in names else names


def _unknown(names: list[str]) -> ConfigError:
    return ConfigError(
        f"unknown target {names}; known targets: {', '.join(TARGETS)} (or all, for every one)"
    )


def run(name: str) -> str:
    if name not in TARGETS:
        raise _unknown([name])
    out = Path("runs") / f"targets-{name}"
    argv = ["bench", *TARGETS[name], "--out", str(out), "--no-progress"]
    code = cli.main(argv)
    if code != 0:
        return f"### {name}\n`lazydp {' '.join(argv)}` failed (exit {code})\n"
    summary = json.loads((out / "bench.json").read_text())["summary"]
    return f"### {name}\n\n`lazydp {' '.join(argv)}`\n\n{markdown_summary(summary)}\n"


def main(argv: list[str]) -> None:
    if {"-h", "--help"} & set(argv):
        print(__doc__.strip())  # the usage: each target and what it measures
        return
    try:
        names = target_names(argv or ["all"])
    except ConfigError as exc:
        raise SystemExit(f"targets.py: error: {exc}") from None
    for name in names:
        print(run(name), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
