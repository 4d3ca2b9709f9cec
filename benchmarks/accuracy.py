"""Utility of private training on the built-in real datasets: sgd vs lazydp at epsilon 1, 3, 8.

    python benchmarks/accuracy.py [--out runs/accuracy] [--seeds 3]

Each row is `lazydp train --dataset D --mode M [--target-epsilon E]` with the dataset's defaults
(delta = 1/N rounded down to a power of ten). Writes accuracy.csv, accuracy.md and accuracy.png.
Seeds only fix model initialisation and the reported mean/std; noise and sampling stay OS-seeded.
"""

from __future__ import annotations

import argparse
import csv
import logging
import shutil
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lazydp.train_config import DATASET_DEFAULTS, TrainConfig  # noqa: E402
from lazydp.training import run  # noqa: E402

SETTINGS = [("sgd", None), ("lazydp", 1.0), ("lazydp", 3.0), ("lazydp", 8.0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/accuracy")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("absl").setLevel(logging.ERROR)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for dataset, metric in (("movielens", "auc"), ("acs", "accuracy")):
        for mode, eps in SETTINGS:
            values, loglosses, report = [], [], {}
            for seed in range(args.seeds):
                run_dir = out / f"{dataset}-{mode}-{eps}-{seed}"
                shutil.rmtree(run_dir, ignore_errors=True)
                cfg = TrainConfig(
                    dataset=dataset,
                    mode=mode,
                    target_epsilon=eps,
                    out=str(run_dir),
                    progress=False,
                    model_seed=seed,
                    **DATASET_DEFAULTS[dataset],
                )
                report = run(cfg)
                values.append(report["test"][metric])
                loglosses.append(report["test"]["logloss"])
            command = f"lazydp train --dataset {dataset} --mode {mode}" + (
                f" --target-epsilon {eps:g}" if eps else ""
            )
            rows.append(
                {
                    "dataset": dataset,
                    "metric": metric,
                    "mode": mode,
                    "epsilon": "inf" if eps is None else eps,
                    "delta": report["privacy"]["delta"],
                    "mean": round(statistics.mean(values), 4),
                    "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
                    "logloss": round(statistics.mean(loglosses), 4),
                    "runs": len(values),
                    "command": command,
                }
            )
            print(rows[-1], flush=True)
    with open(out / "accuracy.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| dataset | metric | mode | epsilon | delta | mean | std | log-loss | runs | command |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['dataset']} | {r['metric']} | {r['mode']} | {r['epsilon']} | {r['delta']:.0e} | "
        f"{r['mean']:.4f} | {r['std']:.4f} | {r['logloss']:.4f} | {r['runs']} | `{r['command']}` |"
        for r in rows
    ]
    (out / "accuracy.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, dataset in zip(axes, ("movielens", "acs")):
        sel = [r for r in rows if r["dataset"] == dataset]
        labels = [f"{r['mode']}\neps={r['epsilon']}" for r in sel]
        ax.bar(labels, [r["mean"] for r in sel], yerr=[r["std"] for r in sel], color="#4c72b0")
        ax.set_title(f"{dataset}: test {sel[0]['metric']}")
        ax.set_ylim(0.4, 0.85)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
