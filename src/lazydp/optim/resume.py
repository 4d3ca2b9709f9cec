"""Checks that a checkpoint's optimizer and LazyDP state fit the running engine, made before
anything is loaded: a resume either restores all of it or changes nothing.

Why all-or-nothing: the weights of a lazydp checkpoint still owe the noise its history tables
record. Loading those weights and then failing on the history (or loading them beside this run's
history) would leave rows that look caught up but never got their noise -- and the next export
would release them. Each check raises :class:`PrivacyError` naming what does not fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lazydp._dispatch import all_finite
from lazydp.errors import PrivacyError
from lazydp.noise_pool import NoisePool
from lazydp.optim.lazy import LazyTable, LrPrefix
from lazydp.optim.lazy_momentum import MomentumPrefix, MomentumTable


def _refuse(what: str) -> PrivacyError:
    return PrivacyError(
        f"the checkpoint does not fit this engine: {what}. Nothing was loaded. Resume with the "
        "model, optimizers, mode and privacy settings that wrote it."
    )


def check_optimizer_state(originals: Sequence[Optimizer], state: Any) -> None:
    """``state`` (OptimizerGroup.state_dict's layout) has the groups and sizes of ``originals``."""
    if len(originals) == 1:
        states = [state]
    elif isinstance(state, dict) and isinstance(state.get("optimizers"), list):
        states = state["optimizers"]
    else:
        raise _refuse(f"it holds one optimizer's state, this engine wraps {len(originals)}")
    if len(states) != len(originals):
        raise _refuse(
            f"it holds {len(states)} optimizers' states, this engine wraps {len(originals)}"
        )
    for k, (o, s) in enumerate(zip(originals, states)):
        groups = s.get("param_groups") if isinstance(s, dict) else None
        if not isinstance(groups, list) or not isinstance(s.get("state"), dict):
            raise _refuse(f"optimizer {k}'s state is not a torch optimizer state_dict")
        sizes = [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in groups]
        mine = [len(g["params"]) for g in o.param_groups]
        if sizes != mine:
            raise _refuse(
                f"optimizer {k} ({type(o).__name__}) has parameter groups of sizes {mine}, the "
                f"checkpoint's has {sizes}"
            )
        _check_param_states(k, o, groups, s["state"])


def buffer_problem(value: Any, shape: torch.Size) -> str | None:
    """Why ``value`` is not a finite tensor of ``shape`` (None when it is one): a buffer that
    would otherwise fail inside the next step, after its charge."""
    if not isinstance(value, Tensor) or value.shape != shape:
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        return f"is {got}, not a tensor of shape {tuple(shape)}"
    if not all_finite(value):  # a chunk at a time: a velocity is as large as its table
        return "is not finite"
    return None


def _check_param_states(k: int, o: Optimizer, groups: list[Any], states: dict[Any, Any]) -> None:
    """Every per-parameter buffer (momentum, Adam's moments) has its parameter's shape and is
    finite."""
    params = [p for g in o.param_groups for p in g["params"]]
    ids = [i for g in groups for i in g.get("params", ())]
    for index, param in zip(ids, params):
        entry = states.get(index, {})
        for name, value in entry.items() if isinstance(entry, dict) else ():
            if not isinstance(value, Tensor) or value.dim() == 0:
                continue  # step counters and other scalars
            problem = buffer_problem(value, param.shape)
            if problem is not None:
                raise _refuse(f"optimizer {k}'s {name!r} {problem}")


def check_lazy_state(
    tables: Sequence[LazyTable], prefixes: Sequence[LrPrefix | MomentumPrefix], state: Any
) -> None:
    """``state`` (DPOptimizer.lazy_state_dict) has one history per table of the same length, one
    lr prefix per group, a step count they agree on, and a valid noise-pool position."""
    if not isinstance(state, dict):
        raise _refuse("its LazyDP state is missing")
    steps = state.get("steps_done")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise _refuse(f"its step count {steps!r} is not an int >= 0")
    saved_tables, saved_prefixes = state.get("tables"), state.get("prefixes")
    if not isinstance(saved_tables, list) or len(saved_tables) != len(tables):
        n = len(saved_tables) if isinstance(saved_tables, list) else None
        raise _refuse(
            f"it holds {n} LazyDP history tables, this engine has {len(tables)} (a table frozen "
            "when make_private runs gets none: make the same tables trainable for make_private "
            "as the run that wrote it did, and freeze them after)"
        )
    if not isinstance(saved_prefixes, list) or len(saved_prefixes) != len(prefixes):
        n = len(saved_prefixes) if isinstance(saved_prefixes, list) else None
        raise _refuse(f"it holds {n} lr prefix sums, this engine has {len(prefixes)}")
    bases: list[int] = []
    for k, (prefix, s) in enumerate(zip(prefixes, saved_prefixes)):
        if isinstance(prefix, MomentumPrefix):
            try:
                if not isinstance(s, dict) or s.get("kind") != "momentum":
                    raise ValueError("it is not a momentum prefix")
                saved_steps, base = MomentumPrefix.check_state(s)
            except ValueError as e:
                raise _refuse(f"momentum prefix {k}: {e}") from None
            if saved_steps != steps:
                raise _refuse(f"momentum prefix {k} is at step {saved_steps}, not {steps}")
            bases.append(base)
            continue
        if not isinstance(s, dict):
            raise _refuse(f"lr prefix {k} is not a dict of its sums")
        parts = [s.get(key) for key in ("s1", "s2")]
        sums = [t for t in parts if isinstance(t, Tensor) and t.dtype == torch.float64]
        base = s.get("base", 0)  # absent before weight decay: never rebased
        if isinstance(base, bool) or not isinstance(base, int) or not 0 <= base <= steps:
            raise _refuse(f"lr prefix {k}'s rebase step {base!r} is not in [0, {steps}]")
        # The sums are kept from ``offset`` on (absent in older checkpoints: from step 0).
        offset = s.get("offset", 0)
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= base:
            raise _refuse(f"lr prefix {k}'s first kept step {offset!r} is not in [0, {base}]")
        kept = steps + 1 - offset
        if len(sums) != 2 or any(t.shape != (kept,) for t in sums):
            raise _refuse(f"lr prefix {k} does not cover the {steps} steps it claims")
        # A rebase restarts the sums at its step: they grow from there on.
        since = base - offset
        if not bool(torch.isfinite(sums[1]).all()) or bool((sums[1][since:].diff() < 0).any()):
            raise _refuse(f"lr prefix {k}'s sums of lr^2 are not finite and non-decreasing")
        for key, hi in (("s1_lo", sums[0]), ("s2_lo", sums[1])):
            lo = s.get(key)  # absent before the compensated sums: 0
            if lo is not None and (
                not isinstance(lo, Tensor)
                or lo.dtype != torch.float64
                or lo.shape != (kept,)
                or not bool((lo.abs() <= hi.abs() * 2.0**-52).all())
            ):
                raise _refuse(f"lr prefix {k}'s {key} is not the rounding error of its sums")
        p = s.get("p")  # absent before weight decay: 1 at every step
        if p is not None and (
            not isinstance(p, Tensor)
            or p.dtype != torch.float64
            or p.shape != (kept,)
            or not bool((torch.isfinite(p) & (p > 0)).all())
            or bool((p[since:].diff() > 0).any())
        ):
            raise _refuse(f"lr prefix {k}'s decay products are not positive and non-increasing")
        bases.append(base)
    for k, (table, s) in enumerate(zip(tables, saved_tables)):
        applied = s.get("applied") if isinstance(s, dict) else None
        rows = len(table.history)
        if (
            not isinstance(applied, Tensor)
            or applied.shape != (rows,)
            or applied.is_floating_point()
        ):
            raise _refuse(f"history table {k} is not {rows} integer steps")
        if rows and not bool(((applied >= 0) & (applied <= steps)).all()):
            raise _refuse(f"history table {k} holds steps outside [0, {steps}]")
        if isinstance(table, MomentumTable):
            problem = buffer_problem(s.get("velocity"), table.velocity.shape)
            if problem is not None:
                raise _refuse(f"history table {k}'s velocity {problem}")
        frozen = s.get("frozen_at", -1)
        if isinstance(frozen, bool) or not isinstance(frozen, int) or not -1 <= frozen <= steps:
            raise _refuse(f"history table {k}'s frozen step {frozen!r} is not in [-1, {steps}]")
        # A row behind its prefix's last rebase would read sums that are gone (a frozen table
        # was flushed when it froze and restarts at the step it thaws).
        base = next((bases[i] for i, pr in enumerate(prefixes) if pr is table.prefix), 0)
        behind = applied < base
        if table.padding_idx is not None and rows:
            behind[table.padding_idx] = False  # never caught up: it owes nothing
        if frozen < 0 and rows and bool(behind.any()):
            raise _refuse(f"history table {k} holds steps before its prefix's rebase at {base}")
    for key in ("pool", "dense_pool"):
        if state.get(key) is not None:
            NoisePool.check_state(state[key])
