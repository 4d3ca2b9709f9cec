"""Writers for a benchmark run: CSV and JSON in the paper's layout, and PNG figures.

Contract:
* ``breakdown.csv``: first column ``row (ms)`` (``harness.BREAKDOWN_ROWS``, milliseconds), then
  one column per measured (workload, mode) in run order, named ``"<workload label> <mode>"``.
  Modes that were refused or failed get no column (the JSON says why). Opacus columns carry only
  the rows they have (forward, update, total, and their own row ``OPACUS_BACKWARD_ROW``, added
  last when Opacus ran), others are empty.
* ``bench.json``: the same breakdown (``columns``), every result with status, message, peak RSS
  and memory estimate, the noise floors, the summary ratios, and the machine
  (``lazydp.cli.env.collect()``).
* ``breakdown.png``: stacked bars per column (the paper's figure style), absolute milliseconds
  above, share of the step below. ``scaling.png`` (only when a workload ran at two or more
  scales): step time against table bytes, one line per mode and scale group (specs equal but for
  scale, as ``suite.scale_groups``), log-log.
Figures use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from lazydp._plots import pyplot
from lazydp.bench.harness import BREAKDOWN_ROWS, CATCH_UP_NOISE_ROW, CATCH_UP_ROW
from lazydp.bench.labels import distinct_names, scale_key
from lazydp.bench.opacus_compare import OPACUS_BACKWARD_ROW
from lazydp.bench.suite import SuiteResult
from lazydp.bench.workload import BenchSpec
from lazydp.report import json_text

# Rows stacked in the bar chart: they partition the step (catch-up is inside lazy bookkeeping).
STACKED = tuple(
    r for r in BREAKDOWN_ROWS if r not in ("update", "total", CATCH_UP_ROW, CATCH_UP_NOISE_ROW)
)  # fmt: skip


def columns(suite: SuiteResult) -> dict[str, dict[str, float]]:
    """Column name -> {row: ms} for every result that ran."""
    return {r.column: dict(r.breakdown_ms) for r in suite.results if r.status == "ok"}


def write_csv(suite: SuiteResult, path: Path) -> Path:
    """The paper-layout CSV (rows x (workload, mode) columns, ms)."""
    cols = columns(suite)
    rows = [*BREAKDOWN_ROWS, OPACUS_BACKWARD_ROW] if _has_opacus(suite) else BREAKDOWN_ROWS
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row (ms)", *cols])
        for row in rows:
            w.writerow([row, *(_fmt(c.get(row)) for c in cols.values())])
    return path


def _has_opacus(suite: SuiteResult) -> bool:
    return any(r.mode.startswith("opacus_") and r.status == "ok" for r in suite.results)


def _fmt(x: float | None) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def write_json(
    suite: SuiteResult, summary: dict[str, Any], machine: dict[str, Any], path: Path
) -> Path:
    """Everything measured, plus the summary ratios and the machine description."""
    doc = {
        "rows": list(BREAKDOWN_ROWS),
        "columns": columns(suite),
        "results": [r.to_dict() for r in suite.results],
        "noise_floors": [f.to_dict() for f in suite.floors],
        "summary": summary,
        "machine": machine,
    }
    path.write_text(json_text(doc, indent=2))
    return path


def plot_breakdown(suite: SuiteResult, path: Path) -> Path:
    """Stacked bars of the breakdown per column: absolute ms (top), share of the step (bottom)."""
    plt = pyplot()
    results = [r for r in suite.results if r.status == "ok" and not r.mode.startswith("opacus")]
    names = [r.column.replace(" ", "\n", 1) for r in results]
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 1.2 * len(results) + 2), 8), sharex=True)
    for ax, share in zip(axes, (False, True)):
        bottom = [0.0] * len(results)
        for row in STACKED:
            vals = [max(0.0, r.breakdown_ms.get(row, 0.0)) for r in results]
            if share:
                vals = [100 * v / max(r.step_ms, 1e-12) for v, r in zip(vals, results)]
            ax.bar(range(len(results)), vals, bottom=bottom, label=row)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_ylabel("% of step" if share else "ms per step")
    stats = sorted({str(r.spec.get("statistic", "mean")) for r in results}) or ["mean"]
    axes[0].set_title(f"Latency breakdown per training mode ({'/'.join(stats)} of measured steps)")
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[1].set_xticks(range(len(results)), names, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scaling_lines(suite: SuiteResult) -> dict[str, list[tuple[float, float]]]:
    """Legend -> (table bytes, step ms) sorted, per (scale group, mode) timed at >= 2 sizes.

    Points join a line only if their specs differ in scale alone (``labels.scale_key``): a line
    through two localities, dims or poolings would zigzag between workloads.
    """
    points: dict[tuple[str, str], list[tuple[float, float]]] = {}
    specs: dict[tuple[str, str], dict[str, Any]] = {}
    for r in suite.results:
        if r.status != "ok" or not r.table_bytes:
            continue
        key = (scale_key(r.spec), r.mode)
        points.setdefault(key, []).append((r.table_bytes, r.step_ms))
        specs.setdefault(key, {**r.spec, "scale": None, "mode": r.mode})
    keys = [k for k, v in points.items() if len({x for x, _ in v}) >= 2]
    # Legend: the workload's label without its scale; lines it would not tell apart get the
    # fields that differ between them.
    names = [f"{_unscaled_label(specs[k])} {k[1]}" for k in keys]
    legends = distinct_names(names, [specs[k] for k in keys])
    return {name: sorted(points[k]) for name, k in zip(legends, keys, strict=True)}


def _unscaled_label(spec: dict[str, Any]) -> str:
    fields = {k: v for k, v in spec.items() if k not in ("scale", "mode")}
    label = BenchSpec(**fields).label
    return " ".join(word for word in label.split(" ") if not word.startswith("s="))


def plot_scaling(suite: SuiteResult, path: Path) -> Path | None:
    """Step time vs table bytes per (scale group, mode); None unless some workload ran at >= 2
    scales."""
    lines = scaling_lines(suite)
    if not lines:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for key, pts in sorted(lines.items()):
        ax.plot([x / 2**30 for x, _ in pts], [y for _, y in pts], marker="o", label=key)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("embedding tables (GiB, fp32)")
    ax.set_ylabel("ms per step")
    ax.set_title("Step time vs table size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(
    suite: SuiteResult, summary: dict[str, Any], machine: dict[str, Any], out: Path
) -> dict[str, str]:
    """Write CSV, JSON and PNGs into ``out`` (created); returns {kind: path}."""
    out.mkdir(parents=True, exist_ok=True)
    # A scaling.png of an earlier run into the same --out would sit beside results it no
    # longer describes when this run draws none.
    (out / "scaling.png").unlink(missing_ok=True)
    paths: dict[str, Path | None] = {
        "csv": write_csv(suite, out / "breakdown.csv"),
        "json": write_json(suite, summary, machine, out / "bench.json"),
        "breakdown_png": plot_breakdown(suite, out / "breakdown.png"),
        "scaling_png": plot_scaling(suite, out / "scaling.png"),
    }
    return {k: str(p) for k, p in paths.items() if p is not None}


def format_table(suite: SuiteResult) -> str:
    """The breakdown as fixed-width text, one block per workload (what the CLI prints)."""
    blocks = []
    width = max(len(r) for r in (*BREAKDOWN_ROWS, OPACUS_BACKWARD_ROW))
    for spec in suite.specs:
        label = suite.label(spec)
        results = [r for r in suite.results if r.label == label and r.status == "ok"]
        if not results:
            continue
        head = "".join(f"{r.mode:>14}" for r in results)
        lines = [f"{label} (ms)".ljust(width) + head]
        # Opacus's one backward row too, or its forward + update would not add up to its total
        opacus = any(r.mode.startswith("opacus") for r in results)
        for row in [*BREAKDOWN_ROWS, OPACUS_BACKWARD_ROW] if opacus else BREAKDOWN_ROWS:
            vals = "".join(f"{_fmt(r.breakdown_ms.get(row)) or '-':>14}" for r in results)
            lines.append(f"{row:<{width}}{vals}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) if blocks else "(nothing measured)"


RATIO_KEYS = (
    "lazydp_over_sgd",
    "lazydp_over_sgd_plus_floor",
    "dpsgd_f_over_lazydp",
    "dpsgd_f_over_sgd",
)


def times(ratio: float) -> str:
    """A speed ratio as printed: whole for 10x and above, two decimals below (``1.55x``, not the
    ``2x`` that rounding to whole numbers made of it).

    Example: ``times(48.3) == "48x" and times(0.43) == "0.43x"``.
    """
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.2f}x"


def growth_line(g: dict[str, Any]) -> str:
    """One mode's growth with table size, e.g. ``lazydp: 110.0 -> 118.0 ms (+7.3%) ...``."""
    how = "in one process, interleaved" if g["side_by_side"] else "in separate processes"
    return (
        f"{g['mode']}: {g['from_ms']:.1f} -> {g['to_ms']:.1f} ms ({100 * g['growth']:+.1f}%) "
        f"from {g['from']} to {g['to']} ({how})"
    )


def markdown_summary(summary: dict[str, Any]) -> str:
    """The summary ratios as a Markdown table (what benchmarks/*.py paste into RESULTS.md).

    Example: ``markdown_summary({"workloads": [], "memory": [], "opacus": []})`` is a header.
    """
    modes = ("sgd", "dpsgd_f", "lazydp")
    head = "| workload | tables GB | " + " | ".join(f"{m} ms" for m in modes)
    head += " | floor ms | lazydp/sgd | lazydp/(sgd+floor) | dpsgd_f/lazydp | dpsgd_f/sgd |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for w in summary["workloads"]:
        ms = w.get("step_ms", {})
        cells = [w["label"], f"{w['table_bytes'] / 1e9:.3g}"]
        cells += [f"{ms[m]:.1f}" if m in ms else "-" for m in modes]
        cells.append(f"{w['noise_floor_ms']:.1f}" if "noise_floor_ms" in w else "-")
        for key in RATIO_KEYS:
            cells.append(f"{w[key]:.2f}" if key in w else "-")
        lines.append("| " + " | ".join(cells) + " |")
    for g in summary.get("growth", []):
        lines.append("\n" + growth_line(g))
    for m in summary.get("memory", []):
        ratio = m["peak_above_baseline_over_allowance"]
        if ratio is not None:
            lines.append(
                f"\npeak memory {m['column']}: {m['peak_rss_bytes'] / 1e9:.2f} GB peak RSS, "
                f"{(m['peak_rss_bytes'] - m['baseline_rss_bytes']) / 1e9:.2f} GB above the "
                f"interpreter = {ratio:.2f} x allowance ({m['allowance_bytes'] / 1e9:.2f} GB)"
            )
    for o in summary.get("opacus", []):
        parts = [
            f"{k.removeprefix('opacus_over_')} {times(v)}" for k, v in o.items() if "_over_" in k
        ]
        lines.append(
            f"\n{o['label']} {o['opacus_mode']}: {o['opacus_ms']:.0f} ms/step; " + ", ".join(parts)
        )
    return "\n".join(lines)
