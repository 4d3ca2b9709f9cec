"""``torch.no_grad()`` as a decorator, minus its cost when gradients are already off.

torch's decorator enters and leaves a grad-mode context on every call (~2-3 us of Python: a
context object, two mode switches). LazyDP's per-table methods run many times a step, mostly
inside the optimizer step, which is already under no_grad; there this calls straight through.
Same effect: the function always runs with gradients off, and the caller's mode is restored.
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
