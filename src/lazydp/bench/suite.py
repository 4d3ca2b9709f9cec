"""A benchmark run: every (workload, mode) measured, the noise floor, Opacus, and the ratios.

Contract:
* ``run_suite(specs, modes, ...)`` measures each workload in each mode (each in its own process by
  default), the noise floor of each workload when ``lazydp`` is among the modes, and Opacus in its
  hooks and ghost modes when ``compare`` names ``opacus``. It never stops for a mode that does not
  fit or fails: that result carries ``status`` and the reason.
* Results are keyed by the whole spec, never by its label alone: specs of one sweep that share a
  label (it omits e.g. ``iterations``, ``lr``, ``seed``) are reported under the label plus the
  fields that tell them apart (``labels_of``); the same point twice is refused.
* ``summarise`` turns the results into the ratios the targets are stated in (step time ratios per
  workload, and peak memory over the model's own bytes per mode). A ratio whose inputs are missing
  is absent, never guessed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from tqdm import tqdm

from lazydp.bench.floor import NoiseFloor, measure_noise_floor
from lazydp.bench.harness import (
    ModeResult,
    Pairs,
    fits_alone,
    memory_together,
    run_interleaved_isolated,
    run_mode,
    time_interleaved,
)
from lazydp.bench.labels import labels_of, scale_key
from lazydp.bench.opacus_compare import OPACUS_MODES, opacus_version, run_opacus, speedups
from lazydp.bench.shared_tables import SHARED_NOTE, can_share
from lazydp.bench.workload import BenchSpec
from lazydp.errors import ConfigError, LazyDPError

COMPARE_WITH = ("opacus",)


@dataclass
class SuiteResult:
    """Everything one ``lazydp bench`` invocation measured."""

    specs: list[BenchSpec]
    modes: list[str]
    results: list[ModeResult] = field(default_factory=list)
    floors: list[NoiseFloor] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def by_label(self, label: str) -> dict[str, ModeResult]:
        return {r.mode: r for r in self.results if r.label == label and r.status == "ok"}

    @cached_property
    def labels(self) -> dict[BenchSpec, str]:
        """Spec -> the (sweep-unique) label its results and floor are reported under; refuses
        the same point twice."""
        return labels_of(self.specs)

    def label(self, spec: BenchSpec) -> str:
        return self.labels[spec]

    def ok(self, spec: BenchSpec) -> dict[str, ModeResult]:
        """Mode -> result of every mode that ran on ``spec``."""
        return self.by_label(self.label(spec))


def run_suite(
    specs: Sequence[BenchSpec],
    modes: Sequence[str],
    *,
    compare: Sequence[str] = (),
    isolate: bool = True,
    interleave: bool | Sequence[str] = False,
    interleave_scales: bool = False,
    progress: bool = True,
    opacus_iterations: tuple[int, int] = (3, 2),
) -> SuiteResult:
    """Measure ``modes`` on every spec (+ noise floor, + Opacus); see the module contract.

    ``interleave`` times the modes of a workload round robin in one process (steadier ratios on a
    shared machine, no per-mode peak RSS): True for all of them, or a list of the modes to time
    together (the others get a process each, e.g. dpsgd_f, whose table-sized noise buffer slows
    whatever shares its process). A group that does not fit in memory at once is timed one mode
    per process instead, with a note. ``interleave_scales`` instead times each mode at every
    scale of a workload in one process, so that its growth with table size comes from one run
    (``summarise``'s ``growth``). ``opacus_iterations`` = (iterations, measure_last) for
    Opacus, whose steps take seconds.
    Example: ``run_suite([BenchSpec("rmc1", 1e-5, 16, pooling=2, iterations=3, measure_last=2)],
    ["sgd", "lazydp"], isolate=False).results[1].mode == "lazydp"``.
    """
    suite = SuiteResult(list(specs), list(modes))
    labels = suite.labels  # before anything runs: refuses the same point twice
    use_opacus = "opacus" in compare
    if use_opacus and opacus_version() is None:
        suite.notes.append(
            "--compare opacus: Opacus is not installed (pip install 'lazydp[bench]'); skipped."
        )
        use_opacus = False
    units = len(specs) * (len(modes) + ("lazydp" in modes) + use_opacus * len(OPACUS_MODES))
    bar = tqdm(total=units, file=sys.stderr, disable=not progress, desc="bench", unit="run")
    timed: dict[tuple[BenchSpec, str], ModeResult] = {}  # by the whole spec, not its label
    for group in _round_robins(specs, modes, interleave, interleave_scales):
        # A point too large on its own is left to run_mode below, which refuses it and says why.
        pairs = [(spec, mode) for spec, mode in group if fits_alone(spec, mode)]
        reason = memory_together(pairs) if len(pairs) > 1 else None
        shared = (
            reason is not None
            and can_share([spec for spec, _ in pairs])
            and memory_together(pairs, shared=True) is None
        )
        if shared:
            reason = None
            suite.notes.append(SHARED_NOTE.format(pairs=", ".join(_columns(pairs, labels))))
        if reason is not None:
            suite.notes.append(f"{reason}, so each was timed in its own process")
        if reason is not None or len(pairs) < 2:
            continue
        bar.set_postfix_str(f"{len(pairs)} interleaved")
        results = _relabel(_interleaved(pairs, isolate, shared), pairs, labels)
        for pair, result in zip(pairs, results, strict=True):
            _say(bar, result)
            timed[pair] = result
            bar.update()
    for spec in specs:
        label = labels[spec]
        for mode in modes:
            if (spec, mode) not in timed:
                bar.set_postfix_str(f"{label} {mode}")
                (result,) = _relabel(
                    [run_mode(spec, mode, isolate=isolate)], [(spec, mode)], labels
                )
                timed[(spec, mode)] = result
                _say(bar, result)
                bar.update()
        suite.results += [timed[(spec, m)] for m in modes]
        # The floor is read against lazydp's step: none where lazydp did not run (and a spec
        # too large for memory is not even sampled).
        if "lazydp" in modes:
            if timed[(spec, "lazydp")].status == "ok":
                bar.set_postfix_str(f"{label} noise floor")
                suite.floors.append(replace(measure_noise_floor(spec), label=label))
            bar.update()
        if use_opacus:
            short = replace(
                spec, iterations=opacus_iterations[0], measure_last=opacus_iterations[1]
            )
            for gsm in OPACUS_MODES:
                bar.set_postfix_str(f"{label} opacus {gsm}")
                (result,) = _relabel(
                    [run_opacus(short, gsm, isolate=isolate)], [(spec, gsm)], labels
                )
                _say(bar, result)
                suite.results.append(result)
                bar.update()
    bar.close()
    return suite


def _round_robins(
    specs: Sequence[BenchSpec],
    modes: Sequence[str],
    interleave: bool | Sequence[str],
    interleave_scales: bool,
) -> list[Pairs]:
    """The groups of (workload, mode) to time in one process each: the interleaved modes of
    every workload, or (``interleave_scales``) each mode at every scale of its workload."""
    together = _interleaved_modes(modes, interleave)
    if not interleave_scales:
        return [[(spec, m) for m in together] for spec in specs] if together else []
    if together:
        raise ConfigError(
            "interleave and interleave_scales both given: time modes together (interleave) or "
            "each mode across the table sizes (interleave_scales), not both"
        )
    groups = [group for group in scale_groups(specs) if len(group) > 1]
    if not groups:  # else every mode ran alone, and no growth was reported, without a word
        raise ConfigError(
            "interleave_scales times each mode at every scale of a workload in one process, but "
            "no workload is swept over two or more scales; list them (e.g. scale: [0.001, 0.15]) "
            "or drop interleave_scales"
        )
    return [[(s, m) for s in group] for group in groups for m in modes]


def scale_groups(specs: Sequence[BenchSpec]) -> list[list[BenchSpec]]:
    """Specs that differ only in scale, grouped (first-seen order), each sorted by scale.

    Example: ``len(scale_groups([BenchSpec(scale=0.1), BenchSpec(scale=0.01)])) == 1``.
    """
    groups: dict[str, list[BenchSpec]] = {}
    for spec in specs:
        groups.setdefault(scale_key(spec.to_dict()), []).append(spec)
    return [sorted(g, key=lambda s: s.scale) for g in groups.values()]


def _interleaved_modes(modes: Sequence[str], interleave: bool | Sequence[str]) -> list[str]:
    """The modes to time round robin in one process (in ``modes`` order); [] for none."""
    if isinstance(interleave, bool):
        return list(modes) if interleave and len(modes) > 1 else []
    unknown = sorted(set(interleave) - set(modes))
    if unknown:
        raise ConfigError(
            f"interleave={list(interleave)}: {unknown} not among the modes {list(modes)}; "
            "interleave a subset of the modes measured (or true for all of them)"
        )
    chosen = set(interleave)
    group = [m for m in modes if m in chosen]
    return group if len(group) > 1 else []


def _interleaved(pairs: Pairs, isolate: bool, shared: bool) -> list[ModeResult]:
    try:
        if isolate:  # run_suite already checked that the group fits (memory_together)
            return run_interleaved_isolated(pairs, shared)
        return time_interleaved(pairs, shared)
    except (LazyDPError, RuntimeError, MemoryError) as exc:
        status = "refused" if isinstance(exc, ConfigError) else "failed"
        return [
            ModeResult(spec.label, m, status, str(exc), spec=spec.to_dict()) for spec, m in pairs
        ]


def _columns(pairs: Pairs, labels: dict[BenchSpec, str]) -> list[str]:
    return [f"{labels[spec]} {mode}" for spec, mode in pairs]


def _relabel(
    results: list[ModeResult], pairs: Sequence[tuple[BenchSpec, str]], labels: dict[BenchSpec, str]
) -> list[ModeResult]:
    """Give each result (made under its spec's bare label) its sweep-unique label, and name its
    round-robin partners by theirs: two specs sharing a label must not share a column."""
    for result, (spec, _) in zip(results, pairs, strict=True):
        result.label = labels[spec]
    for result in results:
        if result.timed_with:
            result.timed_with = [o.column for o in results if o is not result]
    return results


def _say(bar: tqdm, result: ModeResult) -> None:
    if result.status == "ok":
        bar.write(f"{result.column}: {result.step_ms:.1f} ms/step", file=sys.stderr)
    else:
        bar.write(f"{result.column}: {result.status}: {result.message}", file=sys.stderr)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarise(suite: SuiteResult) -> dict[str, Any]:
    """Per workload: step-time ratios and the noise floor; per result: peak memory over model.

    Example: ``summarise(SuiteResult([], []))["workloads"] == []``.
    """
    floors = {f.label: f for f in suite.floors}
    workloads = []
    for spec in suite.specs:
        ms = {m: r.step_ms for m, r in suite.ok(spec).items()}
        floor = floors.get(suite.label(spec))
        floor_ms = floor.floor_ms if floor else None
        sgd_floor = ms["sgd"] + floor_ms if "sgd" in ms and floor_ms is not None else None
        row: dict[str, Any] = {
            "label": suite.label(spec),
            "config": spec.config,
            "scale": spec.scale,
            "table_bytes": spec.table_bytes(),
            "step_ms": ms,
            "noise_floor_ms": floor_ms,
            "lazydp_over_sgd": _ratio(ms.get("lazydp"), ms.get("sgd")),
            "lazydp_over_sgd_plus_floor": _ratio(ms.get("lazydp"), sgd_floor),
            "dpsgd_f_over_lazydp": _ratio(ms.get("dpsgd_f"), ms.get("lazydp")),
            "dpsgd_f_over_sgd": _ratio(ms.get("dpsgd_f"), ms.get("sgd")),
        }
        workloads.append({k: v for k, v in row.items() if v is not None})
    memory = [_memory_row(r) for r in suite.results if r.status == "ok" and r.peak_rss_bytes]
    return {
        "workloads": workloads,
        "growth": _growth(suite),
        "memory": memory,
        "opacus": speedups(suite.results),
        "notes": suite.notes,
    }


def _growth(suite: SuiteResult) -> list[dict[str, Any]]:
    """Per mode, its step time at the largest scale of a workload over that at the smallest
    (target 2); ``side_by_side`` when both were timed in one round robin (interleave_scales)."""
    rows = []
    for group in scale_groups(suite.specs):
        if len(group) < 2:
            continue
        small, large = suite.ok(group[0]), suite.ok(group[-1])
        for mode in suite.modes:
            if mode in small and mode in large:
                a, b = small[mode], large[mode]
                rows.append({
                    "mode": mode, "from": a.label, "to": b.label,
                    "from_ms": a.step_ms, "to_ms": b.step_ms,
                    "growth": b.step_ms / a.step_ms - 1.0,
                    "side_by_side": b.column in a.timed_with,
                })  # fmt: skip
    return rows


def _memory_row(r: ModeResult) -> dict[str, Any]:
    """Peak RSS above the pre-model baseline, against issue 6's allowance for the mode: tables
    (+ history table for lazydp, + one table for dpsgd_*; our eager path holds no such buffer,
    bench/memory.py, so dpsgd_f's ratio sits well below 1)."""
    largest = 0
    if r.table_bytes and r.spec:
        spec = BenchSpec(**r.spec)
        cfg = spec.model_config
        largest = max(cfg.table_rows) * cfg.embedding_dim * 4
    allowance = r.table_bytes + r.history_bytes + (largest if r.mode.startswith("dpsgd") else 0)
    above = r.peak_rss_bytes - r.baseline_rss_bytes
    return {
        "column": r.column,
        "peak_rss_bytes": r.peak_rss_bytes,
        "baseline_rss_bytes": r.baseline_rss_bytes,
        "table_bytes": r.table_bytes,
        "history_bytes": r.history_bytes,
        "allowance_bytes": allowance,
        "peak_above_baseline_over_allowance": above / allowance if allowance else None,
        "isolated": r.isolated,
    }
