"""The options of ``lazydp train`` (``TrainConfig``), checked before any data is read.

Flags, YAML keys and the Python API share these names. ``TrainConfig.validate`` refuses a bad
value with the flag to fix and an example, before the job reads data, trains or spends privacy;
``check_output_dir`` does the same for an output location (the bench and audit commands use it
too). The job itself is in training.py.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lazydp import _validate as v
from lazydp.errors import ConfigError


@dataclass
class TrainConfig:
    """Every option of ``lazydp train`` (flags and YAML keys share these names)."""

    dataset: str = "movielens"
    data: str | None = None
    mode: str = "lazydp"
    epochs: float = 20.0
    batch_size: int = 4096
    lr: float = 8.0  # embedding tables (SGD)
    weight_decay: float = 0.0  # embedding tables (SGD's; LazyDP defers it exactly)
    momentum: float = 0.0  # embedding tables (SGD's; LazyDP keeps a velocity per row)
    dense_lr: float = 0.003  # MLPs
    dense_optimizer: str = "adam"
    noise_multiplier: float | None = None
    target_epsilon: float | None = 3.0
    delta: float | None = None
    # 4, not 1: clipping far below the per-example gradient norms caps the pull of confidently
    # wrong examples, and the model ends overconfident. With C=1 the private MovieLens model
    # ranked as well (AUC 0.74-0.76 at epsilon 3) but its test log-loss was 1.03-1.06, worse
    # than predicting the base rate (0.69); with C=4 it is 0.61-0.62 (sgd: 0.60), AUC 0.75.
    # ACS: 0.92-0.94 -> 0.64-0.66 (sgd 0.66). benchmarks/RESULTS.md, "Utility".
    max_grad_norm: float = 4.0
    sampler: str = "poisson"
    embedding_dim: int = 16
    hidden: list[int] = field(default_factory=lambda: [64, 32])
    seed: int | None = None  # sampling and noise (None: OS entropy)
    model_seed: int = 0  # model initialisation only; no privacy randomness
    out: str = "runs/latest"
    checkpoint_every: int = 0  # 0: a checkpoint every CHECKPOINT_SECONDS (at the end if any)
    resume: bool = False
    max_steps: int | None = None
    eval_batch_size: int = 8192
    progress: bool = True

    def validate(self) -> None:
        """Check every option's type and range, and that ``out`` can be created and written.

        Raises ConfigError naming the option, the value and the fix. ``run`` calls it first,
        before any data is read or any privacy is spent; the CLI calls it as soon as the options
        are merged, so a bad YAML value never surfaces as a TypeError deep inside training.
        """
        v.check_choice("dataset", self.dataset, tuple(DATASET_DEFAULTS))
        if self.data is not None:
            _check_path("data", self.data)
            if not Path(self.data).is_dir():
                raise ConfigError(
                    f"data (--data) {self.data} is not a directory; give the --output directory "
                    "of `lazydp preprocess`"
                )
        v.check_mode(self.mode)
        v.check_choice("sampler", self.sampler, ("poisson", "shuffle"))
        v.check_choice("dense_optimizer", self.dense_optimizer, ("adam", "sgd"))
        v.check_positive_int("batch_size", self.batch_size)
        v.check_positive_int("embedding_dim", self.embedding_dim)
        v.check_positive_int("eval_batch_size", self.eval_batch_size)
        v.check_positive_real(
            "epochs",
            self.epochs,
            "Pass e.g. --epochs 5.",
            "passes over the training rows; fractions allowed",
        )
        # lr <= 0 is refused, not only lr < 0: with lr 0 every step is still charged to the
        # ledger (the noise is drawn and accounted) but the parameters never move.
        _check_lr("lr", self.lr, "of the embedding tables", "8")
        _check_lr("dense_lr", self.dense_lr, "of the MLPs", "0.003")
        v.check_real(
            "weight_decay",
            self.weight_decay,
            f"a finite number >= 0 below 1 / lr = {1 / self.lr:g} (SGD's weight decay of the "
            "embedding tables)",
            lambda wd: math.isfinite(wd) and 0 <= wd and wd * self.lr < 1,
            "Each step multiplies every row by 1 - lr * weight_decay; pass e.g. "
            "--weight-decay 1e-5, or 0 for none.",
        )
        v.check_real(
            "momentum",
            self.momentum,
            "a number in [0, 1) (SGD's momentum of the embedding tables)",
            lambda mu: 0 <= mu < 1,
            "Pass e.g. --momentum 0.9, or 0 for none.",
        )
        v.check_max_grad_norm(self.max_grad_norm)
        if self.noise_multiplier is not None:
            v.check_noise_multiplier(self.noise_multiplier)
        elif self.mode != "sgd" and self.target_epsilon is None:
            raise ConfigError("give --noise-multiplier or --target-epsilon")
        if self.target_epsilon is not None:
            v.check_epsilon(self.target_epsilon, "target_epsilon")
        if self.delta is not None:
            v.check_delta(self.delta)
        _check_hidden(self.hidden)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, "an integer >= 0 (or omit it: OS entropy)")
        _check_int("model_seed", self.model_seed, 0, "an integer >= 0")
        _check_int(
            "checkpoint_every",
            self.checkpoint_every,
            0,
            "an integer >= 0 (steps between checkpoints; 0 = one every 10 minutes of training)",
        )
        if self.max_steps is not None:
            _check_int(
                "max_steps",
                self.max_steps,
                1,
                "an integer >= 1 (a cap on the number of steps)",
                "Omit it to train for the full --epochs.",
            )
        for name in ("resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"{name} must be true or false; got {getattr(self, name)!r} of type "
                    f"{type(getattr(self, name)).__name__}."
                )
        _check_path("out", self.out)
        check_output_dir(self.out)


def flag(name: str) -> str:
    """The command-line flag of option ``name`` (``batch_size`` -> ``--batch-size``)."""
    return "--" + name.replace("_", "-")


def _check_lr(name: str, value: Any, what: str, example: str) -> float:
    return v.check_positive_real(
        name,
        value,
        "A rate <= 0 does not train (at 0 every step would still spend privacy budget "
        f"while the parameters stay put); pass e.g. {flag(name)} {example}.",
        f"the learning rate {what}",
    )


def _check_int(name: str, value: Any, low: int, expected: str, advice: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ConfigError(
            f"{name} ({flag(name)}) must be {expected}; got {value!r}"
            + ("" if isinstance(value, int | float) else f" of type {type(value).__name__}")
            + (f". {advice}" if advice else ".")
        )
    return int(value)


def _check_hidden(hidden: Any) -> list[int]:
    if isinstance(hidden, str | bytes) or not isinstance(hidden, list | tuple):
        raise ConfigError(
            f"hidden must be a list of MLP layer widths, e.g. [64, 32]; got {hidden!r} of type "
            f"{type(hidden).__name__}."
        )
    return [v.check_positive_int(f"hidden[{i}]", h) for i, h in enumerate(hidden)]


def _check_path(name: str, value: Any) -> None:
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise ConfigError(
            f"{name} ({flag(name)}) must be a non-empty path; got {value!r} of type "
            f'{type(value).__name__}. Quote it in YAML if needed, e.g. {name}: "runs/a".'
        )


def check_output_dir(path: Any, flag: str = "--out") -> Path:
    """``path`` as a Path if it is, or can be created as, a writable directory; else ConfigError.

    Nothing is created: the check only looks at ``path`` and its nearest existing ancestor, so
    a job can refuse a bad output location before it reads data, trains or spends privacy.

    >>> import tempfile
    >>> check_output_dir(Path(tempfile.gettempdir()) / "lazydp-example").name
    'lazydp-example'
    """
    out = Path(path)
    existing = out
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    advice = f"choose another {flag}"
    if existing == out and os.path.lexists(out):
        if not out.is_dir():
            raise ConfigError(f"{flag} {out}: exists and is not a directory; {advice}.")
    elif not existing.is_dir():
        kind = "a file" if existing.is_file() else "not a directory"
        raise ConfigError(
            f"{flag} {out}: cannot create it, {existing} is {kind}; {advice} (or move {existing})."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {out}: {existing} is not writable by this user; {advice}.")
    return out


# Per built-in dataset defaults (flags and --config override them). ACS has ~1.4k training rows:
# MovieLens' batch of 4096 would make q = 1 and forfeit amplification by sampling.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "movielens": {},
    "acs": {"batch_size": 256, "epochs": 30, "lr": 2.0, "embedding_dim": 8},
}
