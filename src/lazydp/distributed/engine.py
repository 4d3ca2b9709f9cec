"""DistributedPrivacyEngine: the PrivacyEngine API, unchanged, inside a torch.distributed group.

Contract (DESIGN.md invariant 7; every rank builds the same model and calls the same methods):
* Same start: ``make_private`` refuses, on every rank alike, ranks whose engine seeds differ
  (or are given on some ranks only) or whose replicated weights and buffers differ (compared by
  digest; unlike DDP nothing is broadcast). Sharded tables initialise rows of their own per rank.
* Sampling: rank r Poisson-samples its shard (r, r+W, ...) at the GLOBAL rate q; the expected
  batch size used for normalisation is q * N (N = the whole data set, which every rank passes).
* The step: each rank clips its own examples and sums; :class:`ClippedSumReducer` sums over
  ranks (dense: bucketed all-reduce; replicated tables: rows); then noise is added ONCE: every
  rank draws the same noise from a shared stream (rank 0 draws a seed from OS entropy and
  broadcasts it; with a user seed, that seed everywhere), so the global sum gets std sigma*C --
  not sqrt(W)*sigma*C -- and the replicas stay bit-identical.
* A step refused on one rank (NaN in its batch, a setting changed there) is refused on every
  rank and charged on none: the ranks vote in the step's first collective (the first dense
  all-reduce bucket, or the replicas' check), and it is charged after that, before any noise.
* LazyDP on replicated tables catches up the union of the rows all ranks read.
* :class:`~lazydp.distributed.sharded.ShardedEmbeddingBag` tables are taken out of the wrapped
  optimizers (they must be plain SGD) and updated by their owners with independent per-rank
  noise streams.
* Every rank must run forward, backward and ``step()`` every step, even on an empty batch.
* Evaluation forwards are collectives too (LazyDP catch-up, sharded lookups): run them on
  every rank, or flush on every rank first (then replicated tables' reads under no_grad are
  local until the next step). A forward on some ranks only is refused on every rank when it
  meets the others' next one (data_parallel.check_same_exchange), not left to hang.
* Restart: ``load_checkpoint`` re-keys every noise stream (fresh broadcast entropy; with a user
  seed, a stream derived from the charged step count), so re-run steps never replay noise; the
  ledger is never lowered (the base engine refuses a ledger behind the checkpoint). After a
  crash the ranks' ledgers can differ by a step, so a checkpoint records every rank's count
  and each rank's ledger is checked against its own.
* Checkpoints: under lazydp ``save_checkpoint`` flushes the tables first, which the replicated
  ones must do on every rank at the same step (call ``engine.flush()`` on every rank, or
  ``save_checkpoint`` on every rank; a flush on one rank alone makes the replicas drift apart).
  Without sharded tables rank 0's checkpoint serves every rank. With sharded tables every rank
  saves and loads its own file (e.g. ``checkpoint.rank{r}.pt``).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from lazydp.accounting import SAMPLERS
from lazydp.checkpoint_file import atomic_save, released_state
from lazydp.distributed._comm import (
    ProcessGroup,
    all_gather_sizes,
    all_gather_varlen,
    comm_device,
    shared_secret_seed,
    world,
)
from lazydp.distributed.data_parallel import ClippedSumReducer, union_catch_up_hook
from lazydp.distributed.sharded import ShardedEmbeddingBag
from lazydp.engine import MODES, PrivacyEngine, seeded_root
from lazydp.errors import (
    ERROR_TYPES,
    ConfigError,
    LazyDPError,
    PrivacyError,
    UnsupportedOptimizerError,
)
from lazydp.noise import GaussianNoise, rekeyed_state
from lazydp.optim.lazy import SgdStep
from lazydp.optim.sgd_settings import sgd_step

_SHARD_STREAM = 1 << 32  # seeded runs: shard streams live under (root, 2**32 + rank, table)

#: A rank that did not refuse a step raises the refusing rank's error type (a loop that skips a
#: batch on InputError then skips it on every rank); a refusal of any other type gives
#: LazyDPError. A rank's vote on a step is 0, or 1 + the index of its refusal's type.
_REFUSALS = ERROR_TYPES
_MESSAGE_MAX = 4000  # characters of a refusal sent to the other ranks


class DistributedPrivacyEngine(PrivacyEngine):
    """PrivacyEngine for data-parallel (and row-sharded) private training under torchrun.

    Args: as :class:`lazydp.PrivacyEngine`, plus ``process_group`` (None: the default group)
    and ``bucket_cap_mb`` (largest dense all-reduce buffer).

    Example (inside each torchrun worker, after ``dist.init_process_group("gloo")``)::

        engine = DistributedPrivacyEngine(ledger_path=f"out/ledger.rank{rank}.jsonl")
        model, opt, loader = engine.make_private(module=model, optimizer=opt,
            data_loader=DataLoader(full_dataset, batch_size=256),   # global expected batch
            noise_multiplier=1.0, max_grad_norm=1.0, mode="lazydp")
        for batch in loader:   # this rank's Poisson shard; may be empty -- still step
            opt.zero_grad(); loss_fn(model, batch).backward(); opt.step()
    """

    def __init__(
        self,
        accountant: str = "pld",
        seed: int | None = None,
        ledger_path: str | os.PathLike[str] | None = None,
        process_group: ProcessGroup = None,
        bucket_cap_mb: float = 25.0,
        **unknown: Any,
    ) -> None:
        # Unknown keywords (Opacus' among them) get the base engine's refusal with advice.
        super().__init__(accountant=accountant, seed=seed, ledger_path=ledger_path, **unknown)
        self.process_group = process_group
        self.bucket_cap_mb = bucket_cap_mb
        self.sharded: dict[str, ShardedEmbeddingBag] = {}
        self.reducer: ClippedSumReducer | None = None
        self._ledgers_at_start: list[int] = []
        self._replicas = False  # replicated LazyDP tables on several ranks (_replica_draws)

    # ------------------------------------------------------------------ set-up
    def make_private(  # type: ignore[override]
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer | list[Optimizer],
        data_loader: DataLoader,
        rank: int | None = None,
        world_size: int | None = None,
        **kwargs: Any,
    ) -> tuple[nn.Module, Optimizer, DataLoader]:
        """As :meth:`PrivacyEngine.make_private`; rank and world size default to the group's."""
        g_rank, g_size = world(self.process_group)
        rank = g_rank if rank is None else rank
        world_size = g_size if world_size is None else world_size
        if (rank, world_size) != (g_rank, g_size):
            raise ConfigError(
                f"rank={rank}, world_size={world_size} disagree with the process group "
                f"({g_rank} of {g_size}); leave them out to use the group's."
            )
        mode = kwargs.get("mode", "dpsgd_f")
        self.sharded = {
            n: m for n, m in module.named_modules() if isinstance(m, ShardedEmbeddingBag)
        }
        self._check_same_start(module)
        self._ledgers_at_start = self._gather_ledger_steps()
        optimizers = [optimizer] if isinstance(optimizer, Optimizer) else list(optimizer)
        # _take_sharded_params edits the caller's groups: a refused call puts them back, or
        # the corrected call (the base engine allows one) finds the tables in no optimizer.
        groups = [(g, g["params"]) for o in optimizers for g in o.param_groups]
        try:
            shard_groups = self._take_sharded_params(optimizers, mode) if self.sharded else {}
            out = super().make_private(
                module=module,
                optimizer=optimizer,
                data_loader=data_loader,
                rank=rank,
                world_size=world_size,
                **kwargs,
            )
        except BaseException:
            for g, params in groups:
                g["params"] = params
            raise
        assert self.privacy is not None
        pr = self.privacy
        self._check_ranks_agree(
            {
                "noise_multiplier": pr.noise_multiplier,
                "max_grad_norm": pr.max_grad_norm,
                "sample_rate": pr.sample_rate,
                "expected batch size": pr.expected_batch_size,
                "mode": MODES.index(pr.mode),
                "sampler": SAMPLERS.index(pr.sampler),
                "parameters": sum(1 for _ in module.parameters()),
                "replicated elements": sum(
                    p.numel()
                    for p in module.parameters()
                    if not any(p is m.weight for m in self.sharded.values())
                ),
                "sharded rows": sum(
                    m.num_embeddings * m.embedding_dim for m in self.sharded.values()
                ),
            },
            "every rank must build the same model and call make_private with the same settings "
            "(a rank with another noise multiplier would noise its shard differently from what "
            "the ledger records).",
            ConfigError,
        )
        opt = self.optimizer
        if opt is None:  # mode "sgd": the non-private reference
            return out
        shard_weights = {m.weight for m in self.sharded.values()}
        params = [
            p
            for layer in opt.capture.layers
            for p in layer.params().values()
            if p not in shard_weights
        ]
        tables = [p for p in params if p in opt.tables]
        self.reducer = ClippedSumReducer(
            [p for p in params if p not in opt.tables],
            tables,
            self.process_group,
            self.bucket_cap_mb,
        )
        opt.reduce_hook = self._reduce
        if self.sharded:
            opt.before_charge = self._check_shard_steps
        self._replicas = bool(opt.lazy) and world(self.process_group)[1] > 1
        for p, table in opt.lazy.items():
            opt.tables[p].read_hook = self._timed(
                union_catch_up_hook(
                    table,
                    lambda: opt.steps_done,
                    self.process_group,
                    settled=lambda: opt._flushed_at == opt.steps_done,
                )
            )
        assert self.noise is not None and self.privacy is not None
        for k, (name, m) in enumerate(self.sharded.items()):
            m.attach(
                self._shard_noise(k),
                self.privacy.noise_std,
                self.privacy.expected_batch_size,
                shard_groups[name],
                lazy=mode == "lazydp",
                timer=self.timer,
                clip=self.privacy.max_grad_norm,
            )
            self._hooks += self._table_hooks(m)
        return out

    def _check_shard_steps(self) -> None:
        """The sharded tables' SGD settings, checked with the step's other checks: their update
        runs after the charge, in the reduce hook, where a refusal of an lr gone negative left
        the step charged for nothing."""
        for m in self.sharded.values():
            m.check_step()

    def _agreed(
        self, refusal: Exception | None, charge: Callable[[], None], votes: list[int]
    ) -> None:
        """Right after the step's first collective, which carried every rank's vote (0: take
        the step; else _refusal_code): if any rank refused the step, every rank raises and
        none charges it (_refuse_step); else the step is charged.

        Every check of a step runs on each rank alone, and NaN in one rank's batch, a hook or
        an lr schedule changed on one rank fail there only: the other ranks charged the step
        and waited in its first collective (gloo's "Connection closed by peer", or a hang while
        the refusing rank lives on), or paired it with that rank's next step."""
        if any(votes):
            self._refuse_step(refusal, votes)
        charge()

    def _gathered_votes(self, vote: int) -> list[int]:
        """Every rank's vote in a collective of its own, which, with replicated LazyDP tables
        on several ranks, checks that the replicas drew alike (when no rank refused)."""
        draws = self._replica_draws() if self._replicas else {}
        table = self._gather_values({"refused": vote} | draws)
        votes = [int(x) for x in table[:, 0].tolist()]
        if draws and not any(votes):
            self._check_ranks_agree(
                draws,
                "a rank drew from the noise streams the ranks share alone -- a full flush of the "
                "replicated LazyDP tables (model.state_dict(), engine.flush(), export() or "
                "save_checkpoint() on one rank only) or a forward of a rank not in step -- so "
                "the replicas now differ. Do these on every rank at the same step (rank 0 may "
                "then write the file alone), and resume every rank from the last checkpoint. "
                "Nothing was charged.",
                ConfigError,
                table[:, 1:],
            )
        return votes

    def _replica_draws(self) -> dict[str, float]:
        """What every rank must agree on, before the charge, when replicated LazyDP tables are
        on several ranks: whether a rank flushed them alone, or drew from the shared streams
        in any other way the others did not (two floats per rank).

        A full flush draws from the noise stream every rank shares: done by one rank only
        (``if rank == 0: model.state_dict()``, the DDP idiom for a snapshot), that rank's
        stream runs ahead, and from then on its replica draws other catch-up noise than the
        others -- the replicas drift apart silently."""
        assert self.optimizer is not None and self.noise is not None
        return {
            "step of the last full LazyDP flush": self.optimizer._flushed_at,
            # shard streams (and theirs below) are each rank's own: left out
            "draws on the shared noise streams": self.noise.calls_below(_SHARD_STREAM),
        }

    def _refuse_step(self, refusal: Exception | None, codes: list[int]) -> NoReturn:
        """After a vote with refusals (``codes``, by rank): every rank's error message is
        gathered (a collective, on this path only); a refusing rank raises its own error, the
        others one of the same type naming the first rank that refused, with its message."""
        text = "" if refusal is None else f"{type(refusal).__name__}: {refusal}"[:_MESSAGE_MAX]
        data = torch.tensor(list(text.encode()), dtype=torch.uint8)
        device = comm_device(self.process_group)
        counts = all_gather_sizes(torch.tensor([data.numel()], device=device), self.process_group)
        sizes = counts.view(-1).tolist()
        raw = all_gather_varlen(data.to(device), sizes, self.process_group).cpu()
        if refusal is not None:
            raise refusal
        refused = [r for r, code in enumerate(codes) if code]
        first = refused[0]
        start = sum(sizes[:first])
        message = bytes(raw[start : start + sizes[first]].tolist()).decode(errors="replace")
        also = f" (ranks {refused} refused it: see each one's output)" if len(refused) > 1 else ""
        error = _REFUSALS[codes[first] - 1] if codes[first] <= len(_REFUSALS) else LazyDPError
        raise error(
            f"rank {first} refused this step{also}, so every rank refuses it: nothing was changed "
            f"or charged on any rank. Rank {first}'s error (see its output): {message}"
        )

    def _check_same_start(self, module: nn.Module) -> None:
        """ConfigError on every rank alike unless all ranks use the same engine seed (or all
        none) and start from the same replicated weights (a collective, before any other).

        Why: each rank applies the one all-reduced, once-noised update to its own replica. A
        rank whose noise stream is keyed by another seed adds other noise (the model's copies
        drift, and what a rank computes its gradients at is noise never released); a rank
        whose initial weights differ (the model built after ``torch.manual_seed(rank)``)
        trains another model on the shared updates. Unlike DDP nothing is broadcast: a
        silent copy would hide a set-up that also differs elsewhere. A rank with a seed and
        one without would otherwise wait forever in the seed broadcast."""
        self._check_ranks_agree(
            {
                "noise seed given": int(self.seed is not None),
                "noise seed (digest)": 0 if self.seed is None else _seed_digest(self.seed),
                "initial weights (digest)": _replicated_digest(module, self.sharded),
            },
            "every rank must pass the same PrivacyEngine seed (or none on every rank) and build "
            "the model from the same weights: seed its initialisation identically on every "
            "rank (torch.manual_seed(same) before building it, not a per-rank seed), or load "
            "rank 0's weights everywhere. Nothing was changed or charged.",
            ConfigError,
        )

    def _gather_values(self, values: dict[str, Any]) -> torch.Tensor:
        """Every rank's ``values`` as float64 (NaN for one that is no number), one row per rank
        in rank order (a collective)."""
        numbers = [
            float(x) if isinstance(x, int | float) else float("nan") for x in values.values()
        ]
        mine = torch.tensor(numbers, dtype=torch.float64, device=comm_device(self.process_group))
        return all_gather_sizes(mine, self.process_group).cpu()

    def _check_ranks_agree(
        self,
        values: dict[str, Any],
        advice: str,
        error: type[Exception],
        table: torch.Tensor | None = None,
    ) -> None:
        """Raise ``error`` on every rank alike if any value differs between ranks (a collective,
        unless ``table`` holds them gathered already: _gather_values)."""
        if table is None:
            table = self._gather_values(values)
        differ = [
            f"{name} {table[:, i].tolist()}"
            for i, name in enumerate(values)
            if not bool((table[:, i] == table[0, i]).all())  # nan never agrees: refused too
        ]
        if differ:
            raise error(f"the ranks disagree on {', '.join(differ)} (rank 0 first): {advice}")

    def _take_sharded_params(
        self, optimizers: list[Optimizer], mode: str
    ) -> dict[str, Callable[[], SgdStep]]:
        """Remove sharded weights from the optimizers (their owners update them); return, per
        table, how to read its group's current SGD settings. A lookup by position, not the
        group dict: ``Optimizer.load_state_dict`` replaces the dicts, and a resumed run's
        scheduler then drives the new ones (a kept dict froze the shard at its lr of
        make_private)."""
        if mode in ("sgd", "dpsgd_r"):
            raise ConfigError(
                f"mode={mode!r} runs autograd through the table, which cannot cross the "
                "all-to-all of a ShardedEmbeddingBag; use mode='dpsgd_f' (same update, ghost "
                "norms), 'dpsgd_b' or 'lazydp'."
            )
        found: dict[str, Callable[[], SgdStep]] = {}
        for opt in optimizers:
            for j, group in enumerate(opt.param_groups):
                for name, m in self.sharded.items():
                    if any(p is m.weight for p in group["params"]):
                        if sgd_step(opt, group) is None:
                            raise UnsupportedOptimizerError(
                                f"sharded table {name!r} is in a {type(opt).__name__} group "
                                "(or SGD with dampening or maximize); sharded tables are "
                                "updated by their owners with SGD. Put them in their own "
                                "torch.optim.SGD (weight decay, momentum and Nesterov may stay)."
                            )
                        group["params"] = [p for p in group["params"] if p is not m.weight]
                        found[name] = functools.partial(_group_lr, opt, j)
        missing = sorted(set(self.sharded) - set(found))
        if missing:
            raise ConfigError(f"sharded tables {missing} are in no optimizer; add their weights.")
        return found

    def _timed(self, hook: Any) -> Any:
        def timed(rows: torch.Tensor, defer: bool) -> None:
            # The hook catches up the union over ranks, not these ids: it writes every row
            # (no deferred block) and has no grouping of these ids to share.
            with self.timer.phase("lazy_catch_up"):
                hook(rows)

        return timed

    def _reduce(
        self,
        sums: dict[nn.Parameter, Any],
        refusal: Exception | None,
        charge: Callable[[], None],
    ) -> None:
        """``reduce_hook``: the ranks agree on the step (refused on any rank: raised on every
        rank, _agreed), it is charged, the clipped sums are summed over the ranks, and the
        sharded tables updated. The vote rides on the step's first collective: the replicas'
        check (replicated LazyDP tables), else the first dense all-reduce bucket; a model with
        neither (tables only) takes one tiny collective of its own."""
        assert self.reducer is not None
        vote = _refusal_code(refusal)
        agreed = functools.partial(self._agreed, refusal, charge)
        if self._replicas or not self.reducer.buckets:
            agreed(self._gathered_votes(vote))
            self.reducer(sums)
        else:
            self.reducer(sums, vote, agreed)
        for m in self.sharded.values():
            m.apply_clipped_sum(sums.pop(m.weight, None))

    # ------------------------------------------------------------------ noise streams
    def _make_noise(self, rank: int, world_size: int) -> GaussianNoise:
        """One stream shared by all ranks: identical draws everywhere, so noise is added once."""
        if self.seed is None:
            seed = shared_secret_seed(self.process_group, comm_device(self.process_group))
            return GaussianNoise(seed=seed, stream=0)
        # make_private gathered every rank's count just before (_ledgers_at_start)
        return seeded_root(self.seed, max(self._ledgers_at_start))

    def _shard_noise(self, k: int) -> GaussianNoise:
        """Sharded table k's stream on this rank: independent of every other rank and table."""
        if self.seed is None:
            return GaussianNoise(seed=None)  # OS entropy per chunk
        assert self.noise is not None
        rank = world(self.process_group)[0]
        return self.noise.fork(_SHARD_STREAM + rank).fork(k)

    def _rekey_noise(self) -> None:
        """Fresh streams after a restart: re-run steps must not replay the crashed run's noise."""
        assert self.noise is not None
        if self.seed is None:
            seed: int | None = shared_secret_seed(
                self.process_group, comm_device(self.process_group)
            )
            root = 0
        else:
            seed, root = self.seed, 1 + self._charged_steps()
        # Forks (tables, and shards in a seeded run) hang off the root and follow it in place.
        self.noise.rekey_(seed, [root])

    def _charged_steps(self) -> int:
        """The largest charged-step count of any rank, the same on every rank (a collective;
        after a crash the ranks' ledgers can differ by a step)."""
        return max(self._gather_ledger_steps())

    # ------------------------------------------------------------------ flush, export, checkpoints
    def flush(self) -> None:
        """Apply all pending LazyDP noise: replicated tables (identically) and own shards."""
        super().flush()
        if not self._suppress_flush:
            for m in self.sharded.values():
                m.flush()

    def export(self, path: str | os.PathLike[str]) -> Path:
        """Save the flushed model; with sharded tables a collective (rank 0 writes full tables)."""
        if not self.sharded:
            return super().export(path)
        self.flush()
        assert self.module is not None
        state = released_state(self.module.state_dict())
        for name, m in self.sharded.items():
            state[f"{name}.weight" if name else "weight"] = m.gather_weight()
        if world(self.process_group)[0] == 0:
            atomic_save(state, path)
        return Path(path)

    def save_checkpoint(self, path: str | os.PathLike[str], **extra: Any) -> Path:
        """Atomic private training state; with sharded tables, call it on every rank (own path).
        Under lazydp it flushes the tables: flush on every rank at this step (see the module
        doc)."""
        real = self.noise
        if self.seed is None and real is not None:
            # The shared stream's secret seed would let a checkpoint's reader regenerate (and
            # subtract) every noise draw; a resumed run re-keys anyway, so never write it.
            self.noise = _Redacted(rekeyed_state(real.state_dict(), None, list(real.stream_path)))  # type: ignore[assignment]
        try:
            return super().save_checkpoint(path, **extra)
        finally:
            self.noise = real

    def _gather_ledger_steps(self) -> list[int]:
        """Every rank's charged-step count, in rank order (a collective)."""
        mine = torch.tensor([self.ledger.steps], device=comm_device(self.process_group))
        return [int(x) for x in all_gather_sizes(mine, self.process_group).view(-1).tolist()]

    def _ledger_steps_by_rank(self) -> list[int]:
        """Each rank's charged-step count now, known without a collective (rank 0 saves a
        checkpoint alone): every completed step charged every rank once, so the counts keep
        the differences they had at make_private. After a crash they can differ (one rank died
        between the step's vote and its charge, the others charged it), and a checkpoint
        stamped with the writer's count alone was refused at the next resume on a rank that
        charged one step less."""
        if not self._ledgers_at_start:
            return [self.ledger.steps]
        rank = world(self.process_group)[0]
        since = self.ledger.steps - self._ledgers_at_start[rank]
        return [n + since for n in self._ledgers_at_start]

    def _checkpoint_extra(self, extra: dict[str, Any]) -> dict[str, Any]:
        extra["_ledger_steps"] = self._ledger_steps_by_rank()
        # Read after save_checkpoint's flush: the shards' history must match the saved weights.
        if self.sharded:
            extra["_sharded"] = {n: m.training_state_dict() for n, m in self.sharded.items()}
        return extra

    def _check_checkpoint(self, state: dict[str, Any], path: str | os.PathLike[str]) -> None:
        # First, and on every rank (a collective): checkpoints of different steps would each
        # load, then the ranks would wait on different collectives (a hang) or drift apart.
        saved = state.get("lazy")
        lazy: dict[str, Any] = saved if isinstance(saved, dict) else {}
        shards = dict(dict(state.get("extra", {})).get("_sharded", {}))
        by_rank = _ledger_steps_saved(state, path)
        rank = world(self.process_group)[0]
        self._check_ranks_agree(
            {
                # rank 0's count: the same in every rank's file taken at one step
                "charged steps": by_rank[0] if by_rank else state.get("ledger_steps"),
                "optimizer steps": lazy.get("steps_done", 0),
                "shard steps": sum(int(dict(s).get("step", 0)) for s in shards.values()),
            },
            f"checkpoint {path}: the ranks' checkpoints were taken at different steps (one rank "
            "crashed before writing?); resume every rank from the same step. Nothing was loaded.",
            PrivacyError,
        )
        if by_rank and rank < len(by_rank):
            # This rank's own count at the checkpoint: its ledger must not be behind that.
            state = {**state, "ledger_steps": by_rank[rank]}
        super()._check_checkpoint(state, path)
        sharded = dict(state.get("extra", {})).get("_sharded", {})
        for name, shard in dict(sharded).items():
            if name in self.sharded:
                self.sharded[name].check_training_state_dict(shard)

    @torch.inference_mode(False)  # as PrivacyEngine's: the shards' state too
    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        check_extra: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Restore (a collective): the ledger is never lowered and every noise stream is re-keyed."""
        extra = super().load_checkpoint(path, check_extra)
        extra.pop("_ledger_steps", None)
        for name, state in dict(extra.pop("_sharded", {})).items():
            if name in self.sharded:
                self.sharded[name].load_training_state_dict(state)
        return extra


def _refusal_code(refusal: Exception | None) -> int:
    """0 for no refusal, 1 + its index in _REFUSALS, or one past them for another error."""
    if refusal is None:
        return 0
    for k, kind in enumerate(_REFUSALS):
        if isinstance(refusal, kind):
            return 1 + k
    return 1 + len(_REFUSALS)


def _ledger_steps_saved(state: dict[str, Any], path: str | os.PathLike[str]) -> list[int]:
    """The ranks' charged-step counts a checkpoint recorded ([] in one from before they were)."""
    saved = dict(state.get("extra", {})).get("_ledger_steps")
    if saved is None:
        return []
    if (
        not isinstance(saved, list)
        or not saved
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in saved)
    ):
        raise PrivacyError(f"checkpoint {path} has no valid per-rank ledger_steps; it is damaged.")
    return saved


def _seed_digest(seed: int) -> int:
    """48 bits of a BLAKE2 digest of all 128 bits of ``seed`` (exact in a float64 collective;
    ``seed % 2**52`` let seeds 1 and 1 + 2**52 pass as equal)."""
    data = seed.to_bytes(16, "little", signed=True)
    return int.from_bytes(hashlib.blake2b(data, digest_size=6).digest(), "little")


def _replicated_digest(module: nn.Module, sharded: dict[str, ShardedEmbeddingBag]) -> int:
    """48 bits of a BLAKE2 digest of every replicated parameter's and buffer's bytes, in
    registration order (sharded weights differ by design and are left out): exact, so
    replicas equal to the last bit agree whatever their thread counts."""
    own = {id(m.weight) for m in sharded.values()}
    h = hashlib.blake2b(digest_size=6)
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if id(t) in own:
            continue
        if is_lazy(t):  # no values yet: make_private refuses it next, with what to do
            h.update(f"{name}: uninitialized".encode())
            continue
        data = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str((tuple(data.shape), data.dtype)).encode())
        if data.numel():
            h.update(data.view(-1).view(torch.uint8).numpy().data)
    return int.from_bytes(h.digest(), "little")


def _group_lr(opt: Optimizer, index: int) -> SgdStep:
    """The SGD hyper-parameters of a sharded table's group, read live (schedulers change them)."""
    step = sgd_step(opt, opt.param_groups[index])
    if step is None:
        raise ConfigError(
            "a sharded table's optimizer group is no longer SGD without dampening or maximize; "
            "its owners' update assumes that. Nothing was changed."
        )
    return step


class _Redacted:
    """Stands in for the noise source while a checkpoint is written: only its state, seedless."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state
