"""Argument checks for lazydp's public boundary, all in one place.

Contract: every ``check_*`` function either returns the value normalised to a plain Python
type (``float``/``int``/``str``) or raises :class:`lazydp.errors.ConfigError` whose message
names the argument, shows the bad value and says what to pass instead. Booleans, strings and
NaN are never accepted as numbers (``True`` is an ``int`` to Python, but never a sensible
``max_grad_norm``). Internal code calls these once, where user input enters; it does not
re-check values it produced itself.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

from lazydp.errors import ConfigError

MODES = ("sgd", "dpsgd_b", "dpsgd_r", "dpsgd_f", "lazydp")


def _real(name: str, value: Any, expected: str) -> float:
    """``value`` as a float, or ConfigError if it is not a real number (bool/str/NaN)."""
    # numpy.bool_ is not a numbers.Real, but bool is (it subclasses int): exclude it by hand.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(
            f"{name} must be {expected}; got {value!r} of type {type(value).__name__}. "
            f"Pass a number, e.g. {name}=1.0."
        )
    result = float(value)
    if math.isnan(result):
        raise ConfigError(f"{name} must be {expected}; got NaN. Pass a finite number.")
    return result


def check_real(name: str, x: Any, expected: str, ok: Callable[[float], bool], advice: str) -> float:
    """``x`` as a float if it is a real number satisfying ``ok``, else ConfigError."""
    value = _real(name, x, expected)
    if not ok(value):
        raise ConfigError(f"{name} must be {expected}; got {x!r}. {advice}")
    return value


def check_noise_multiplier(x: Any, name: str = "noise_multiplier") -> float:
    """A finite noise multiplier >= 0 (0 means no noise: epsilon is infinite).

    >>> check_noise_multiplier(1.1)
    1.1
    """
    # Above 1e6 the accountants overflow, and no useful model trains under that much noise.
    return check_real(
        name,
        x,
        "a number in [0, 1e6] (noise std / max_grad_norm)",
        lambda v: math.isfinite(v) and 0 <= v <= 1e6,
        "Typical values are 0.5-2; use lazydp.accounting.calibrate_noise_multiplier to pick one.",
    )


def check_max_grad_norm(x: Any, name: str = "max_grad_norm", allow_inf: bool = False) -> float:
    """A finite clipping bound > 0; ``inf`` (no clipping) only with ``allow_inf=True``.

    ``allow_inf`` exists for the "noise 0 and no clipping equals plain SGD" equivalence tests;
    an unbounded norm has no privacy meaning.

    >>> check_max_grad_norm(1.0)
    1.0
    >>> check_max_grad_norm(float("inf"), allow_inf=True)
    inf
    """
    return check_real(
        name,
        x,
        "a finite number > 0 (the per-example clipping bound)",
        lambda v: v > 0 and (math.isfinite(v) or allow_inf),
        "Pick it near the median per-example gradient norm, e.g. 1.0.",
    )


def check_sample_rate(q: Any, name: str = "sample_rate") -> float:
    """A Poisson sample rate in (0, 1] (expected batch size / dataset size).

    >>> check_sample_rate(0.01)
    0.01
    """
    return check_real(
        name,
        q,
        "in (0, 1] (expected batch size / number of examples)",
        lambda v: 0 < v <= 1,
        "For batch 256 of 60000 examples use 256/60000.",
    )


def check_delta(d: Any, name: str = "delta") -> float:
    """A delta in (0, 1); well below 1/N in practice.

    >>> check_delta(1e-5)
    1e-05
    """
    return check_real(
        name,
        d,
        "in (0, 1)",
        lambda v: 0 < v < 1,
        "Use a value below 1/N for N examples, e.g. lazydp.accounting.default_delta(N).",
    )


def check_epsilon(e: Any, name: str = "epsilon") -> float:
    """A finite epsilon > 0.

    >>> check_epsilon(3)
    3.0
    """
    return check_positive_real(name, e, "Typical targets are 1-10.")


def check_epochs(e: Any, name: str = "epochs") -> float:
    """A finite number of epochs > 0 (fractions allowed).

    >>> check_epochs(2.5)
    2.5
    """
    return check_positive_real(name, e, "It sets how many steps the noise is calibrated for.")


def check_positive_real(name: str, x: Any, advice: str, what: str = "") -> float:
    """``x`` as a float if it is a finite number > 0, else ConfigError (``what`` explains it).

    >>> check_positive_real("lr", 0.5, "Pass e.g. --lr 8.")
    0.5
    """
    expected = f"a finite number > 0{f' ({what})' if what else ''}"
    return check_real(name, x, expected, lambda v: math.isfinite(v) and v > 0, advice)


def check_positive_int(name: str, v: Any) -> int:
    """An integer >= 1 (numpy integers accepted, bools and floats like 3.0 are not).

    >>> check_positive_int("steps", 100)
    100
    """
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ConfigError(
            f"{name} must be a positive integer; got {v!r} of type {type(v).__name__}. "
            f"Pass e.g. {name}=1."
        )
    if v < 1:
        raise ConfigError(f"{name} must be a positive integer (>= 1); got {v!r}.")
    return int(v)


def check_count(name: str, v: Any) -> int:
    """An int >= 0 (a count or a position: bools are not).

    >>> check_count("releases", 0)
    0
    """
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"{name}={v!r} must be an int >= 0")
    return v


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``, else ConfigError listing them.

    >>> check_choice("accountant", "pld", ("pld", "rdp"))
    'pld'
    """
    options = tuple(choices)
    if not isinstance(value, str) or value not in options:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}.")
    return value


def check_mode(mode: Any) -> str:
    """One of the five training modes (see DESIGN.md).

    >>> check_mode("lazydp")
    'lazydp'
    """
    return check_choice("mode", mode, MODES)
