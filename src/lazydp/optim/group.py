"""Several torch optimizers driven as one (dense layers on Adam, tables on SGD, a common DLRM setup).

The group never owns param groups or state: ``param_groups`` and ``state`` are live views of the
wrapped optimizers' own (``Optimizer.load_state_dict`` replaces those dicts, so a cached copy would
go stale), and LR schedulers built on either the group or the originals act on the same dicts.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer

from lazydp.errors import ConfigError


def step_hooks(step: Callable[..., Any]) -> Callable[..., Any]:
    """Runs the hooks registered on the group (``register_step_pre_hook`` / ``post_hook``)
    around ``step``, as torch's Optimizer.__init__ arranges for an optimizer's own step: the
    group does not call it, so they were accepted and then never called. (Global optimizer
    hooks already run for each wrapped optimizer's step.)"""

    @functools.wraps(step)
    def with_hooks(self: OptimizerGroup, *args: Any, **kwargs: Any) -> Any:
        for pre in list(self._optimizer_step_pre_hooks.values()):
            result = pre(self, args, kwargs)
            if result is not None:  # torch's contract: new (args, kwargs) for the step
                args, kwargs = result
        out = step(self, *args, **kwargs)
        for post in list(self._optimizer_step_post_hooks.values()):
            post(self, args, kwargs)
        return out

    return with_hooks


class OptimizerGroup(Optimizer):
    """One optimizer interface over ``optimizers`` (the non-private ``sgd`` mode uses it as is)."""

    def __init__(self, optimizers: list[Optimizer]) -> None:
        self.originals = optimizers
        self.defaults = optimizers[0].defaults
        # Optimizer.__init__ is not called (the groups belong to the wrapped optimizers), so set
        # the hook registries torch's Optimizer methods expect.
        for name in (
            "_optimizer_step_pre_hooks",
            "_optimizer_step_post_hooks",
            "_optimizer_state_dict_pre_hooks",
            "_optimizer_state_dict_post_hooks",
            "_optimizer_load_state_dict_pre_hooks",
            "_optimizer_load_state_dict_post_hooks",
        ):
            setattr(self, name, OrderedDict())

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizers' live param groups."""
        return [g for o in self.originals for g in o.param_groups]

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:  # set by Optimizer internals only
        pass

    @property  # type: ignore[override]
    def state(self) -> Any:
        """The first wrapped optimizer's live per-parameter state. Cached at construction, it
        went stale at the first load_state_dict (a resume): ``optimizer.state`` showed the
        buffers from before the load, and kept them alive -- a momentum buffer as large as the
        tables (dpsgd_f with table momentum) held twice for the rest of the run."""
        return self.originals[0].state

    @state.setter
    def state(self, value: Any) -> None:  # set by Optimizer internals only
        pass

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Added to the one wrapped optimizer (torch's version would append to a copy of the
        live view and drop the group); with several, the caller must pick one."""
        if len(self.originals) != 1:
            raise ConfigError(
                "add_param_group on a group of several optimizers: add it to the one that "
                "should train it (the optimizers passed to make_private)"
            )
        self.originals[0].add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.originals:
            o.zero_grad(set_to_none=set_to_none)

    @step_hooks
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for o in self.originals:
            o.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizers' state_dict(), with the hooks registered on the group run
        around it as torch runs an optimizer's own."""
        for pre in list(self._optimizer_state_dict_pre_hooks.values()):
            pre(self)
        if len(self.originals) == 1:
            state = self.originals[0].state_dict()
        else:
            state = {"optimizers": [o.state_dict() for o in self.originals]}
        for post in list(self._optimizer_state_dict_post_hooks.values()):
            state = post(self, state) or state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads ``state_dict()``'s layout: one optimizer's state as is, several as
        ``{"optimizers": [...]}``. Checked first, so that a state of another layout changes
        nothing (zip loaded a shorter list into the first optimizers only). The hooks
        registered on the group run around it, as torch runs an optimizer's own."""
        for pre in list(self._optimizer_load_state_dict_pre_hooks.values()):
            state_dict = pre(self, state_dict) or state_dict
        states = self._states_of(state_dict)
        if len(states) > 1:  # torch checks one optimizer's groups before it changes anything
            for k, (o, s) in enumerate(zip(self.originals, states)):
                mine = [len(g["params"]) for g in o.param_groups]
                theirs = [len(g["params"]) for g in s.get("param_groups", ())]
                if theirs != mine:
                    raise ConfigError(
                        f"optimizer {k} ({type(o).__name__}) has parameter groups of sizes "
                        f"{mine}, the state_dict's has {theirs}: it belongs to other "
                        "optimizers. Nothing was loaded."
                    )
        for o, s in zip(self.originals, states):
            o.load_state_dict(s)
        for post in list(self._optimizer_load_state_dict_post_hooks.values()):
            post(self)

    def _states_of(self, state_dict: Any) -> list[dict[str, Any]]:
        """One state per wrapped optimizer, or ConfigError naming the layout that does not fit."""
        n = len(self.originals)
        several = isinstance(state_dict, dict) and "optimizers" in state_dict
        if n == 1 and isinstance(state_dict, dict) and not several:
            return [state_dict]
        states = state_dict["optimizers"] if several else None
        if isinstance(states, list) and len(states) == n > 1:
            if all(isinstance(s, dict) for s in states):
                return states
        if isinstance(states, list):
            held = f"{len(states)} optimizers' states"
        else:
            held = "one optimizer's state" if isinstance(state_dict, dict) else repr(state_dict)
        raise ConfigError(
            f"load_state_dict got {held}, but this optimizer wraps {n} (the optimizers passed "
            "to make_private, in that order). Load the state_dict() of an optimizer made the "
            "same way, or load each original optimizer's own state_dict() into it. Nothing "
            "was loaded."
        )
