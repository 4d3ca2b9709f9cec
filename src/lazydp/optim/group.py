"""Several torch optimizers driven as one (dense layers on Adam, tables on SGD, a common DLRM setup).

The group never owns param groups: ``param_groups`` is a live view of the wrapped optimizers' own
(``Optimizer.load_state_dict`` replaces those dicts, so a cached copy would go stale), and LR
schedulers built on either the group or the originals act on the same dicts.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch.optim import Optimizer

from lazydp.errors import ConfigError


class OptimizerGroup(Optimizer):
    """One optimizer interface over ``optimizers`` (the non-private ``sgd`` mode uses it as is)."""

    def __init__(self, optimizers: list[Optimizer]) -> None:
        self.originals = optimizers
        self.defaults = optimizers[0].defaults
        self.state = optimizers[0].state  # type: ignore[assignment]
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

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for o in self.originals:
            o.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        if len(self.originals) == 1:
            return self.originals[0].state_dict()
        return {"optimizers": [o.state_dict() for o in self.originals]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if len(self.originals) == 1:
            self.originals[0].load_state_dict(state_dict)
        else:
            for o, s in zip(self.originals, state_dict["optimizers"]):
                o.load_state_dict(s)
