"""``lazydp audit``: an empirical privacy audit of this installation (lazydp/audit.py).

Trains canaries in the chosen mode with real (OS-entropy) noise and tests the released rows
against the run's own (epsilon, delta) claim and its specification (noise size, shifts, no
reused noise). Writes audit.json (every figure), audit.csv (one row per threshold),
audit_scores.csv (every canary's score) and audit.png (the claimed trade-off curve with the
measured points, and the score histograms) to --out. Exits 1, after writing them, when the audit
refutes the claim or finds the release off its specification (with --plant: when it misses the
planted bug).

Example:
    $ lazydp audit --mode lazydp --out runs/audit
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from lazydp.cli import add_json_flag
from lazydp.errors import ConfigError, PrivacyError
from lazydp.report import json_text

EXAMPLE = """\
examples:
  $ lazydp audit                       # lazydp, 20000 canaries, 4 full-batch steps, sigma 2
  $ lazydp audit --mode dpsgd_f --layer linear --canaries 4000
  $ lazydp audit --sample-rate 0.25 --steps 16 --noise-multiplier 1   # Poisson batches
  $ lazydp audit --lr 0.5 --momentum 0.9 --weight-decay 0.01           # LazyDP's momentum
  $ lazydp audit --nproc-per-node 2 --layer sharded_bag                # distributed, sharded
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from lazydp.audit import LAYERS

    p = sub.add_parser(
        "audit",
        help="empirical privacy audit: train canaries, test the release against the claim",
        description=(
            "Train canaries (each touching its own row; a random half of them is the data "
            "set) with DP-SGD in MODE, then test how well an attacker who sees the released "
            "rows tells present canaries from absent ones against the (epsilon, delta) the run "
            "claims, and whether the release matches its specification (noise size, shifts, no "
            "reused noise). A pass shows this attacker did no better than the claim allows; a "
            "failure refutes the claim or finds a mismatch (a bug: please report it with "
            "audit.json)."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--mode", default="lazydp", help="dpsgd_b, dpsgd_r, dpsgd_f or lazydp")
    p.add_argument(
        "--layer",
        default="embedding",
        choices=LAYERS,
        help="the canaries' layer (mixed: a row in an Embedding and one in an EmbeddingBag "
        "read twice; sharded_bag: row-sharded over the --nproc-per-node ranks)",
    )
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        help="audit distributed training: this many torchrun ranks (gloo, or NCCL with CUDA)",
    )
    p.add_argument("--canaries", type=int, default=20_000, help="number of canaries (>= 100)")
    p.add_argument("--steps", type=int, default=4, help="DP-SGD steps")
    p.add_argument("--dim", type=int, default=4, help="values per canary row (>= 3 to check twins)")
    p.add_argument("--noise-multiplier", type=float, default=2.0, help="sigma")
    p.add_argument(
        "--sample-rate", type=float, default=1.0, help="Poisson rate q (1: full batches)"
    )
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip bound C")
    p.add_argument("--lr", type=float, default=1.0, help="SGD learning rate")
    p.add_argument(
        "--lr-gamma", type=float, default=1.0, help="lr times this after every step (decay)"
    )
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=0.0, help="SGD weight decay")
    p.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    p.add_argument(
        "--loss-reduction", default="sum", choices=("sum", "mean"), help="as in make_private"
    )
    p.add_argument(
        "--resume-at", type=int, help="checkpoint after this step and finish in a fresh engine"
    )
    p.add_argument("--delta", type=float, default=1e-5, help="delta of the reported epsilons")
    p.add_argument(
        "--confidence", type=float, default=0.999, help="confidence of all bounds together"
    )
    p.add_argument("--seed", type=int, help="the auditor's choices (not the training noise)")
    p.add_argument(
        "--noise-seed",
        type=int,
        help="seed the training's noise and Poisson sampling too (default: OS entropy), so that "
        "the whole audit can be re-run exactly: to look into a failed audit, not for a private "
        "release",
    )
    p.add_argument(
        "--plant",
        metavar="BUG[=F]",
        help="train with a known privacy bug (noise=F, clip=F, roll, reuse, sample=F, epsilon=F, "
        "flush, catch_up, velocity, momentum_noise=F; see lazydp/planted.py) to see the audit "
        "fail",
    )
    p.add_argument("--out", help="output directory (default runs/audit-<timestamp>)")
    add_json_flag(p)
    p.set_defaults(func=run)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The training settings of the audit (AuditSpec's fields but mode), from the flags."""
    return {
        "canaries": args.canaries,
        "steps": args.steps,
        "noise_multiplier": args.noise_multiplier,
        "sample_rate": args.sample_rate,
        "max_grad_norm": args.max_grad_norm,
        "lr": args.lr,
        "lr_gamma": args.lr_gamma,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "nesterov": args.nesterov,
        "layer": args.layer,
        "dim": args.dim,
        "resume_at": args.resume_at,
        "loss_reduction": args.loss_reduction,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from contextlib import nullcontext

    from lazydp.audit import canary_audit, check_claim, check_seeds, check_spec
    from lazydp.planted import check_plant_applies, parse_plant, planted_bug
    from lazydp.train_config import check_output_dir

    out = check_output_dir(args.out or f"runs/audit-{time.strftime('%Y%m%d-%H%M%S')}")
    # Everything is checked here, before any worker starts (they would each say it, or hang).
    spec = check_spec(args.mode, **_options(args))
    check_claim(args.delta, args.confidence)  # not after "auditing ..." has been printed
    check_seeds(args.seed, args.noise_seed)  # nor in every torchrun worker, after their start
    if args.nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node must be >= 1; got {args.nproc_per_node}.")
    if args.layer == "sharded_bag" and args.nproc_per_node < 2:
        raise ConfigError("--layer sharded_bag splits rows over ranks: use --nproc-per-node >= 2.")
    if args.resume_at is not None and args.nproc_per_node > 1:
        raise ConfigError(
            "--resume-at audits a restart in one process; leave out --nproc-per-node."
        )
    plant = parse_plant(args.plant) if args.plant else None
    if plant is not None:
        check_plant_applies(plant[0], spec.mode, spec.momentum, spec.sample_rate)
    if args.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(args, out)
    rank, engine = _join_ranks(args)
    if rank == 0:
        if plant is not None:
            print(f"PLANTED BUG {args.plant}: this run is deliberately NOT private", flush=True)
        print(
            f"auditing {args.mode} ({args.layer}): {args.canaries} canaries, {args.steps} "
            f"steps, sigma {args.noise_multiplier}, q {args.sample_rate}",
            flush=True,
        )
    with planted_bug(*plant) if plant is not None else nullcontext():
        result = canary_audit(
            args.mode,
            **_options(args),
            delta=args.delta,
            confidence=args.confidence,
            seed=args.seed,
            noise_seed=args.noise_seed,
            engine=engine,
            progress=(lambda d, t: print(f"  step {d}/{t}", flush=True)) if rank == 0 else None,
        )
    result.planted = args.plant
    if rank != 0:  # every rank audited the same release; rank 0 reports it
        return result.to_dict()
    paths = write_report(result, out)
    print(summary_line(result))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    files = {"out": str(out), "files": {k: str(p) for k, p in paths.items()}}
    if plant is not None:
        verdict = "caught" if not result.passed else "MISSED"
        print(f"the audit {verdict} the planted bug {args.plant}")
        if result.passed:
            raise _missed(args.plant)
        return {**files, **result.to_dict()}
    if not result.passed:
        # Two tests, each at the stated confidence: a correct run fails one of them with
        # probability at most 2 (1 - confidence).
        odds = round(1 / (2 * (1 - result.confidence)))
        raise PrivacyError(
            f"{failure(result)} This is a bug in this installation (or a 1-in-{odds} chance); "
            f"report it with {paths['json']} (it holds the settings and the seeds). "
            + _rerun_advice(result)
        )
    return {**files, **result.to_dict()}


def _rerun_advice(result: Any) -> str:
    """How to repeat a failed audit: all of it with both seeds, else only its canaries."""
    if result.noise_seed is not None:
        return (
            f"The same flags with --seed {result.seed} --noise-seed {result.noise_seed} re-run "
            "it exactly."
        )
    return (
        f"--seed {result.seed} repeats its canaries; its training noise came from OS entropy, "
        "so add --noise-seed N to any run you want to be able to repeat exactly."
    )


def _join_ranks(args: argparse.Namespace) -> tuple[int, Any]:
    """(rank, engine): (0, None) in one process; in a torchrun worker, the group joined, the
    same auditor seed on every rank, and a DistributedPrivacyEngine."""
    if "WORLD_SIZE" not in os.environ:
        return 0, None
    import atexit

    import torch

    from lazydp.distributed import DistributedPrivacyEngine
    from lazydp.distributed._comm import comm_device
    from lazydp.distributed.launch import init_from_env

    rank, _ = init_from_env()
    atexit.register(torch.distributed.destroy_process_group)
    if args.seed is None:  # every rank must draw the same canaries
        seed = torch.tensor([secrets.randbits(62) if rank == 0 else 0], device=comm_device(None))
        torch.distributed.broadcast(seed, 0)
        args.seed = int(seed.item())
    return rank, DistributedPrivacyEngine(seed=args.noise_seed)  # the same on every rank


def _launch(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Run this audit as ``--nproc-per-node`` torchrun workers; rank 0 writes the report."""
    import signal

    from lazydp.distributed.launch import _run_forwarding_signals, torchrun_command
    from lazydp.stop_signals import StoppedBySignal

    cmd = torchrun_command(args, Path("unused"))[:-3]  # torchrun and its options
    flags = [
        f"--{key.replace('_', '-')}={value}"
        for key, value in vars(args).items()
        if key not in ("func", "command", "json", "nesterov", "out") and value is not None
    ]
    flags += ["--nesterov"] if args.nesterov else []
    report = out / "audit.json"
    report.unlink(missing_ok=True)
    # As `lazydp train --nproc-per-node`: a signal is passed on to torchrun, which stops the
    # workers before this returns (subprocess.run left them auditing on, orphaned).
    returncode, signum = _run_forwarding_signals(
        [*cmd, "-m", "lazydp", "audit", *flags, f"--out={out}"]
    )
    if signum is not None and returncode != 0:
        raise StoppedBySignal(
            f"stopped by {signal.Signals(signum).name}: torchrun stopped the audit's workers "
            "before they wrote a report. An audit charges no real ledger: run it again.",
            signum,
        )
    if not report.exists():
        raise ConfigError(
            f"the {args.nproc_per_node}-rank audit stopped (exit {returncode}) before "
            "writing its report; see the workers' messages above."
        )
    result = json.loads(report.read_text())
    if not result["passed"] and not args.plant:
        raise PrivacyError(
            f"the {args.nproc_per_node}-rank audit failed; rank 0 said why above and wrote "
            f"{report}. Report it with that file."
        )
    if result["passed"] and args.plant:
        raise _missed(args.plant)
    return result


def _missed(plant: str) -> PrivacyError:
    """The exit-1 error of an audit that did not catch the bug it was asked to show."""
    return PrivacyError(
        f"the audit missed the planted bug {plant}: its tests passed on a run that is not "
        "private. A small plant (a noise factor near 1, epsilon under-stated by less than "
        "~25%) is within the audit's resolution and is caught only in some runs "
        "(benchmarks/RESULTS.md); a larger one should be caught every time."
    )


def summary_line(r: Any) -> str:
    verdict = "PASSED" if r.passed else "FAILED"
    spec = "as specified" if not r.findings else f"{len(r.findings)} mismatch(es)"
    return (
        f"audit {verdict}: claimed epsilon {r.epsilon:.3f} at delta {r.delta:g}; the attacker "
        f"proves epsilon >= {r.epsilon_lower:.3f} ({r.confidence:g} confidence); least margin "
        f"FNR+ - f(FPR+) = {r.margin:+.4f}; release {spec}: absent scores "
        f"{r.score_mean_absent:+.3f} +- {r.score_std_absent:.3f} (N(0,1) expected), present "
        f"mean {r.score_mean_present:.3f} ({r.expected_shift:.3f} expected)"
    )


def failure(r: Any) -> str:
    """Why an audit failed: the refuted claim (the pair it broke) and the mismatches."""
    parts = []
    if r.refuted:
        worst = min(r.points, key=lambda p: p.fnr_upper - p.claimed_fnr_floor)
        parts.append(
            f"the attacker told present canaries from absent ones better than the run's claim "
            f"allows (the {worst.tail}-tail test at {worst.threshold:g}: FPR <= "
            f"{worst.fpr_upper:.4f} with FNR <= {worst.fnr_upper:.4f}, where epsilon "
            f"{worst.claimed_epsilon:.3f} at delta {worst.claimed_delta:.3g} needs FNR >= "
            f"{worst.claimed_fnr_floor:.4f})."
        )
    parts += [f"The release does not match its specification: {f}." for f in r.findings]
    return " ".join(parts)


def write_report(r: Any, out: Path) -> dict[str, Path]:
    """audit.json, audit.csv (the tests), audit_scores.csv (every canary) and audit.png."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        names = {"json": "audit.json", "csv": "audit.csv", "scores": "audit_scores.csv"}
        paths = {k: out / name for k, name in {**names, "png": "audit.png"}.items()}
        doc = r.to_dict()
        paths["json"].write_text(json_text(doc, indent=2))
        rows = doc["points"]
        with paths["csv"].open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        absent, present = r.scores
        with paths["scores"].open("w") as fh:
            fh.write("present,score\n")
            fh.writelines(f"0,{x:.6g}\n" for x in absent)
            fh.writelines(f"1,{x:.6g}\n" for x in present)
        _plot(r, paths["png"])
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write the audit ({exc})") from None
    return paths


def _plot(r: Any, path: Path) -> None:
    import numpy as np

    from lazydp._plots import pyplot
    from lazydp.audit_stats import claimed_tradeoff

    plt = pyplot()

    f = claimed_tradeoff(r.claim)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    grid = np.linspace(0, 1, 400)
    left.plot(grid, [f(a) for a in grid], label=f"claimed (eps {r.epsilon:.2f} at {r.delta:g})")
    left.plot(grid, 1 - grid, ":", color="grey", label="random guessing")
    for p in r.points:
        colour = "red" if p.violates else "black"
        left.plot([p.fpr, p.fpr_upper], [p.fnr, p.fnr], color=colour, lw=0.8)
        left.plot([p.fpr, p.fpr], [p.fnr, p.fnr_upper], color=colour, lw=0.8)
        left.plot(p.fpr, p.fnr, "o" if p.tail == "upper" else "s", color=colour, ms=3)
    left.set_xlabel("false-positive rate (absent canary guessed in)")
    left.set_ylabel("false-negative rate")
    left.set_title("Measured errors (o: upper tail, s: lower) vs the claim's floor")
    left.legend(fontsize=8)
    absent, present = r.scores
    bins = np.linspace(-5, max(5.0, r.expected_shift + 5), 80)
    right.hist(absent, bins=bins, alpha=0.5, density=True, label="absent canaries")
    right.hist(present, bins=bins, alpha=0.5, density=True, label="present canaries")
    for p in r.points:
        right.axvline(p.threshold if p.tail == "upper" else -p.threshold, color="grey", lw=0.5)
    right.set_xlabel("score (movement along the canary, in noise std)")
    right.set_title(f"{r.mode}, {r.layer}: {r.canaries} canaries, {r.steps} steps")
    right.legend(fontsize=8)
    planted = f" (PLANTED BUG {r.planted})" if r.planted else ""
    fig.suptitle(f"lazydp audit {'passed' if r.passed else 'FAILED'}{planted}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
