"""Row-wise sharded embedding tables: a table too large for one process, split over the ranks.

Contract:
* :class:`ShardedEmbeddingBag` is a drop-in for ``nn.EmbeddingBag(num_rows, dim, mode)`` (mode
  "sum" or "mean"; 2-D input, or 1-D input with offsets; ``per_sample_weights`` in mode "sum",
  treated as constants). Rank ``k`` of W stores rows r with ``r % W == k`` at local row
  ``r // W``. Cyclic, not contiguous blocks: ids are usually frequency-ranked or hashed, and
  blocks would put every hot row on rank 0; cyclic spreads hot rows and their traffic evenly.
* Lookup (every rank calls forward, a collective, even with an empty batch): unique ids go by
  all-to-all to their owners, owners first catch up their pending LazyDP noise on those rows,
  then send the rows back; pooling happens locally.
* Per-example norms stay exact with no communication: the rank that owns an *example* has its
  bag ids and output gradient, and ||dE_i||^2 = ||g_i||^2 * sum_r (sum of w at r)^2 needs only
  those (the EmbeddingBag clipper's formula on global ids, registered for this class).
* The step (:meth:`apply_clipped_sum`, called by ``DistributedPrivacyEngine``): the clipped sum's
  rows go by all-to-all to their owners; each owner updates its shard with plain SGD and adds
  its rows' noise from an INDEPENDENT stream (eager: every local row every step; ``lazydp``: its
  own history table, drawn on the next read). Noise work and table memory divide by W.
* Training with sharded tables equals training with replicated ones (exactly in distribution;
  under ``lazydp.testing.constant_noise`` up to float summation order).
* ``state_dict()`` holds this rank's shard; :meth:`gather_weight` assembles the full table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lazydp._timing import PhaseTimer
from lazydp.clipping._base import Call, ClippedSum, LayerClipper, PerSample, SparseRows
from lazydp.clipping.embedding_bag import EmbeddingBagClipper
from lazydp.clipping.registry import register_clipper
from lazydp.distributed._comm import (
    ProcessGroup,
    all_gather_varlen,
    all_to_all_varlen,
    comm_device,
    exchange_counts,
    world,
)
from lazydp.distributed.data_parallel import (
    GATHER,
    UPDATE,
    check_same_exchange,
    read_kind,
    sum_dtype,
)
from lazydp.errors import ConfigError, InputError, PrivacyError, UnsupportedLayerError
from lazydp.noise import GaussianNoise
from lazydp.optim.eager import eager_table_sgd
from lazydp.optim.lazy import LazyTable, LrPrefix, SgdStep
from lazydp.optim.lazy_momentum import MomentumPrefix, MomentumTable, check_step
from lazydp.optim.resume import buffer_problem, check_lazy_state

#: Rank r's initialisation stream is keyed by base + r * this (odd: the golden-ratio constant),
#: so neighbouring ranks' keys are far apart.
_RANK_STRIDE = 0x9E3779B97F4A7C15


@dataclass
class _ShardTraining:
    """What the engine hands a shard for private training (set by ``attach``)."""

    noise: GaussianNoise
    noise_std: float  # sigma * C on the global sum
    expected_batch_size: float
    # The current SGD hyper-parameters (lr, weight decay, momentum) of this table's group.
    sgd: Callable[[], SgdStep]
    lazy: LazyTable | None
    timer: PhaseTimer
    step: int = 0
    velocity: Tensor | None = None  # eager modes with momentum: this shard's momentum buffer
    clip: float = float("inf")  # C: bounds |global clipped sum| / B (the velocity range check)


class ShardedEmbeddingBag(nn.Module):
    """An EmbeddingBag whose rows are split over the ranks of ``process_group`` (r % W).

    Example (one process: W = 1 holds the whole table)::

        >>> bag = ShardedEmbeddingBag(10, 4, mode="sum")
        >>> bag(torch.tensor([[1, 2], [3, 3]])).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        mode: str = "sum",
        process_group: ProcessGroup = None,
        _weight: Tensor | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1; got {value!r}.")
        if mode not in ("sum", "mean"):
            raise UnsupportedLayerError(
                f'ShardedEmbeddingBag(mode="{mode}") has no exact per-example norm; use mode="sum" '
                'or "mean"'
            )
        self.num_embeddings, self.embedding_dim, self.mode = num_embeddings, embedding_dim, mode
        self.process_group = process_group
        self.rank, self.world_size = world(process_group)
        # nn.EmbeddingBag's attributes that the (shared) EmbeddingBag clipper reads.
        self.padding_idx: int | None = None
        self.include_last_offset = False
        self.max_norm = None
        self.scale_grad_by_freq = False
        local_rows = len(range(self.rank, num_embeddings, self.world_size))
        if _weight is None:
            # nn.EmbeddingBag's N(0, 1) initialisation (not privacy noise), from a stream per
            # rank: drawn from the global generator alone, ranks seeded alike (as the engine
            # requires) would all hold copies of one shard. One value of the global generator
            # keys it, so torch.manual_seed still makes the table reproducible.
            base = int(torch.randint(0, 2**62, (1,)))
            stream = torch.Generator().manual_seed((base + self.rank * _RANK_STRIDE) % 2**63)
            weight = torch.empty(local_rows, embedding_dim).normal_(generator=stream)
        else:
            if tuple(_weight.shape) != (num_embeddings, embedding_dim):
                raise ConfigError(
                    f"_weight has shape {tuple(_weight.shape)}; expected the full table "
                    f"({num_embeddings}, {embedding_dim}) -- each rank keeps its own rows."
                )
            weight = _weight.detach()[self.rank :: self.world_size].clone()
        self.weight = nn.Parameter(weight)
        # Plain attribute, not a submodule: the clipper's weightless stand-in (see _view).
        self.__dict__["_clip_view"] = None
        self._training: _ShardTraining | None = None

    @classmethod
    def from_full(
        cls, full: nn.EmbeddingBag | Tensor, process_group: ProcessGroup = None
    ) -> ShardedEmbeddingBag:
        """This rank's shard of an existing table (an nn.EmbeddingBag or a full weight tensor)."""
        weight = full.weight if isinstance(full, nn.EmbeddingBag) else full
        mode = full.mode if isinstance(full, nn.EmbeddingBag) else "sum"
        return cls(weight.shape[0], weight.shape[1], mode, process_group, _weight=weight)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, mode={self.mode!r}, "
            f"shard {self.rank}/{self.world_size} ({self.weight.shape[0]} rows)"
        )

    # ------------------------------------------------------------------ forward
    def forward(
        self, input: Tensor, offsets: Tensor | None = None, per_sample_weights: Tensor | None = None
    ) -> Tensor:
        if per_sample_weights is not None and self.mode != "sum":
            raise InputError(
                f'per_sample_weights needs mode="sum" (as nn.EmbeddingBag); this table has '
                f"mode={self.mode!r}"
            )
        ids = input.reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise InputError(
                f"ShardedEmbeddingBag got id {bad}; ids must be in [0, {self.num_embeddings})"
            )
        # Fetch each distinct row once, then pool with torch's own kernel on the fetched rows
        # (ids renumbered into them): exactly nn.EmbeddingBag's semantics (offsets, mean, weights).
        uniq, inverse = torch.unique(ids, return_inverse=True)
        rows = self._lookup(uniq)
        return nn.functional.embedding_bag(
            inverse.view_as(input),
            rows,
            offsets,
            mode=self.mode,
            per_sample_weights=per_sample_weights,
        )

    def _route(self, ids: Tensor, kind: int) -> tuple[Tensor, list[int], list[int]]:
        """Order that groups ``ids`` by owner, and the send / receive counts per rank.

        ``kind`` (a read's, or UPDATE) travels with the counts: ranks in different kinds of
        exchange (a forward on rank 0 alone meeting the others' next one) are refused on
        every rank before any row moves, instead of hanging or pairing unrelated exchanges."""
        owner = ids % self.world_size
        order = torch.argsort(owner, stable=True)
        send = torch.bincount(owner, minlength=self.world_size)
        recv, kinds = exchange_counts(
            send.to(comm_device(self.process_group)), self.process_group, tag=kind
        )
        check_same_exchange(kinds, "a ShardedEmbeddingBag")
        return order, send.tolist(), recv

    def _lookup(self, uniq: Tensor) -> Tensor:
        """The current (caught-up) rows ``uniq`` of the full table, fetched from their owners."""
        group, dev = self.process_group, comm_device(self.process_group)
        order, send, recv = self._route(uniq, read_kind())
        wanted = all_to_all_varlen(uniq[order].to(dev), send, recv, group).to(self.weight.device)
        local = torch.div(wanted, self.world_size, rounding_mode="floor")
        t = self._training
        if t is not None and t.lazy is not None:
            with t.timer.phase("lazy_catch_up"):  # no row leaves its owner with pending noise
                t.lazy.catch_up(local, t.step)
        rows = self.weight.detach()[local]
        back = all_to_all_varlen(rows.to(dev), recv, send, group).to(self.weight.device)
        out = torch.empty_like(back)
        out[order] = back
        return out

    # ------------------------------------------------------------------ private training
    def attach(
        self,
        noise: GaussianNoise,
        noise_std: float,
        expected_batch_size: float,
        sgd: Callable[[], SgdStep],
        lazy: bool,
        timer: PhaseTimer,
        clip: float = float("inf"),
    ) -> None:
        """Set up private training (the engine calls this): own noise stream, SGD lookup, mode,
        and the clip norm C."""
        table: LazyTable | None = None
        if lazy and sgd().momentum > 0:  # a velocity per row, caught up with it
            table = MomentumTable(
                self.weight, MomentumPrefix(), noise, noise_std / expected_batch_size
            )
        elif lazy:
            table = LazyTable(self.weight, LrPrefix(), noise, noise_std / expected_batch_size)
        self._training = _ShardTraining(
            noise, noise_std, expected_batch_size, sgd, table, timer, clip=clip
        )

    def check_step(self) -> SgdStep:
        """This step's SGD settings of the table's group, or ConfigError (nothing changed) if
        the shard's update cannot apply them (an lr gone negative, momentum switched on under
        LazyDP, ...). The engine calls it before the charge too: apply_clipped_sum runs after
        it, where a refusal left the step charged for nothing."""
        t = self._training
        if t is None:
            raise ConfigError("check_step before attach: use DistributedPrivacyEngine")
        step = t.sgd()
        prefix = None if t.lazy is None else t.lazy.prefix
        check_step(step, prefix, "(a sharded one)", self.weight, t.clip)
        return step

    @torch.no_grad()
    def apply_clipped_sum(self, clipped: SparseRows | None) -> None:
        """One SGD step of this shard from the clipped sum over all ranks (a collective).

        ``clipped`` holds this rank's examples' clipped rows with *global* ids (or None for an
        empty batch); rows go to their owners, which then add noise and update.
        """
        t = self._training
        if t is None:
            raise ConfigError("apply_clipped_sum before attach: use DistributedPrivacyEngine")
        # Every rank alike, before the all-to-all and any change.
        step = self.check_step()
        group, dev = self.process_group, comm_device(self.process_group)
        dtype = sum_dtype(self.weight)  # every rank's rows in one dtype, even with none
        if clipped is None:
            clipped = SparseRows(
                torch.empty(0, dtype=torch.long, device=self.weight.device),
                self.weight.new_empty((0, self.embedding_dim), dtype=dtype),
                self.num_embeddings,
            )
        clipped = clipped.coalesce()  # fewer rows on the wire
        order, send, recv = self._route(clipped.indices, UPDATE)
        ids = all_to_all_varlen(clipped.indices[order].to(dev), send, recv, group)
        values = all_to_all_varlen(clipped.values[order].to(dev, dtype), send, recv, group)
        local = SparseRows(
            torch.div(ids, self.world_size, rounding_mode="floor").to(self.weight.device),
            values.to(self.weight.device),
            self.weight.shape[0],
        )
        if t.lazy is not None:
            # The rows were caught up by the forward's union hook (optim/lazy*.py).
            t.lazy.update(local, t.lazy.prefix.update_alpha(step, t.expected_batch_size))
            t.lazy.prefix.append_step(step)
        elif self.weight.requires_grad:  # frozen: no update, noise or decay, as a replicated one
            if step.momentum and t.velocity is None:
                t.velocity = torch.zeros_like(self.weight)  # torch's first step: from zero
            eager_table_sgd(
                self.weight,
                local,
                step.lr,
                t.noise,
                t.noise_std,
                t.expected_batch_size,
                None,
                t.timer,
                weight_decay=step.weight_decay,
                momentum=step.momentum,
                nesterov=step.nesterov,
                velocity=t.velocity,
            )
        t.step += 1
        if t.lazy is not None and t.lazy.prefix.needs_rebase():
            t.lazy.flush(t.step)  # this rank's rows only: no collective
            t.lazy.prefix.rebase()

    def flush(self) -> None:
        """Apply all pending lazy noise to this rank's rows (local; no communication)."""
        t = self._training
        if t is not None and t.lazy is not None:
            t.lazy.flush(t.step)
            # Every row is at the step: the window (momentum) or the lr sums restart, so
            # neither keeps the steps before (LrPrefix).
            t.lazy.prefix.rebase()

    def pending_rows(self) -> int:
        t = self._training
        return 0 if t is None or t.lazy is None else t.lazy.pending_rows(t.step)

    def training_state_dict(self) -> dict[str, Any]:
        """Step, history table and lr prefix sums of this shard (plain data; the noise stream is
        re-keyed on resume, never restored)."""
        t = self._training
        if t is None:
            return {}
        state: dict[str, Any] = {"step": t.step}
        if t.velocity is not None:  # live, not a copy (a shard-sized clone at every checkpoint)
            state["velocity"] = t.velocity
        if t.lazy is not None:
            state["lazy"] = t.lazy.state_dict()
            state["prefix"] = t.lazy.prefix.state_dict()
        return state

    def check_training_state_dict(self, state: Any) -> None:
        """PrivacyError unless ``state`` fits this shard (checked before anything is loaded)."""
        t = self._training
        if t is None or not state:
            return
        velocity = state.get("velocity") if isinstance(state, dict) else None
        problem = None if velocity is None else buffer_problem(velocity, self.weight.shape)
        if problem is not None:
            raise PrivacyError(
                f"the checkpoint's momentum buffer of this shard {problem}; resume with the "
                "checkpoint of this run. Nothing was loaded."
            )
        lazy = [t.lazy] if t.lazy is not None else []
        check_lazy_state(
            lazy,
            [x.prefix for x in lazy],
            {
                "steps_done": state.get("step") if isinstance(state, dict) else None,
                "tables": [state.get("lazy")] if lazy else [],
                "prefixes": [state.get("prefix")] if lazy else [],
            },
        )

    def load_training_state_dict(self, state: dict[str, Any]) -> None:
        t = self._training
        if t is None or not state:
            return
        t.step = int(state["step"])
        velocity = state.get("velocity")
        t.velocity = velocity.clone() if isinstance(velocity, Tensor) else None
        if t.lazy is not None:
            t.lazy.load_state_dict(state["lazy"])
            t.lazy.prefix.load_state_dict(state["prefix"])

    @torch.no_grad()
    def gather_weight(self) -> Tensor:
        """The full (num_embeddings, dim) table on every rank (a collective; flush first)."""
        dev = comm_device(self.process_group)
        # Shaped and tagged as a lookup's first exchange: on rank 0 alone (``if rank == 0:
        # engine.export(...)``) it meets the others' next forward and is refused on every rank,
        # instead of hanging in gloo until its timeout.
        mine = torch.full((self.world_size,), self.weight.shape[0], dtype=torch.long)
        counts, kinds = exchange_counts(mine.to(dev), self.process_group, tag=GATHER)
        check_same_exchange(kinds, "a ShardedEmbeddingBag")
        rows = all_gather_varlen(self.weight.detach().to(dev), counts, self.process_group)
        full = torch.empty(self.num_embeddings, self.embedding_dim, dtype=self.weight.dtype)
        start = 0
        for r, n in enumerate(counts):
            full[r :: self.world_size] = rows[start : start + n].cpu()
            start += n
        return full


@register_clipper(ShardedEmbeddingBag)
class ShardedEmbeddingBagClipper(LayerClipper):
    """nn.EmbeddingBag's exact ghost norms on global ids; clipped sums as global-id rows.

    It delegates to the EmbeddingBag clipper through a weightless (meta-device) EmbeddingBag of
    the full table's shape: the formulas need the ids, the output gradient and the table's
    settings, never the rows themselves.
    """

    _bag = EmbeddingBagClipper()

    def check(self, module: nn.Module) -> None:
        self._bag.check(_view(module))

    def norms2(self, module: nn.Module, calls: list[Call]) -> Tensor:
        return self._bag.norms2(_view(module), calls)

    def clipped_sum(self, module: nn.Module, calls: list[Call], c: Tensor) -> dict[str, ClippedSum]:
        return self._bag.clipped_sum(_view(module), calls, c)

    def per_sample(self, module: nn.Module, calls: list[Call]) -> dict[str, PerSample]:
        return self._bag.per_sample(_view(module), calls)


def _view(module: nn.Module) -> nn.EmbeddingBag:
    """A meta-device nn.EmbeddingBag with the full table's shape and settings (no memory)."""
    assert isinstance(module, ShardedEmbeddingBag)
    view = module.__dict__["_clip_view"]
    if view is None:
        view = nn.EmbeddingBag(
            module.num_embeddings, module.embedding_dim, mode=module.mode, device="meta"
        )
        module.__dict__["_clip_view"] = view
    view.weight.requires_grad_(module.weight.requires_grad)
    return view
