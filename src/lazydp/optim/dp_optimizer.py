"""The DP step: norms -> clip factors -> ledger -> clipped sums -> noise (eager | lazy) -> update.

``DPOptimizer`` wraps the user's optimizer(s); the training loop does not change. It shares the
wrapped optimizers' ``param_groups`` (LR schedulers keep working) and adds, in ``step()``:

1. per-example squared norms from the captured calls (ghost norms in ``dpsgd_f``/``lazydp``,
   materialised per-example gradients in ``dpsgd_b``/``dpsgd_r``);
2. clip factors c_i = min(1, C / ||g_i||);
3. clipped sums sum_i c_i g_i (book-keeping from the captured tensors; ``dpsgd_r`` also re-runs
   the forward and a reweighted backward, as that method is defined, and checks that it gives
   the per-example sum it releases: optim/reweighted.py);
4. a charge to the privacy ledger -- before any noise is drawn;
5. noise N(0, (sigma*C)^2) on the sum, divided by the *expected* batch size; tables get it eagerly
   (``dpsgd_*``) or lazily (``lazydp``), every other parameter eagerly;
6. the parameter update.

Validation happens before step 4, so a bad batch changes nothing and charges nothing: the
refusals live in optim/step_checks.py, the optimizer settings a step can apply in
optim/sgd_settings.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lazydp._timing import PhaseTimer
from lazydp.capture import CaptureSet, LayerCapture, ReadHook, RowsRead
from lazydp.clipping import per_sample_clipped_sum, per_sample_norms2
from lazydp.clipping._base import ClippedSum, SparseRows
from lazydp.clipping.shared_rows import sum_shared_bags, sum_sq_norms
from lazydp.errors import ConfigError, InputError
from lazydp.ledger import PrivacyLedger, StepEvent
from lazydp.noise import GaussianNoise
from lazydp.noise_pool import NoisePool
from lazydp.optim.eager import eager_table_sgd, noisy_dense_grads
from lazydp.optim.group import OptimizerGroup, step_hooks
from lazydp.optim.lazy import LazyTable, LrPrefix, SgdStep
from lazydp.optim.lazy_momentum import MomentumPrefix, MomentumTable, check_step
from lazydp.optim.resume import check_lazy_state, check_optimizer_state
from lazydp.optim.reweighted import check_reweighted
from lazydp.optim.sgd_settings import sgd_step
from lazydp.optim.step_checks import StepChecks, listed_twice

# Dividing by norm + tiny keeps c_i finite for an all-zero gradient (then c_i = 1, as clipping a
# zero vector leaves it zero); it shrinks a norm exactly at C by a relative 1e-12 only.
_NORM_EPS = 1e-12


@dataclass(frozen=True)
class PrivacyParams:
    """Everything that decides the privacy guarantee of one step (kept apart from speed flags)."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_batch_size: float
    mode: str
    sampler: str
    loss_reduction: str = "mean"

    @property
    def noise_std(self) -> float:
        """Std of the noise on the *sum* of clipped gradients: sigma * C."""
        if self.noise_multiplier == 0:
            return 0.0
        return self.noise_multiplier * self.max_grad_norm


def _sum_in_float64(parts: list[Tensor], batch: int) -> Tensor:
    """The layers' (B,) squared norms summed in float64 on the CPU: one stack and one sum for
    the common case (all float32 on one device) instead of a cast and an add per layer."""
    if not parts:
        return torch.zeros(batch, dtype=torch.float64)
    if len({(p.dtype, p.device) for p in parts}) > 1:
        parts = [p.double().cpu() for p in parts]
    return torch.stack(parts).double().sum(0).cpu()


def clip_factors(norms2: Tensor, max_grad_norm: float) -> Tensor:
    """c_i = min(1, C / ||g_i||): scales every example's gradient to norm <= C."""
    norms = norms2.clamp_min(0).sqrt()
    return (max_grad_norm / (norms + _NORM_EPS)).clamp(max=1.0)


_SETTING_FIXED = (
    "optimizer.{name} = {value!r}: lazydp fixes {name} at make_private (every step is noised, "
    "clipped and charged to the ledger with it), so assigning it would change nothing; "
    "Opacus' noise and clipping schedulers are not supported. Pass the value to train with "
    "to make_private (or calibrate it with make_private_with_epsilon). Nothing was changed."
)


def _fixed_setting(name: str, doc: str) -> Any:
    """A read-only property for ``privacy.<name>`` whose assignment is refused (_SETTING_FIXED)."""

    def get(self: DPOptimizer) -> float:
        return cast(float, getattr(self.privacy, name))

    def refuse(self: DPOptimizer, value: Any) -> None:
        raise ConfigError(_SETTING_FIXED.format(name=name, value=value))

    return property(get, refuse, doc=doc)


class DPOptimizer(StepChecks, OptimizerGroup):
    """A differentially private view of one or more optimizers over the same model."""

    def __init__(
        self,
        optimizers: list[Optimizer],
        capture: CaptureSet,
        privacy: PrivacyParams,
        noise: GaussianNoise,
        ledger: PrivacyLedger,
        timer: PhaseTimer,
        rank: int = 0,
    ) -> None:
        super().__init__(optimizers)
        self.capture = capture
        self.privacy = privacy
        self.noise = noise
        self.ledger = ledger
        self.timer = timer
        self.rank = rank
        self.steps_done = 0
        self.steps_with_data = 0  # steps of this process whose forward saw >= 1 example
        self.detached = False  # engine.detach() gave the model back (see _check_attached)
        self._flushed_at = -1  # the step count at the last full flush
        # (optimizer index, group index): load_state_dict replaces the group dicts, so we
        # always look the live dict up instead of keeping a reference to it.
        self._group_index: dict[nn.Parameter, tuple[int, int]] = {}
        # Each group's parameters at make_private, in order (_check_groups_unchanged).
        self._layout = [[list(g["params"]) for g in o.param_groups] for o in optimizers]
        for i, o in enumerate(optimizers):
            for j, g in enumerate(o.param_groups):
                for p in g["params"]:
                    if p in self._group_index:
                        raise ConfigError(listed_twice(p, self._group_index[p], (i, j)))
                    self._group_index[p] = (i, j)
        # Parameters of the optimizer whose layer is not captured (frozen when make_private
        # ran): training one later would leave its gradient unclipped (_check_uncaptured).
        captured = {id(q) for layer in capture.layers for q in layer.module.parameters(False)}
        self._uncaptured = [q for q in self._group_index if id(q) not in captured]
        self.tables: dict[nn.Parameter, LayerCapture] = {
            cast(nn.Parameter, layer.module.weight): layer
            for layer in capture.layers
            if layer.is_table and layer.module.weight.requires_grad
        }
        # torch never updates a table's padding row: no example's gradient reaches it (the
        # row-sparse clippers leave it out), so its sensitivity is 0 and no noise is owed there.
        # Tables on plain SGD skip it in their own pass; a table on another optimizer takes the
        # dense path, whose gradient row is zeroed below. (A subclass with its own forward is
        # clipped by the fallback, which cannot rule a gradient there out: it stays noised.)
        self._padding_row: dict[nn.Parameter, int] = {}
        for p, layer in self.tables.items():
            pad = getattr(layer.module, "padding_idx", None)
            if pad is not None:
                self._padding_row[p] = int(pad)
        # A fixed stream per table (fork(k) returns the same child for the same k): the same
        # index in the eager and the lazy path, never shared between tables or with dense params.
        self._table_stream = {p: 1 + k for k, p in enumerate(self.tables)}
        self.lazy: dict[nn.Parameter, LazyTable] = {}
        self._prefixes: dict[tuple[int, int], LrPrefix | MomentumPrefix] = {}
        self._pool: NoisePool | None = None
        # The dense parameters' noise, drawn ahead in large batches too (optim/eager.py), on a
        # stream of its own past the tables' and the catch-up's.
        self._dense_pool = NoisePool(noise.fork(2 + len(self.tables)))
        self._check_optimizers()
        if privacy.mode == "lazydp":
            self._make_lazy()
        # Hooks the engine sets: after each step (distributed reduction, checkpoints).
        # reduce_hook(sums, refusal, charge) sums the clipped sums over the ranks, in place. It
        # also takes the step's refusal on this rank (then sums is empty), and agrees on it
        # with the other ranks in its first collective: if any rank refused, it raises on
        # every rank and nobody charges; else it calls charge() before anything changes.
        self.reduce_hook: (
            Callable[[dict[nn.Parameter, ClippedSum], Exception | None, Callable[[], None]], None]
            | None
        ) = None
        # Called last among the step's checks (the distributed engine checks its sharded
        # tables' settings there); local, no collective.
        self.before_charge: Callable[[], None] | None = None
        # The private loader's DPDataLoader.check_rows: None when a step's rows fit a batch it
        # yielded, else the most examples a waiting batch holds.
        self.check_rows: Callable[[int], int | None] | None = None
        # Its check_skipped: for a step with no forward, the examples of the batch it skipped.
        self.check_skipped: Callable[[], int | None] | None = None
        # Its shuffle_position: where a shuffled loop is, recorded with each charge.
        self.shuffle_position: Callable[[], tuple[str, int] | None] | None = None

    # Opacus' DPOptimizer attributes, read-only: Opacus' noise and clipping schedulers (and
    # hand-written ones) assign them, which on a plain attribute would change neither the noise
    # nor the clipping nor the charge -- a schedule silently ignored.
    noise_multiplier = _fixed_setting(
        "noise_multiplier",
        "sigma: the noise std on the clipped sum is sigma * max_grad_norm (fixed for the run).",
    )
    max_grad_norm = _fixed_setting("max_grad_norm", "C: the per-example clipping bound.")
    expected_batch_size = _fixed_setting(
        "expected_batch_size",
        "q * N: what the clipped, noised sum is divided by (never the realised batch size).",
    )

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """Refused: Opacus' BatchMemoryManager calls it to split a batch into virtual steps
        (gradient accumulation), which lazydp does not do; without it the loop died with an
        AttributeError from inside torch's DataLoader."""
        raise ConfigError(
            "Opacus' BatchMemoryManager (signal_skip_step) splits each batch into physical "
            "batches and accumulates their gradients; lazydp takes one forward and backward per "
            "step() and does not accumulate. Iterate the loader make_private returned: "
            "dpsgd_f and lazydp never materialise per-example gradients (a private step needs "
            "little more memory than a plain one); if a batch still does not fit, lower the "
            "batch size."
        )

    def _sgd_step(self, p: nn.Parameter) -> SgdStep:
        """A lazy table's SGD hyper-parameters of this step, read from its live group; checked
        against its prefix's kind (ConfigError before anything changes)."""
        opt, group = self._group_of(p)
        step = sgd_step(opt, group)
        if step is None:
            raise ConfigError(
                f"the optimizer group of LazyDP table {self.tables[p].name!r} is no longer SGD "
                "without maximize or dampening; its deferred noise assumes that update. No "
                "parameter was changed and nothing was charged."
            )
        check_step(
            step, self.lazy[p].prefix, repr(self.tables[p].name), p, self.privacy.max_grad_norm
        )
        return step

    def _lazy_steps(self) -> dict[nn.Parameter, SgdStep]:
        """``_sgd_step`` of every lazy table, read once per parameter group: tables of one group
        share its step, and one (group, prefix kind, dtype) check stands for all of them. The
        first table of each kind is checked, in table order, so a refusal names the same table
        as checking each table would."""
        steps: dict[nn.Parameter, SgdStep] = {}
        checked: dict[tuple[tuple[int, int], int, torch.dtype], SgdStep] = {}
        for p, table in self.lazy.items():
            kind = (self._group_index[p], id(table.prefix), p.dtype)
            step = checked.get(kind)
            if step is None:
                step = checked[kind] = self._sgd_step(p)
            steps[p] = step
        return steps

    def _make_lazy(self) -> None:
        # One catch-up stream for all tables, drawn ahead in large batches (noise_pool.py); its
        # stream index is past every table's, so it never shares a stream with the eager path.
        pool = self._pool = NoisePool(self.noise.fork(1 + len(self.tables)))
        for p, layer in self.tables.items():
            step = sgd_step(*self._group_of(p))
            key = self._group_index[p]
            rest = (
                pool,
                self.privacy.noise_std / self.privacy.expected_batch_size,
                self._padding_row.get(p),
                self.timer,
            )
            table: LazyTable
            if step is not None and step.momentum > 0:  # a velocity per row (lazy_momentum.py)
                momentum = self._prefixes.setdefault(key, MomentumPrefix())
                assert isinstance(momentum, MomentumPrefix)
                table = MomentumTable(p, momentum, *rest)
            else:
                plain = self._prefixes.setdefault(key, LrPrefix())
                assert isinstance(plain, LrPrefix)
                table = LazyTable(p, plain, *rest)
            self.lazy[p] = table
            layer.read_hook = self._read_hook(table)

    def _read_hook(self, table: LazyTable) -> ReadHook:
        def hook(rows: Tensor, defer: bool) -> RowsRead:
            with self.timer.phase("lazy_catch_up"):
                table.catch_up(rows, self.steps_done, defer=defer)
            return RowsRead(table.last_read, table.deferred_block())

        return hook

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Also forgets a recorded backward (and its forward): a gradient dropped on purpose.
        A forward no backward has reached yet is kept: ``loss = ...; opt.zero_grad();
        loss.backward(); opt.step()`` is a common loop order, and that forward's records are
        what the coming backward fills."""
        self.capture.drop_backward()
        super().zero_grad(set_to_none)

    # ------------------------------------------------------------------ the step
    @step_hooks
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        self._check_attached()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        refusal: Exception | None = None
        try:
            batch, lazy_steps, sums = self._checked_sums()
        except Exception as exc:
            if self.reduce_hook is None:
                raise
            # Refused on this rank alone, the step was charged on the others, which then
            # waited in its first collective: gloo's "Connection closed by peer", a hang while
            # this rank lives on, or its next step's all-reduce paired with theirs. The reduce
            # hook makes every rank refuse it instead, and none charge it.
            refusal, batch, lazy_steps, sums = exc, 0, {}, {}
        if self.reduce_hook is None:
            self._charge()
        else:
            with self.timer.phase("all_reduce"):
                self.reduce_hook(sums, refusal, self._charge)
            if refusal is not None:  # the hook raises first; never go on with no sums
                raise refusal
        # Counted once charged: a refused step that counted made a retry of its batch look
        # like a step on a batch the private loader never drew (UNVERIFIED SAMPLING).
        self.steps_with_data += batch > 0
        self._update(sums, lazy_steps)
        self.capture.clear("step")
        return loss

    def _charge(self) -> None:
        """Charge the step to the ledger: after every check, before any noise is drawn (DP
        invariant 6)."""
        p = self.privacy
        where = None
        if p.sampler == "shuffle" and self.shuffle_position is not None:
            where = self.shuffle_position()  # (lineage, position): see shuffle_epochs.py
        self.ledger.charge(
            StepEvent(
                step=self.ledger.steps,
                sample_rate=p.sample_rate,
                noise_multiplier=p.noise_multiplier,
                max_grad_norm=p.max_grad_norm,
                mode=p.mode,
                sampler=p.sampler,
                rank=self.rank,
                position=None if where is None else where[1],
                lineage=None if where is None else where[0],
            )
        )

    def _checked_sums(
        self,
    ) -> tuple[int, dict[nn.Parameter, SgdStep], dict[nn.Parameter, ClippedSum]]:
        """Every check of the step, then the clip factors and clipped sums (which release
        nothing): (batch size, the lazy tables' SGD steps, the clipped sums). Raises before
        anything is changed or charged."""
        p = self.privacy
        cap = self.capture
        self._check_step_count()
        cap.check_layers_unchanged()  # the parameters below are the layers' own
        # First: the lazy tables' steps below are read from the groups they had at make_private.
        self._check_groups_unchanged()
        # Read and checked once, before any change (not when the prefix appends it).
        lazy_steps = self._lazy_steps()
        self._check_lrs()
        cap.check_no_outside_use()
        cap.check_no_lost_gradient()
        cap.check_no_late_gradient()
        cap.check_inputs_unchanged()
        cap.check_buffers_unchanged()
        self._check_uncaptured()
        batch = cap.batch_size()
        # An empty Poisson batch has no per-example work; it still gets noise and is charged.
        calls = {layer.name: layer.calls() if batch else [] for layer in cap.layers}
        self._check_batch(batch, calls)
        # A mean-reduced loss scales every output gradient by 1/B. Rather than rescaling them all,
        # fold B into the norms (x B^2) and into the clip factors (x B) -- the same numbers.
        scale = float(batch) if p.loss_reduction == "mean" else 1.0

        with self.timer.phase("norms"):
            parts: list[Tensor] = []
            shared: list[Tensor] = []  # layers whose norms are row norms: reduced together
            per_sample: dict[str, dict[str, Any]] = {}
            for layer in cap.layers:
                if not calls[layer.name]:
                    continue
                if p.mode in ("dpsgd_f", "lazydp"):
                    rows = layer.clipper.norm_rows(layer.module, calls[layer.name])
                    if rows is not None:
                        shared.append(rows)
                        continue
                    n2 = layer.clipper.norms2(layer.module, calls[layer.name])
                else:
                    per_sample[layer.name] = layer.clipper.per_sample(
                        layer.module, calls[layer.name]
                    )
                    n2 = per_sample_norms2(per_sample[layer.name], batch)
                parts.append(n2.detach())
            parts += [n2.detach() for n2 in sum_sq_norms(shared)]
            # A float64 model keeps float64 clip factors: rounded to float32, a clipped
            # example's norm would be C (1 + ~4e-8), not C to float64 precision.
            wide = any(n2.dtype == torch.float64 for n2 in parts)
            norms2 = _sum_in_float64(parts, batch)
            norms2 *= scale * scale
            # NaN/Inf anywhere in a layer's input or output gradient reaches that example's
            # norm (NaN * 0 is NaN), so this one check on B numbers covers every tensor.
            if not bool(torch.isfinite(norms2).all()):
                cap.check_finite()  # names the layer
                # Every input and output gradient is finite: a squared norm overflowed.
                raise InputError(
                    "a per-example gradient norm overflowed: every layer input and output "
                    "gradient is finite, but a squared norm exceeds the range of the model's "
                    "dtype (float32: a norm above ~1.8e19). Scale the features or the loss down, "
                    "or train in float64. No parameter was changed and nothing was charged."
                )
            c = clip_factors(norms2, p.max_grad_norm)
            c = c if wide else c.float()
            c_raw = c * scale  # applies to the unscaled captured gradients

        # The clipped sums release nothing yet; computing them before the charge lets their
        # checks (dpsgd_r's second pass) refuse a step that would not be clipped, uncharged.
        with self.timer.phase("clipped_sum"):
            sums = self._clipped_sums(calls, per_sample, c_raw)

        if self.before_charge is not None:
            self.before_charge()
        if self.reduce_hook is not None:  # a ledger that would refuse the charge: in the vote
            self.ledger.check_chargeable()
        return batch, lazy_steps, sums

    def _clipped_sums(
        self,
        calls: dict[str, list[Any]],
        per_sample: dict[str, dict[str, Any]],
        c: Tensor,
    ) -> dict[nn.Parameter, ClippedSum]:
        sums: dict[nn.Parameter, ClippedSum] = {}
        on_device: dict[torch.device, Tensor] = {c.device: c}  # c moved once per device
        for layer in self.capture.layers:
            if not calls[layer.name]:
                continue
            params = layer.params()
            device = _device_of(params)
            cl = on_device.get(device)
            if cl is None:
                cl = on_device[device] = c.to(device)
            if self.privacy.mode in ("dpsgd_b", "dpsgd_r"):
                by_name = per_sample_clipped_sum(per_sample[layer.name], cl)
            else:
                by_name = layer.clipper.clipped_sum(layer.module, calls[layer.name], cl)
            for name, s in by_name.items():
                sums[params[name]] = s
        if self.privacy.mode == "dpsgd_r" and c.numel():
            check_reweighted(self.capture, c, sums, self.privacy.max_grad_norm)
        return sums

    @torch.no_grad()
    def _update(
        self, sums: dict[nn.Parameter, ClippedSum], lazy_steps: dict[nn.Parameter, SgdStep]
    ) -> None:
        p = self.privacy
        eager_tables: list[tuple[nn.Parameter, Optimizer, SgdStep]] = []
        dense: list[nn.Parameter] = []  # noised together below: one generator call, all threads
        self._presum_tables(sums)
        for opt, group in ((o, g) for o in self.originals for g in o.param_groups):
            sgd = sgd_step(opt, group)
            for q in group["params"]:
                if q in self.lazy and self.lazy[q].sync_frozen(self.steps_done):
                    continue  # frozen: no update, and (flushed once) no noise while it sits out
                if not q.requires_grad:
                    # torch's step would apply a gradient autograd left on it (one frozen
                    # between backward and step): raw, neither clipped nor noised.
                    q.grad = None
                    continue
                if q in self.lazy:
                    q.grad = None
                    s, table = sums.get(q), self.lazy[q]
                    if s is not None and not isinstance(s, SparseRows):
                        # A dense sum reaches every row: all must be at this step first (the
                        # row-sparse clippers of lazy tables do not produce one).
                        table.flush(self.steps_done)
                        s = SparseRows(torch.arange(q.shape[0]), s, q.shape[0], coalesced=True)
                    if s is not None:
                        # Reuses the catch-up's sort and written rows where it can (it times
                        # its coalesce and its row update apart).
                        alpha = table.prefix.update_alpha(lazy_steps[q], p.expected_batch_size)
                        table.update(s, alpha)
                elif q in self.tables and sgd is not None:
                    q.grad = None  # updated below in one streaming pass, never a dense gradient
                    eager_tables.append((q, opt, sgd))
                else:
                    dense.append(q)
        grads = noisy_dense_grads(
            [(sums.get(q), q) for q in dense],
            self.noise,
            p.noise_std,
            p.expected_batch_size,
            self.timer,
            self._dense_pool,
        )
        for q, grad in zip(dense, grads):
            if q in self._padding_row:
                grad[self._padding_row[q]] = 0
            q.grad = grad
        with self.timer.phase("param_update"):
            for o in self.originals:
                o.step()
        for q, opt, sgd in eager_tables:
            velocity = None
            if sgd.momentum:  # torch's own buffer: checkpoints and state_dict() keep it
                state = opt.state[q]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(q)
                velocity = state["momentum_buffer"]
            eager_table_sgd(
                q,
                sums.get(q),
                sgd.lr,
                self.noise.fork(self._table_stream[q]),
                p.noise_std,
                p.expected_batch_size,
                self._padding_row.get(q),
                self.timer,
                weight_decay=sgd.weight_decay,
                momentum=sgd.momentum,
                nesterov=sgd.nesterov,
                velocity=velocity,
            )
        with self.timer.phase("lazy_bookkeeping"):
            seen: set[int] = set()
            for q, table in self.lazy.items():
                if id(table.prefix) not in seen:
                    seen.add(id(table.prefix))
                    table.prefix.append_step(lazy_steps[q])
        self.steps_done += 1
        self._rebase_prefixes()

    def _presum_tables(self, sums: dict[nn.Parameter, ClippedSum]) -> None:
        """The lazy tables' per-row sums, computed together where their gradients allow it
        (``sum_shared_bags``: one kernel for the tables of a DLRM at pooling 1, the same
        numbers); each table's update then finds its sum done."""
        items = []
        for q, table in self.lazy.items():
            s = sums.get(q)
            if isinstance(s, SparseRows) and q.requires_grad:
                groups = table.sum_groups(s)
                if groups is not None:
                    items.append((s, groups))
        # All rows distinct (small batches, large tables): each sum is a plain gather
        # (RowGroups.sum_gathered), cheaper than one parallel kernel for all of them.
        if len(items) > 1 and not all(g.unique for _, g in items):
            with self.timer.phase("coalesce"):
                sum_shared_bags(items)

    def _rebase_prefixes(self, flushed: bool = False) -> None:
        """Flush the tables of any prefix whose decay product got tiny (after ~230 / (lr * wd)
        steps; LrPrefix) or whose momentum window got long (MAX_WINDOW steps), then restart it:
        rare, and O(table) when it happens. ``flushed``: the tables were all just flushed, so
        every prefix restarts (free), dropping the steps before: a prefix that only grew kept
        40 bytes for every step of the run (gigabytes in a long one) and wrote them all into
        every checkpoint."""
        for prefix in {id(t.prefix): t.prefix for t in self.lazy.values()}.values():
            if flushed:
                prefix.rebase()
            elif prefix.needs_rebase():
                with self.timer.phase("lazy_flush"):
                    for table in self.lazy.values():
                        if table.prefix is prefix:
                            table.flush(self.steps_done)
                prefix.rebase()

    # ------------------------------------------------------------------ lazy
    def flush(self) -> None:
        """Apply every pending noise draw to every table row (LazyDP's full flush).

        state_dict() fires one pre-hook per table; after the first, nothing is pending until the
        next step, so the rest return at once instead of rescanning every table.
        """
        self.settle()  # a block deferred by a forward since the last flush
        if self._flushed_at == self.steps_done:
            return
        with self.timer.phase("lazy_flush"):
            for table in self.lazy.values():
                table.flush(self.steps_done)
        self._rebase_prefixes(flushed=True)
        self._flushed_at = self.steps_done

    def settle(self) -> None:
        """Write every table's deferred block (rows a forward read from it) into the table."""
        for table in self.lazy.values():
            table.settle()

    def pending_rows(self) -> int:
        return sum(t.pending_rows(self.steps_done) for t in self.lazy.values())

    # ------------------------------------------------------------------ state
    def lazy_state_dict(self) -> dict[str, Any]:
        return {
            "steps_done": self.steps_done,
            "tables": [t.state_dict() for t in self.lazy.values()],
            "prefixes": [pr.state_dict() for pr in self._prefixes.values()],
            "pool": self._pool.state_dict() if self._pool is not None else None,
            "dense_pool": self._dense_pool.state_dict(),
        }

    def check_state_dicts(self, optimizer_state: Any, lazy_state: Any) -> None:
        """PrivacyError unless both fit this optimizer (see optim/resume.py); changes nothing."""
        check_optimizer_state(self.originals, optimizer_state)
        check_lazy_state(list(self.lazy.values()), list(self._prefixes.values()), lazy_state)

    def load_lazy_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`lazy_state_dict` saved (checked first by check_state_dicts)."""
        if self._pool is not None and state.get("pool") is not None:  # older checkpoints: none
            self._pool.load_state_dict(state["pool"])  # validated first: raises before any change
        if state.get("dense_pool") is not None:  # older checkpoints: none (it starts afresh)
            self._dense_pool.load_state_dict(state["dense_pool"])
        self.steps_done = int(state["steps_done"])
        self._flushed_at = -1
        for t, s in zip(self.lazy.values(), state["tables"]):
            t.load_state_dict(s)
        for pr, s in zip(self._prefixes.values(), state["prefixes"]):
            pr.load_state_dict(s)


def _device_of(params: dict[str, nn.Parameter]) -> torch.device:
    for q in params.values():
        return q.device
    return torch.device("cpu")
