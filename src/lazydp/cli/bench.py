"""``lazydp bench``: latency breakdowns of the training modes on the LazyDP paper's workloads.

Example:
    $ lazydp bench --config rmc1 --scale 0.01 --batch-size 2048 --pooling 20
    $ lazydp bench --config small8 --scale 1 --batch-size 256 --modes sgd,lazydp --compare opacus
    $ lazydp bench --sweep configs/bench_sweep.yaml --json
Writes breakdown.csv, bench.json, breakdown.png (and scaling.png for a sweep over --scale) to --out.
A sweep file takes the flags' names as keys (lists are swept); its ``interleave`` may also name
the modes to time together, e.g. ``interleave: [sgd, lazydp]`` (configs/bench_lazy_vs_eager.yaml);
``interleave_scales: true`` times each mode at every swept scale in one process instead, so a
mode's growth with table size comes from one run (configs/bench_growth.yaml).
"""

from __future__ import annotations

import argparse
import itertools
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from types import FrameType
from typing import Any

from lazydp import _validate as v
from lazydp.bench.harness import BENCH_MODES, ModeResult
from lazydp.bench.workload import BENCH_CONFIGS, PLACEMENTS, STATISTICS, BenchSpec
from lazydp.cli import add_json_flag, load_yaml_mapping
from lazydp.errors import ConfigError, LazyDPError
from lazydp.stop_signals import StoppedBySignal, handling

EPILOG = """example (2 shared cores, no GPU; numbers from benchmarks/RESULTS.md):
  $ lazydp bench --config mlperf --scale 0.001 --batch-size 2048 --iterations 20 \\
        --measure-last 10 --statistic median --interleave
  mlperf s=0.001 B=2048 L=1 (ms)                       sgd       dpsgd_f        lazydp
  forward                                          154.203       144.267       157.500
  backward (per-example)                             0.000        28.166        26.025
  backward (per-batch)                             330.819       337.024       336.225
  update                                             8.171       133.160        46.733
  update: noise sampling                             0.000       121.740        14.870
  ...
  total                                            493.194       642.618       566.484
  mlperf s=0.001 B=2048 L=1: lazydp/sgd 1.15   lazydp/(sgd+floor) 1.13   dpsgd_f/lazydp 1.13   dpsgd_f/sgd 1.30
  wrote runs/bench-<timestamp>/breakdown.csv, .../bench.json, .../breakdown.png

sweep file (YAML; a list value sweeps that key, flags given on the command line win):
  modes: [sgd, dpsgd_f, lazydp]
  config: mlperf
  scale: [0.001, 0.01, 0.05]
  iterations: 8
  measure_last: 4
"""

SPEC_KEYS = {f.name for f in fields(BenchSpec)}
SWEEP_KEYS = SPEC_KEYS | {
    "modes", "compare", "opacus_iterations", "interleave", "interleave_scales",
}  # fmt: skip
# A sweep file's keys are the flags' names, and a flag whose dest differs from its name is
# accepted under both (the file's key -> the option it sets).
SWEEP_ALIASES = {"mlp_only": "dense_only"}
DEFAULT_MODES = "sgd,dpsgd_f,lazydp"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time sgd / dpsgd_* / lazydp steps on the paper's DLRM workloads (latency breakdown)",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", choices=BENCH_CONFIGS, help="workload (default rmc1)")
    p.add_argument("--scale", type=float, help="table rows x scale (1 = paper, ~96 GB)")
    p.add_argument("--batch-size", type=int, help="fixed batch size (default 2048)")
    p.add_argument("--pooling", type=int, help="ids per bag (default: the config's)")
    p.add_argument("--embedding-dim", type=int, help="override d (default: the config's)")
    p.add_argument("--table-momentum", type=float, help="SGD momentum of the tables (default 0)")
    p.add_argument("--locality", help="uniform (default), zipf:<a> or movielens")
    p.add_argument("--modes", help=f"comma-separated, from {','.join(BENCH_MODES)}")
    p.add_argument("--iterations", type=int, help="steps per mode (default 30)")
    p.add_argument("--measure-last", type=int, help="average the last N steps (default 10)")
    p.add_argument("--statistic", choices=STATISTICS,
                   help="mean (default, the paper's), median or min of the measured steps")  # fmt: skip
    p.add_argument("--placement", choices=PLACEMENTS,
                   help="cpu (default), or split: the MLPs on the GPU and the tables in host "
                   "memory, the paper's set-up (needs CUDA)")  # fmt: skip
    p.add_argument("--mlp-only", dest="dense_only", action="store_true", default=None,
                   help="drop the tables: the config's MLPs on dense input only")  # fmt: skip
    p.add_argument("--compare", choices=["opacus"], help="also time Opacus (hooks and ghost)")
    p.add_argument("--opacus-iterations", type=int, help="Opacus steps (default 3, last 2 timed)")
    p.add_argument("--sweep", help="YAML file: keys as the flags, a list value sweeps that key")
    p.add_argument("--out", help="output directory (default runs/bench-<timestamp>)")
    p.add_argument("--no-isolate", dest="isolate", action="store_false",
                   help="measure in this process (faster start; peak RSS then mixes modes)")  # fmt: skip
    p.add_argument("--interleave", action="store_true", default=None,
                   help="one process, modes round robin step by step: steadier ratios on a "
                   "shared machine (each timed step after an untimed one of the same mode); no "
                   "per-mode peak memory")  # fmt: skip
    p.add_argument("--no-progress", dest="progress", action="store_false")
    add_json_flag(p)
    p.set_defaults(func=run)


def _modes(value: Any, name: str = "--modes") -> list[str]:
    if not isinstance(value, str | list | tuple) or not all(isinstance(m, str) for m in value):
        raise ConfigError(
            f"{name}={value!r}: expected mode names, comma-separated or a list, from "
            f"{','.join(BENCH_MODES)}"
        )
    modes = value.split(",") if isinstance(value, str) else list(value)
    modes = [m.strip() for m in modes if m.strip()]
    bad = [m for m in modes if m not in BENCH_MODES]
    if bad or not modes:
        raise ConfigError(
            f"{name}={value!r}: {bad or 'empty'} not known; use a comma-separated subset of "
            f"{','.join(BENCH_MODES)}"
        )
    # A mode named twice would be timed once yet reported twice (two equal columns and results).
    twice = sorted({m for m in modes if modes.count(m) > 1})
    if twice:
        raise ConfigError(f"{name}={value!r}: {twice} named more than once; name each mode once")
    return modes


def _interleave(value: Any) -> bool | list[str]:
    """A sweep's ``interleave``: true/false, or the modes to time together (list or "a,b")."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    return _modes(value, "interleave")


def _compare(value: Any) -> list[str]:
    """``--compare`` / a sweep's ``compare``: libraries to time too (a name or a list)."""
    from lazydp.bench.suite import COMPARE_WITH

    names = [value] if isinstance(value, str) else value if isinstance(value, list) else None
    if names is None or any(n not in COMPARE_WITH for n in names):
        raise ConfigError(f"compare={value!r}: expected one or more of {list(COMPARE_WITH)}")
    return list(names)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r}: expected true or false")
    return value


def load_sweep(path: str) -> dict[str, Any]:
    """Read a sweep YAML (a flag's name, e.g. ``mlp_only``, read as the option it sets); unknown
    keys, and a flag's name given beside its option's, are refused."""
    doc = load_yaml_mapping(path, "--sweep")
    known = SWEEP_KEYS | set(SWEEP_ALIASES)
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ConfigError(f"--sweep {path}: unknown keys {unknown}; known: {sorted(known)}")
    for alias, key in SWEEP_ALIASES.items():
        if alias in doc and key in doc:
            raise ConfigError(
                f"--sweep {path}: {alias} and {key} are the same option (one would be silently "
                "ignored); give one"
            )
    # Renamed in place: the swept keys' file order is the order of build_specs' product.
    return {SWEEP_ALIASES.get(k, k): val for k, val in doc.items()}


def build_specs(options: dict[str, Any]) -> list[BenchSpec]:
    """The cartesian product of every list-valued spec option (in file order).

    Example: ``len(build_specs({"config": "rmc1", "scale": [0.001, 0.01]})) == 2``.
    """
    spec_opts = {k: v for k, v in options.items() if k in SPEC_KEYS and v is not None}
    swept = {k: v for k, v in spec_opts.items() if isinstance(v, list)}
    empty = sorted(k for k, v in swept.items() if not v)
    if empty:
        raise ConfigError(f"bench options {empty} are empty lists: give at least one value each")
    fixed = {k: v for k, v in spec_opts.items() if k not in swept}
    try:
        return [
            BenchSpec(**fixed, **dict(zip(swept, values)))
            for values in itertools.product(*swept.values())
        ]
    except TypeError as exc:
        raise ConfigError(f"bench options {spec_opts}: {exc}") from None


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lazydp.bench.report import format_table, growth_line, times, write_all
    from lazydp.bench.suite import run_suite, summarise
    from lazydp.cli.env import collect
    from lazydp.train_config import check_output_dir

    options: dict[str, Any] = load_sweep(args.sweep) if args.sweep else {}
    for key in SWEEP_KEYS:  # flags given on the command line override the file
        if getattr(args, key, None) is not None:
            options[key] = getattr(args, key)
    options.setdefault("config", "rmc1")
    modes = _modes(options.pop("modes", DEFAULT_MODES))
    compare = options.pop("compare", None)
    compare_with = [] if compare is None else _compare(compare)
    opacus_its = options.pop("opacus_iterations", None)
    opacus_its = 3 if opacus_its is None else v.check_positive_int("opacus_iterations", opacus_its)
    interleave = _interleave(options.pop("interleave", False))
    interleave_scales = _flag("interleave_scales", options.pop("interleave_scales", False))
    together = modes if interleave is True else interleave or []
    if "lazydp" in together and any(m.startswith("dpsgd") for m in together):
        # Measured (benchmarks/RESULTS.md): with dpsgd_f's model in the same process lazydp's
        # steps ran 20-30% slower than in real training, which never shares a process so.
        print(
            "lazydp bench: note: lazydp is interleaved with a dpsgd_* mode; sharing the "
            "process slowed lazydp's steps by 20-30% here. For lazydp/sgd ratios interleave "
            "only those two (a sweep file's `interleave: [sgd, lazydp]`).",
            file=sys.stderr,
        )
    specs = build_specs(options)
    # Refuse an unusable output directory now, not after the whole benchmark has run.
    out = check_output_dir(args.out or f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}")
    if not args.sweep:  # a single configuration that cannot fit is refused outright
        _refuse_what_does_not_fit(specs[0], modes)
    with _stop_on_signals():
        suite = run_suite(
            specs,
            modes,
            compare=compare_with,
            isolate=args.isolate,
            interleave=interleave,
            interleave_scales=interleave_scales,
            progress=args.progress,
            opacus_iterations=(max(1, opacus_its), max(1, opacus_its - 1)),
        )
    summary = summarise(suite)
    try:
        paths = write_all(suite, summary, collect(), out)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write the results ({exc})") from None
    print(format_table(suite))
    for w in summary["workloads"]:
        print(_ratios_line(w))
    for g in summary["growth"]:
        print(growth_line(g))
    for row in summary["opacus"]:
        ratio = row.get("opacus_over_lazydp")
        if ratio:
            print(f"{row['label']}: {row['opacus_mode']}/lazydp {times(ratio)}")
    for note in summary["notes"] + [
        f"{r.column}: {r.status}: {r.message}" for r in suite.results if r.status != "ok"
    ]:
        print(note)
    print(f"wrote {', '.join(paths.values())}")
    _fail_if_nothing_ran(suite.results, paths["json"])
    return {"out": str(out), "files": paths, "summary": summary}


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Ctrl-C and SIGTERM stop the run at once, as an exception: the child process measuring a
    mode is then killed (subprocess.run kills it on any exception) and its temporary directory
    removed. SIGTERM's default action (``timeout``, a scheduler, ``kill``) ended this process
    alone, and the child ran on, orphaned, to the end of its mode: minutes, with a model that
    may fill the machine's memory."""

    def stop(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        raise StoppedBySignal(
            f"stopped by {name} before every measurement was done; nothing was written "
            "(the results are written once the whole run has been measured)",
            signum,
        )

    with handling(stop, (signal.SIGINT, signal.SIGTERM)):
        yield


def _refuse_what_does_not_fit(spec: BenchSpec, modes: list[str]) -> None:
    """ConfigError naming EVERY mode that would not fit, each with its own scale advice (the
    largest scale that fits differs per mode: lazydp's history table, dpsgd_b's per-example gradients)."""
    from lazydp.bench.harness import check_fits

    problems = []
    for mode in modes:
        try:
            check_fits(spec, mode)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))


def _fail_if_nothing_ran(results: list[ModeResult], json_path: str) -> None:
    """A run in which no measurement succeeded exits non-zero (scripts and CI must notice);
    the files, with every reason, are written first. ConfigError if all were refused."""
    if not results or any(r.status == "ok" for r in results):
        return
    refused = all(r.status == "refused" for r in results)
    error = ConfigError if refused else LazyDPError
    raise error(
        f"no measurement succeeded: all {len(results)} were refused or failed (reasons above "
        f"and in {json_path})"
    )


def _ratios_line(w: dict[str, Any]) -> str:
    names = {
        "lazydp_over_sgd": "lazydp/sgd",
        "lazydp_over_sgd_plus_floor": "lazydp/(sgd+floor)",
        "dpsgd_f_over_lazydp": "dpsgd_f/lazydp",
        # Eager DP-SGD's cost without lazydp in the run (--mlp-only --modes sgd,dpsgd_f printed
        # "no ratios (modes missing)"; the README quotes this ratio for MLP-only models).
        "dpsgd_f_over_sgd": "dpsgd_f/sgd",
    }
    parts = [f"{label} {w[key]:.2f}" for key, label in names.items() if key in w]
    return f"{w['label']}: " + ("   ".join(parts) if parts else "no ratios (modes missing)")
