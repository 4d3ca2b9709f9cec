"""Test-only switches that make every GaussianNoise draw a known constant. NEVER private.

Contract:

* Inside ``constant_noise(value)`` every :class:`lazydp.noise.GaussianNoise` draw, from every
  instance and stream, is deterministic: ``normal_(out, std)`` fills ``value * std``,
  ``add_normal_(out, std)`` adds ``value * std``, and ``aggregated(sum_lr, sum_lr2, dim)``
  returns ``value * sum_lr`` broadcast to ``(n, dim)`` -- exactly what summing the per-step
  constants ``value * lr_s`` gives, so lazily aggregated noise can be compared bit for bit
  with eager per-step noise in equivalence tests. ``zero_noise()`` is ``constant_noise(0.0)``.
* These context managers (also usable as decorators) are the ONLY way to switch the override
  on: no environment variable, config key or CLI flag can. On exit the previous state is
  restored (they nest, and an exception inside does not leave the override on).
* While one is active, :func:`lazydp.noise.active_override` names it (e.g.
  ``"constant_noise(1.0)"``) so that privacy reports can state the run was NOT private.
* The override is process-wide (not per thread): use it in single-threaded tests only.
"""

from __future__ import annotations

import math
from contextlib import ContextDecorator

from lazydp import noise as _noise
from lazydp.errors import ConfigError

__all__ = ["constant_noise", "zero_noise"]


class _Override(ContextDecorator):
    """Installs the override on enter and restores the previous one on exit (re-entrant)."""

    def __init__(self, value: float, name: str) -> None:
        self._value, self._name = value, name
        self._saved: list[tuple[float | None, str | None]] = []

    def __enter__(self) -> None:
        self._saved.append(_noise._swap_override(self._value, self._name))

    def __exit__(self, *exc_info: object) -> None:
        _noise._swap_override(*self._saved.pop())


def constant_noise(value: float = 1.0) -> _Override:
    """Replace every noise draw by ``value`` times its std (test-only; the run is NOT private).

    >>> import torch
    >>> from lazydp.noise import GaussianNoise, active_override
    >>> with constant_noise(2.0):
    ...     GaussianNoise().normal_(torch.empty(2), std=0.5).tolist(), active_override()
    ([1.0, 1.0], 'constant_noise(2.0)')
    >>> active_override() is None
    True
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(
            f"constant_noise value must be a finite number; got {value!r}. Pass e.g. 1.0."
        )
    return _Override(float(value), f"constant_noise({float(value)!r})")


def zero_noise() -> _Override:
    """Make every noise draw exactly zero (test-only; the run is NOT private).

    >>> import torch
    >>> from lazydp.noise import GaussianNoise
    >>> @zero_noise()
    ... def noisy_sum():
    ...     return GaussianNoise().add_normal_(torch.ones(3), std=5.0).tolist()
    >>> noisy_sum()
    [1.0, 1.0, 1.0]
    """
    return _Override(0.0, "zero_noise()")
