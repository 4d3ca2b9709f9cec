"""torch calls that do nothing in the common case, without their dispatch cost (the DP step
runs each many times; a no-op ``.to()`` or grad-mode switch still costs ~1-3 us of Python).

``no_grad``: ``torch.no_grad()`` as a decorator, minus its cost when gradients are already off.
torch's decorator enters and leaves a grad-mode context on every call (~2-3 us of Python: a
context object, two mode switches). LazyDP's per-table methods run many times a step, mostly
inside the optimizer step, which is already under no_grad; there this calls straight through.
Same effect: the function always runs with gradients off, and the caller's mode is restored.

``cast``: ``t.to(dtype, device)``, returning ``t`` itself when it already has both.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def no_grad(fn: F) -> F:
    """Decorate ``fn`` (not a generator) to run with gradients disabled."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def cast(
    t: torch.Tensor, dtype: torch.dtype | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """``t.to(device=device, dtype=dtype)`` (None: keep), without a no-op dispatch.

    >>> x = torch.zeros(2)
    >>> cast(x, torch.float32) is x, cast(x, torch.float64).dtype
    (True, torch.float64)
    """
    if (dtype is None or t.dtype == dtype) and (device is None or t.device == device):
        return t
    return t.to(device=device, dtype=dtype)


#: Elements per chunk of :func:`all_finite` (4M: a 4 MB bool temporary).
FINITE_CHUNK = 1 << 22


def all_finite(t: torch.Tensor) -> bool:
    """``bool(torch.isfinite(t).all())`` a chunk at a time: the one-shot form builds a bool
    tensor of t's size, a quarter of a float32 table -- at a resume (a loaded velocity or
    momentum buffer checked before anything changes) that was 0.25x the tables on top of the
    model, enough to get a run that fits training killed by the OS while it resumed."""
    if not t.is_floating_point() and not t.is_complex():
        return True
    if t.dim() == 0 or t.numel() <= FINITE_CHUNK:
        return bool(torch.isfinite(t).all())
    rows = max(1, FINITE_CHUNK // (t.numel() // t.shape[0]))  # slices of dim 0: never a copy
    return all(bool(torch.isfinite(t[i : i + rows]).all()) for i in range(0, t.shape[0], rows))
