"""``lazydp epsilon``: the epsilon of a DP-SGD configuration, or the noise for a target epsilon.

Contract: a pure calculator on :mod:`lazydp.accounting` (no training, no files). Exactly one of
``--noise-multiplier`` (report epsilon, PLD and RDP) and ``--target-epsilon`` (report the
calibrated noise multiplier and the epsilon it achieves) is given; the length of training is
``--steps`` or ``--epochs``, counted as the loaders run an epoch: round(1/Q) Poisson steps, or
floor(1/Q) shuffled batches (``lazydp.accounting.epoch_steps``).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from lazydp._validate import (
    check_delta,
    check_epsilon,
    check_noise_multiplier,
    check_positive_int,
    check_sample_rate,
)
from lazydp.accounting import (
    ACCOUNTANTS,
    SAMPLERS,
    MechanismCount,
    calibrate_noise_multiplier,
    epoch_steps,
    epsilon_report,
    pld_label,
    steps_for_epochs,
)
from lazydp.cli import add_json_flag
from lazydp.errors import ConfigError

EXAMPLE = """\
examples:
  $ lazydp epsilon --sample-rate 0.04 --noise-multiplier 1.5 --steps 2250 --delta 1e-5
  epsilon 6.769 (PLD), 7.329 (RDP) at delta 1e-05
    poisson sampling, sample_rate 0.04, noise_multiplier 1.5, 2250 steps (90 epochs)

  $ lazydp epsilon --target-epsilon 3 --sample-rate 0.04 --epochs 90 --delta 1e-5
  noise_multiplier 2.76171875 reaches epsilon 2.999 (PLD) <= target 3 at delta 1e-05
    RDP says epsilon 3.257 for the same noise
    poisson sampling, sample_rate 0.04, noise_multiplier 2.76171875, 2250 steps (90 epochs)
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "epsilon",
        help="epsilon of a DP-SGD run, or the noise multiplier for a target epsilon",
        description=(
            "Privacy accounting for DP-SGD with Poisson sampling (PLD accountant, RDP beside "
            "it). Give --noise-multiplier to get epsilon, or --target-epsilon to get the "
            "smallest noise multiplier that stays within it."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--sample-rate",
        type=float,
        required=True,
        metavar="Q",
        help="expected batch size / number of examples",
    )
    noise = p.add_mutually_exclusive_group(required=True)
    noise.add_argument(
        "--noise-multiplier", type=float, metavar="SIGMA", help="noise std / max_grad_norm"
    )
    noise.add_argument(
        "--target-epsilon",
        type=float,
        metavar="EPS",
        help="calibrate the noise multiplier to this epsilon",
    )
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, metavar="T", help="number of training steps")
    length.add_argument(
        "--epochs",
        type=float,
        metavar="E",
        help="passes over the data; steps = ceil(E x round(1/Q)) (shuffle: ceil(E x floor(1/Q))), "
        "as lazydp train counts them",
    )
    p.add_argument(
        "--delta",
        type=float,
        required=True,
        metavar="D",
        help="delta, below 1/N for N examples (e.g. 1e-5)",
    )
    p.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default="poisson",
        help="poisson (default) or shuffle: fixed-size shuffled batches, no amplification",
    )
    p.add_argument(
        "--accountant",
        choices=ACCOUNTANTS,
        default="pld",
        help="accountant used for calibration (default pld)",
    )
    add_json_flag(p)
    p.set_defaults(func=run)


def _steps(args: argparse.Namespace, q: float) -> int:
    if args.steps is not None:
        return check_positive_int("--steps", args.steps)
    epochs = args.epochs
    if not (math.isfinite(epochs) and epochs > 0):
        raise ConfigError(f"--epochs must be a finite number > 0; got {epochs}. E.g. --epochs 10.")
    return steps_for_epochs(epochs, epoch_steps(args.sampler, q))


def run(args: argparse.Namespace) -> dict[str, Any]:
    # Checked here too so that errors name the flag, not the Python argument.
    q = check_sample_rate(args.sample_rate, "--sample-rate")
    delta = check_delta(args.delta, "--delta")
    steps = _steps(args, q)
    result: dict[str, Any] = {
        "sample_rate": q,
        "steps": steps,
        "epochs": steps / epoch_steps(args.sampler, q),
        "delta": delta,
        "sampler": args.sampler,
    }
    if args.target_epsilon is not None:
        target = check_epsilon(args.target_epsilon, "--target-epsilon")
        sigma = calibrate_noise_multiplier(target, delta, q, steps, args.accountant, args.sampler)
        result["target_epsilon"] = target
        result["accountant"] = args.accountant
    else:
        sigma = check_noise_multiplier(args.noise_multiplier, "--noise-multiplier")
    report = epsilon_report([MechanismCount(q, sigma, steps, args.sampler)], delta)
    result.update(noise_multiplier=sigma, epsilon_pld=report.pld, epsilon_rdp=report.rdp)
    if report.pld_as_if_poisson is not None:
        result["epsilon_pld_as_if_poisson"] = report.pld_as_if_poisson
    _print(result)
    return result


def _sigma_text(sigma: float) -> str:
    """The noise multiplier in full (shortest round-trip form): people copy it into
    --noise-multiplier, and a calibrated one rounded to 4 digits could round down and pass the
    target (--target-epsilon 5 --sample-rate 0.04 --steps 1000 showed 1.355 for 1.35546875:
    epsilon 5.0026)."""
    return repr(float(sigma))


def _print(r: dict[str, Any]) -> None:
    setting = (
        f"  {r['sampler']} sampling, sample_rate {r['sample_rate']:g}, "
        f"noise_multiplier {_sigma_text(r['noise_multiplier'])}, {r['steps']} steps "
        f"({r['epochs']:.4g} epochs)"
    )
    if "target_epsilon" in r:
        chosen = r["epsilon_pld"] if r["accountant"] == "pld" else r["epsilon_rdp"]
        other = "rdp" if r["accountant"] == "pld" else "pld"
        label = r["accountant"].upper()
        if label == "PLD":
            label = pld_label(r["epsilon_pld"], r["epsilon_rdp"])
        print(
            f"noise_multiplier {_sigma_text(r['noise_multiplier'])} reaches epsilon {chosen:.4g} "
            f"({label}) <= target {r['target_epsilon']:g} "
            f"at delta {r['delta']:g}"
        )
        print(f"  {other.upper()} says epsilon {r['epsilon_' + other]:.4g} for the same noise")
    else:
        print(
            f"epsilon {r['epsilon_pld']:.4g} ({pld_label(r['epsilon_pld'], r['epsilon_rdp'])}), "
            f"{r['epsilon_rdp']:.4g} (RDP) "
            f"at delta {r['delta']:g}"
        )
    print(setting)
    if "epsilon_pld_as_if_poisson" in r:
        print(
            f"  shuffled batches: no amplification by sampling; with Poisson sampling it "
            f"would be {r['epsilon_pld_as_if_poisson']:.4g} (PLD)"
        )
        print(
            "  neighbours differ by one example's contribution being zeroed; for neighbours "
            "that replace one example the sensitivity doubles (rerun with half the noise "
            "multiplier for that figure)"
        )
