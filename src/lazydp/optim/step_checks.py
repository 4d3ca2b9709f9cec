"""Every refusal of a private step, made before its charge: nothing changes, nothing is charged.

``StepChecks`` is the part of ``DPOptimizer`` (optim/dp_optimizer.py) that says no: at
make_private, optimizers the step cannot apply privately (``_check_optimizers``); at each
``step()``, a setting or parameter group changed since (``_check_lrs``,
``_check_groups_unchanged``, ``_check_uncaptured``), a step after ``engine.detach()`` or past
what a history table counts, and a recorded forward/backward that is not one row per example
of the private loader's batch (``_check_batch``). Each message says what was wrong and what to
do, and that nothing was changed or charged.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lazydp.capture import CaptureSet, LayerCapture
from lazydp.errors import ConfigError, InputError, UnsupportedOptimizerError
from lazydp.optim.lazy import MAX_STEPS, LazyTable
from lazydp.optim.sgd_settings import FLOAT16_MAX, bad_lr, narrowest, not_deferred, sgd_step

_GROUPS_FIXED = (
    "{now}: lazydp fixes at make_private which parameters a private step clips, noises and "
    "updates, so parameter groups cannot change after it (add_param_group). Build the "
    "optimizer with every parameter you will train before make_private -- to hold one back, "
    "freeze it (requires_grad=False) after make_private and unfreeze it later. Nothing was "
    "changed or charged."
)


def listed_twice(p: nn.Parameter, first: tuple[int, int], second: tuple[int, int]) -> str:
    """Why a parameter held twice by the optimizers is refused."""
    where = " and ".join(f"optimizer {i}, param group {j}" for i, j in (first, second))
    return (
        f"a parameter of shape {tuple(p.shape)} is listed twice ({where}). Each step would "
        "add its clipped gradient twice but only the noise of one DP-SGD step calibrated for "
        "a single update, so it would get less noise than the privacy guarantee assumes. "
        "List every parameter once: e.g. optimizer=[Adam(dense_params), SGD(table_params)] "
        "with the tables left out of the first."
    )


class StepChecks:
    """The refusals of ``DPOptimizer`` (which defines the attributes declared here)."""

    originals: list[Optimizer]
    param_groups: list[dict[str, Any]]
    capture: CaptureSet
    privacy: Any  # PrivacyParams (optim/dp_optimizer.py)
    tables: dict[nn.Parameter, LayerCapture]
    lazy: dict[nn.Parameter, LazyTable]
    steps_done: int
    detached: bool
    _group_index: dict[nn.Parameter, tuple[int, int]]
    _layout: list[list[list[nn.Parameter]]]
    _uncaptured: list[nn.Parameter]
    check_rows: Callable[[int], int | None] | None
    check_skipped: Callable[[], int | None] | None

    def _group_of(self, p: nn.Parameter) -> tuple[Optimizer | None, dict[str, Any]]:
        if p not in self._group_index:
            return None, {}
        i, j = self._group_index[p]
        return self.originals[i], self.originals[i].param_groups[j]

    def _check_optimizers(self) -> None:
        model_params = {p for layer in self.capture.layers for p in layer.params().values()}
        if not model_params:
            raise ConfigError(
                "the model has no trainable parameters (every requires_grad is False): there "
                "is nothing to train, and each step would still be charged. Unfreeze the "
                "layers to train before make_private."
            )
        for o in self.originals:
            if isinstance(o, torch.optim.LBFGS):
                raise UnsupportedOptimizerError(
                    "torch.optim.LBFGS re-evaluates the loss several times per step; DP-SGD "
                    "clips, noises and charges exactly one gradient per step. Use SGD or Adam."
                )
            if isinstance(o, torch.optim.SparseAdam):
                raise UnsupportedOptimizerError(
                    "torch.optim.SparseAdam takes sparse gradients only, and a DP-SGD gradient is "
                    "dense: every row of a table gets noise each step. Use torch.optim.SGD for "
                    "the tables (mode='lazydp' keeps their update sparse by deferring that noise) "
                    "and Adam for the dense layers."
                )
        for p in self._group_index:
            if p.requires_grad and p not in model_params:
                raise UnsupportedOptimizerError(
                    "the optimizer holds a parameter that is not in the model passed to "
                    "make_private; build the optimizer from model.parameters()."
                )
        if self.privacy.mode != "lazydp":
            return
        for p, layer in self.tables.items():
            if p.device.type != "cpu":
                # The lr sums, the noise pool and the momentum coefficients live in host memory,
                # and no GPU has run this path: refused rather than failing inside a step.
                raise ConfigError(
                    f"mode='lazydp' keeps embedding tables in host memory, as the LazyDP paper "
                    f"does on a GPU machine; table {layer.name!r} is on {p.device}. Move the "
                    "tables to the CPU (e.g. model.embeddings.cpu(), with their ids on the CPU) "
                    "and keep the MLPs on the GPU, or use mode='dpsgd_f', whose eager noise "
                    "runs on any device."
                )
            opt, group = self._group_of(p)
            if sgd_step(opt, group) is None:
                raise UnsupportedOptimizerError(
                    f"mode='lazydp' defers the noise of table {layer.name!r}, which is exact "
                    f"for SGD (weight decay, momentum and Nesterov included); its optimizer is "
                    f"{not_deferred(opt, group)}. Adaptive "
                    "optimizers scale each row's noise by its own history, and dampening or "
                    "maximize are not deferred. Put the embedding tables in their own "
                    "torch.optim.SGD and pass optimizer=[dense_optimizer, table_sgd]; dense "
                    "layers may keep Adam/Adagrad."
                )

    def _check_lrs(self) -> None:
        """ConfigError (before the charge) for a setting that would spend the step for nothing
        or drop noise: a NaN or infinite lr, weight_decay or momentum in any group (it turns
        the parameters into NaN after the step is charged), or a negative lr on a table of the
        eager SGD pass. That pass adds the noise into the weight as ``lr * sigma * C / B``: a
        schedule gone negative made that std fail ``std > 0``, so the step was charged and its
        clipped rows applied with no noise at all. (LazyDP tables: check_table_lr.)"""
        for opt in self.originals:
            for j, group in enumerate(opt.param_groups):
                for key in ("lr", "weight_decay", "momentum"):
                    value = group.get(key)
                    if isinstance(value, Tensor) and value.numel() == 1:
                        value = float(value)
                    # Real, not float: a numpy float32 / float16 lr (a schedule computed in
                    # numpy) is no float subclass, and its NaN went through to the weights.
                    if not isinstance(value, numbers.Real):
                        continue
                    value = float(value)
                    big = abs(value) > FLOAT16_MAX and abs(value) > narrowest(group["params"])
                    if not math.isfinite(value) or big:
                        # Beyond the parameters' dtype, torch's update raises deep inside
                        # (after the charge): "value cannot be converted to type c10::Half".
                        where = f"parameter group {j} of the {type(opt).__name__} optimizer"
                        why = " and representable in the parameters' dtype"
                        raise ConfigError(bad_lr(value, where, why, key=key))
        checked: set[int] = set()  # one look per group, not per table (26 on mlperf)
        for q in self.tables:
            if q in self.lazy or not q.requires_grad:
                continue
            owner, group = self._group_of(q)
            if id(group) in checked:
                continue
            checked.add(id(group))
            step = sgd_step(owner, group)
            if step is not None and step.lr < 0:
                name = f"table {self.tables[q].name!r}'s parameter group"
                raise ConfigError(bad_lr(step.lr, name, " since the table's noise is scaled by it"))

    def _check_attached(self) -> None:
        """ConfigError (before the closure and the charge) for a step after engine.detach().

        The model's layers run uncaptured then, so this step saw no example: it was taken as
        an empty batch -- charged, noise alone added, the user's gradient dropped -- or, with
        the private loader, refused as a step 'without a forward' the user did run. Under
        lazydp its pending noise also went to rows no state_dict hook flushes any more."""
        if self.detached:
            raise ConfigError(
                "optimizer.step() after engine.detach(): the engine gave the model back, so "
                "this optimizer no longer clips or noises its gradients (the step would add "
                "noise alone, charged, and drop your gradient). To train the model privately "
                "again, call make_private on a new PrivacyEngine with the same ledger_path (so "
                "the spending so far is counted) and step its optimizer. Nothing was changed "
                "or charged."
            )

    def _check_step_count(self) -> None:
        """ConfigError (before the charge) for a LazyDP step its history tables cannot record:
        they count steps in int32 (optim/lazy.py, MAX_STEPS)."""
        if self.privacy.mode == "lazydp" and self.steps_done >= MAX_STEPS:
            raise ConfigError(
                f"this LazyDP run has taken {self.steps_done} steps, the most its history "
                "tables can record (they count steps in int32). Export the model "
                "(engine.export or model.state_dict(): every row gets its pending noise); "
                "more training on this data spends budget on top of this run's ledger. "
                "Nothing was changed or charged."
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused: the parameters a private step clips, noises and updates are fixed at
        make_private (see _check_groups_unchanged, which also catches a group added to one of
        the original optimizers)."""
        raise ConfigError(_GROUPS_FIXED.format(now="a parameter group is being added"))

    def _check_groups_unchanged(self) -> None:
        """ConfigError if parameters joined the optimizers after make_private (add_param_group):
        a parameter of an uncaptured layer would get noise but no clipped gradient, one in two
        optimizers two updates. Also if a group lost, gained or swapped parameters with the
        count kept (a group removed and added back, a table moved to another group): a lazy
        table reads its lr and momentum from the group it had at make_private (its prefix
        sums belong to that group), so it would silently train at another group's settings.
        O(parameters), by identity: a few dozen ``is`` per step."""
        listed = sum(len(g["params"]) for g in self.param_groups)
        if listed != len(self._group_index):
            now = f"the optimizers list {listed} parameters, not {len(self._group_index)}"
            raise ConfigError(_GROUPS_FIXED.format(now=now))
        moved = self._moved_group()
        if moved is not None:
            now = (
                f"optimizer {moved[0]}'s param group {moved[1]} no longer holds the parameters "
                "it held at make_private (a group removed and added back, or a parameter moved "
                "to another group; to change a group's settings, set its lr, momentum or "
                "weight_decay in place)"
            )
            raise ConfigError(_GROUPS_FIXED.format(now=now))

    def _moved_group(self) -> tuple[int, int] | None:
        """(optimizer, group) of the first group whose parameters are not, in order, those it
        held at make_private; None when every group is as it was."""
        for i, o in enumerate(self.originals):
            then, now = self._layout[i], o.param_groups
            for j in range(max(len(then), len(now))):
                old = then[j] if j < len(then) else []
                new = now[j]["params"] if j < len(now) else []
                if len(old) != len(new) or not all(map(operator.is_, old, new)):
                    return i, j
        return None

    def _check_uncaptured(self) -> None:
        """ConfigError if a parameter frozen when make_private ran is trainable now: its layer
        runs with plain autograd, so its gradient would be neither clipped nor (replaced by
        noise alone) used."""
        thawed = [self._name_of(q) for q in self._uncaptured if q.requires_grad]
        if thawed:
            raise ConfigError(
                f"parameter(s) {thawed[:3]} were frozen (requires_grad=False) when make_private "
                "ran, so their layers are not clipped per example, and they require grad now. "
                "Call make_private with every parameter you will train trainable, and freeze "
                "it after make_private instead: a frozen captured layer gets no update and no "
                "noise until it is unfrozen. Nothing was changed or charged."
            )

    def _name_of(self, q: Tensor) -> str:
        names = {id(t): n for n, t in self.capture.model.named_parameters()}
        return names.get(id(q), f"a parameter of shape {tuple(q.shape)}")

    def _check_batch(self, batch: int, calls: dict[str, list[Any]]) -> None:
        """InputError unless the recorded forward/backward is one row per loaded example."""
        if batch and not any(calls.values()):  # calls are the records a backward reached
            raise InputError(
                "optimizer.step() after a forward without loss.backward(): there is no gradient "
                "to clip, and the step would still be charged and add noise. Call "
                "loss.backward() before step() (torch.autograd.grad and "
                "backward(inputs=...) leave the parameters' gradients alone, in lazydp as in "
                "torch: they do not count). optimizer.zero_grad() keeps a forward no "
                "backward reached (it may come after zero_grad); a forward you do not train on "
                "(an evaluation) belongs under torch.no_grad(), and the next training forward "
                "replaces it. Nothing was changed or charged."
            )
        if not batch and self.check_skipped is not None and not self.capture.has_records():
            held = self.check_skipped()
            if held == 0:
                raise InputError(
                    "optimizer.step() again with no forward and no new batch from the private "
                    "data loader: every batch it yielded was already stepped on (or the loop "
                    "replays batches it yielded earlier: itertools.cycle, a cached list), so "
                    "this step would be charged as one more step and add noise with nothing "
                    "learned. Call step() once per batch the loader yields, and iterate the "
                    "loader itself each epoch. Nothing was changed or charged."
                )
            if held:
                raise InputError(
                    f"optimizer.step() without a forward, but the batch the private data loader "
                    f"yielded holds {held} examples: the step would be charged and noised with "
                    "nothing learned from them. Run the model and loss.backward() on the batch "
                    "before step() (an empty batch may skip them). Nothing was changed or charged."
                )
        loaded = self.check_rows(batch) if self.check_rows is not None and batch else None
        if loaded is not None:
            raise InputError(
                f"the model's layers saw {batch} rows in dimension 0, but the batches the "
                f"private data loader yielded hold at most {loaded} examples. lazydp clips each row of "
                "dimension 0 as one example, so an example spread over several rows (a shared "
                "tower run on torch.cat([queries, items]), a reshape to (B*T, d)) would be "
                "clipped once per row and its influence could exceed the bound. Call the shared "
                "layer once per input (a layer may run several times in one forward) and keep "
                "dimension 0 the batch. Nothing was changed or charged."
            )
