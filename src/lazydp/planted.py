"""Planted bugs: switch a known privacy bug on, to show that a check can catch it. NEVER private.

An empirical audit (lazydp/audit.py) that passes proves little unless it can also fail; these
context managers break one stage of the DP step in a known way so that the audit (and the
tests) can show it does. ``lazydp audit --plant noise=0.8`` uses them; nothing else does.

Each patch lasts for its ``with`` block only and is process-wide (single-threaded use). Build
the engine, train and release inside the block: noise a LazyDP pool drew ahead during the block
is used after it too (and noise drawn before it, inside).

* ``noise=F``: every Gaussian draw's std times F (F < 1: less noise than the accountant assumes).
* ``clip=F``: gradients clipped at F * C (the accountant and the noise still assume C; a
  negative F flips their sign).
* ``roll``: each example gets the next example's clip factor (factors misaligned with rows).
* ``reuse``: every noise draw's odd values repeat its even ones (each value used twice).
* ``sample=F``: Poisson sampling at F * q (the accountant still assumes q).
* ``epsilon=F``: every epsilon the engine reports times F (an accountant that claims too much).
* ``flush``: LazyDP's full flush marks every row caught up without adding its noise.
* ``catch_up``: LazyDP's catch-up skips the first pending step's noise (an off-by-one window).
* ``velocity``: LazyDP's momentum catch-up adds no noise to the velocity.
* ``momentum_noise=F``: LazyDP's momentum catch-up scales the row's own noise by F.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any
from unittest import mock

from lazydp.errors import ConfigError

__all__ = ["PLANTS", "check_plant_applies", "parse_plant", "planted_bug"]

#: kind -> whether it takes a factor
PLANTS = {
    "noise": True,
    "clip": True,
    "roll": False,
    "reuse": False,
    "sample": True,
    "epsilon": True,
    "flush": False,
    "catch_up": False,
    "velocity": False,
    "momentum_noise": True,
}


def _noise(k: float) -> AbstractContextManager[Any]:
    from lazydp import noise

    add, fill = noise.add_standard_chunk, noise.fill_standard_chunk
    return mock.patch.multiple(
        noise,
        add_standard_chunk=lambda a, std, m, *x: add(a, std * k, m, *x),
        fill_standard_chunk=lambda a, std, m, *x: fill(a, std * k, m, *x),
    )


def _clip(k: float) -> AbstractContextManager[Any]:
    from lazydp.optim import dp_optimizer

    clip = dp_optimizer.clip_factors
    return mock.patch.object(dp_optimizer, "clip_factors", lambda n2, c: clip(n2, c * k))


def _roll(_: float) -> AbstractContextManager[Any]:
    from lazydp.optim import dp_optimizer

    clip = dp_optimizer.clip_factors
    return mock.patch.object(dp_optimizer, "clip_factors", lambda n2, c: clip(n2, c).roll(1))


def _reuse(_: float) -> AbstractContextManager[Any]:
    from lazydp import box_muller, noise

    fill = box_muller.fill_standard_chunk

    def twice(dst: Any, std: float, material: bytes) -> None:
        fill(dst, std, material)
        flat = dst.reshape(-1)
        flat[1::2] = flat[0 : 2 * (flat.size // 2) : 2]

    # noise.py calls its imported name; add_standard_chunk looks it up in box_muller
    return _both(
        mock.patch.object(noise, "fill_standard_chunk", twice),
        mock.patch.object(box_muller, "fill_standard_chunk", twice),
    )


@contextmanager
def _both(a: AbstractContextManager[Any], b: AbstractContextManager[Any]) -> Iterator[None]:
    with a, b:
        yield


def _sample(k: float) -> AbstractContextManager[Any]:
    from lazydp.sampling import PoissonSampling

    draw = PoissonSampling._draw

    def bigger(self: Any, step: int, position: int) -> list[int]:
        q, self.sample_rate = self.sample_rate, min(1.0, self.sample_rate * k)
        try:
            return draw(self, step, position)
        finally:
            self.sample_rate = q

    return mock.patch.object(PoissonSampling, "_draw", bigger)


def _epsilon(k: float) -> AbstractContextManager[Any]:
    from lazydp.engine import PrivacyEngine

    epsilon = PrivacyEngine.get_epsilon
    return mock.patch.object(
        PrivacyEngine, "get_epsilon", lambda self, d, *a, **kw: k * epsilon(self, d, *a, **kw)
    )


def _flush(_: float) -> AbstractContextManager[Any]:
    from lazydp.optim.lazy import LazyTable

    def flush_rows(self: Any, t: int) -> None:
        self.history.applied.fill_(t)  # every row marked caught up, nothing added

    return mock.patch.object(LazyTable, "_flush_rows", flush_rows)


def _catch_up(_: float) -> AbstractContextManager[Any]:
    from lazydp.optim.lazy import LrPrefix

    pending = LrPrefix.pending
    return mock.patch.object(
        LrPrefix,
        "pending",
        lambda self, applied, t, sum_lr=True: pending(self, applied + 1, t, sum_lr),
    )


def _momentum(row: float, velocity: bool) -> AbstractContextManager[Any]:
    from lazydp.optim.lazy_momentum import MomentumPrefix

    pending = MomentumPrefix.pending

    def bad(self: Any, applied: Any, t: int, dtype: Any) -> Any:
        c = pending(self, applied, t, dtype).clone()  # columns 4-6: Sigma's Cholesky factor
        c[:, 4] *= row
        if not velocity:
            c[:, 5:7] = 0
        return c

    return mock.patch.object(MomentumPrefix, "pending", bad)


_PATCHES: dict[str, Callable[[float], AbstractContextManager[Any]]] = {
    "noise": _noise,
    "clip": _clip,
    "roll": _roll,
    "reuse": _reuse,
    "sample": _sample,
    "epsilon": _epsilon,
    "flush": _flush,
    "catch_up": _catch_up,
    "velocity": lambda _: _momentum(1.0, False),
    "momentum_noise": lambda k: _momentum(k, True),
}


@contextmanager
def planted_bug(kind: str, factor: float | None = None) -> Iterator[None]:
    """Break one DP stage (see the module docstring) for the duration of the block.

    >>> from lazydp.noise import GaussianNoise
    >>> import torch
    >>> with planted_bug("noise", 0.0):
    ...     bool((GaussianNoise().normal_(torch.empty(3), std=1.0) == 0).all())
    True
    """
    if kind not in PLANTS:
        raise ConfigError(f"unknown planted bug {kind!r}; choose from {sorted(PLANTS)}.")
    if PLANTS[kind] and (
        factor is None or isinstance(factor, bool) or not isinstance(factor, (int, float))
    ):
        raise ConfigError(f"planted bug {kind!r} needs a factor, e.g. {kind}=0.8.")
    if not PLANTS[kind] and factor is not None:
        raise ConfigError(f"planted bug {kind!r} takes no factor.")
    if factor is not None and not math.isfinite(factor):
        raise ConfigError(f"planted bug {kind}={factor}: the factor must be finite.")
    if (
        kind in ("noise", "sample", "epsilon", "momentum_noise")
        and factor is not None
        and factor < 0
    ):
        raise ConfigError(f"planted bug {kind}={factor}: the factor must be >= 0.")
    with _PATCHES[kind](float(factor or 0.0)):
        yield


def check_plant_applies(kind: str, mode: str, momentum: float, sample_rate: float) -> None:
    """ConfigError when the planted bug would change nothing in this training run (its audit
    would report it "missed" for no fault of the audit)."""
    lazy_only = {"flush", "catch_up", "velocity", "momentum_noise"}
    if kind in lazy_only and mode != "lazydp":
        raise ConfigError(
            f"planted bug {kind!r} breaks LazyDP's deferred noise: use --mode lazydp."
        )
    if kind in ("velocity", "momentum_noise") and not momentum:
        raise ConfigError(f"planted bug {kind!r} breaks LazyDP's momentum: use --momentum > 0.")
    if kind == "sample" and sample_rate >= 1:
        raise ConfigError("planted bug 'sample' changes Poisson sampling: use --sample-rate < 1.")


def parse_plant(text: str) -> tuple[str, float | None]:
    """'noise=0.8' -> ('noise', 0.8); 'flush' -> ('flush', None) (checked as planted_bug does).

    >>> parse_plant("noise=0.8"), parse_plant("flush")
    (('noise', 0.8), ('flush', None))
    """
    kind, _, value = text.partition("=")
    try:
        factor = float(value) if value else None
    except ValueError:
        raise ConfigError(
            f"--plant {text!r}: the factor must be a number, e.g. noise=0.8."
        ) from None
    with planted_bug(kind, factor):  # validates kind and factor; patches nothing that lasts
        pass
    return kind, factor
