"""Which optimizer settings a private step can apply, read from the live param groups.

LazyDP defers a table's SGD update exactly (plain, weight decay, momentum, Nesterov); anything
else -- another optimizer, an SGD subclass with its own ``step``, ``maximize``, dampening with
momentum -- is not deferred, and ``sgd_step`` returns None for it. The other helpers word the
refusals of a learning rate or setting a step cannot use (optim/step_checks.py raises them).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lazydp.optim.lazy import SgdStep


def _own_step(optimizer: torch.optim.SGD) -> bool:
    """Whether an SGD (or a subclass) updates with SGD's own ``step``. torch wraps each class's
    step in a profiling hook, so the functions are compared unwrapped; the answer is kept per
    class (2 us a call, once per table per step otherwise)."""
    cls = type(optimizer)
    if cls not in _SGD_STEP:
        _SGD_STEP[cls] = inspect.unwrap(cls.step) is inspect.unwrap(torch.optim.SGD.step)
    return _SGD_STEP[cls]


_SGD_STEP: dict[type, bool] = {}


def sgd_step(optimizer: Optimizer | None, group: dict[str, Any]) -> SgdStep | None:
    """This step's hyper-parameters of an SGD group whose update LazyDP defers exactly (plain,
    weight decay, momentum, Nesterov), else None: not SGD, a subclass with its own ``step``
    (the tables' SGD update is applied here, never through step, so its update would be
    silently replaced by SGD's), ``maximize``, or dampening with momentum (torch's first
    momentum step skips the dampening: a row's history would matter)."""
    if not isinstance(optimizer, torch.optim.SGD) or group.get("maximize", False):
        return None
    if not _own_step(optimizer):
        return None
    momentum = float(group.get("momentum", 0) or 0)
    if momentum and group.get("dampening", 0):
        return None
    return SgdStep(
        float(group["lr"]),
        float(group.get("weight_decay", 0) or 0),
        momentum,
        bool(group.get("nesterov", False)),
    )


#: No setting up to this fits no parameter dtype the step updates (float16's largest value).
FLOAT16_MAX = float(torch.finfo(torch.float16).max)


def narrowest(params: list[Tensor]) -> float:
    """The largest finite value of the narrowest floating dtype among ``params``: torch
    converts a step's scalar to each parameter's dtype, so one float16 parameter in a group
    of float32 ones fails at 1e5 (the widest dtype let it through, and the charge with it)."""
    return min(
        (float(torch.finfo(q.dtype).max) for q in params if q.is_floating_point()),
        default=math.inf,
    )


def bad_lr(value: float, where: str, why: str = "", key: str = "lr") -> str:
    what = "learning rate" if key == "lr" else key
    return (
        f"{what} {value!r} of {where}: it must be finite and >= 0{why} (check the LR "
        "schedule: one that decays linearly goes negative past its end). No parameter was "
        "changed and nothing was charged."
    )


def not_deferred(optimizer: Optimizer | None, group: dict[str, Any]) -> str:
    """What keeps a group's update from being deferred (sgd_step gave None): the optimizer's
    class, and for SGD the setting that is not deferred, e.g. ``SGD with maximize=True``."""
    if optimizer is None:
        return "none (the table is in none of the optimizers passed to make_private)"
    name = type(optimizer).__name__
    if not isinstance(optimizer, torch.optim.SGD):
        return name
    if not _own_step(optimizer):
        return f"{name}, a subclass of SGD with its own step()"
    if group.get("maximize", False):
        return f"{name} with maximize=True"
    return f"{name} with dampening={group.get('dampening')} (momentum={group.get('momentum')})"
