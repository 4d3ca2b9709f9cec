"""Data-parallel reduction of clipped sums, and LazyDP catch-up on the union of rows read.

Contract (DESIGN.md invariant 7: a W-rank step equals the 1-rank step on the union batch):
* :class:`ClippedSumReducer` is ``DPOptimizer.reduce_hook``. It runs after each rank has clipped
  *its own* examples and summed them, and before noise: clipping happens per example, never
  on an averaged gradient. It replaces every value of ``sums`` by the sum over all ranks:
  - dense sums: flattened into buckets of at most ``bucket_cap_mb`` and all-reduced, one
    collective per bucket (one per step for models under the cap); the first also carries each
    rank's vote on the step, when the engine passes one (a step refused on one rank is then
    refused on every rank, before the charge);
  - embedding-table sums: exchanged as rows -- sizes first, then one all-gather of every table's
    indices and one of every table's values (3 collectives per step for all tables together).
    A table gradient is never densified; the gathered rows stay uncoalesced (they add up).
  Every rank runs every collective every step, with zeros / no rows when its local batch is
  empty, so Poisson's empty batches never desynchronise the job. The result is identical on all
  ranks, so with the shared noise stream the replicas stay bit-identical.
* :func:`union_catch_up_hook` replaces a replicated LazyDP table's read hook: ranks read different
  rows, so each gathers the row ids all ranks are about to read and catches up the sorted union
  with the shared noise stream. Every replica applies the same draws to the same rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from lazydp.clipping._base import ClippedSum, SparseRows
from lazydp.distributed._comm import (
    ProcessGroup,
    all_gather_sizes,
    all_gather_varlen,
    all_reduce_sum_,
    comm_device,
    world,
)
from lazydp.errors import ConfigError
from lazydp.optim.lazy import LazyTable


def _buckets(params: Sequence[nn.Parameter], cap_bytes: int) -> list[list[nn.Parameter]]:
    """Consecutive params of one dtype/device, at most ``cap_bytes`` per bucket (>= 1 param)."""
    out: list[list[nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        last = out[-1] if out else None
        fits = last is not None and size + nbytes <= cap_bytes
        if last is None or not fits or (last[0].dtype, last[0].device) != (p.dtype, p.device):
            out.append([p])
            size = nbytes
        else:
            last.append(p)
            size += nbytes
    return out


def sum_dtype(p: nn.Parameter) -> torch.dtype:
    """The dtype every rank sends ``p``'s clipped sum in. The clippers take sums in at least
    float32 (clipping/_base.py, ``widened``): a bfloat16 / float16 parameter's is float32 on a
    rank with examples, and a rank without (an empty Poisson batch, a refused step) must send
    the same bytes -- zeros in the parameter's dtype were half as many, and gloo aborted every
    rank on the size mismatch."""
    return torch.promote_types(p.dtype, torch.float32)


def _as_rows(s: ClippedSum | None, like: nn.Parameter) -> SparseRows:
    """A table's clipped sum as rows (dpsgd_r on a dense-gradient table gives a dense sum)."""
    if s is None:
        return SparseRows(
            torch.empty(0, dtype=torch.long, device=like.device),
            like.new_empty((0, like.shape[1]), dtype=sum_dtype(like)),
            like.shape[0],
        )
    if isinstance(s, SparseRows):
        return s
    rows = s.ne(0).any(1).nonzero().view(-1)
    return SparseRows(rows, s[rows], like.shape[0], coalesced=True)


class ClippedSumReducer:
    """``reduce_hook`` summing every rank's clipped sums (dense bucketed, tables as rows).

    Args:
        dense: the non-table parameters, in the same order on every rank.
        tables: the replicated embedding-table weights, in the same order on every rank.
        group: the process group (None: the default one).
        bucket_cap_mb: largest all-reduce buffer; 0 means one bucket per parameter.

    Example (one process; under torchrun every rank builds the same reducer)::

        >>> lin = nn.Linear(2, 1)
        >>> reducer = ClippedSumReducer([lin.weight, lin.bias], [])
        >>> sums = {lin.weight: torch.ones(1, 2)}
        >>> reducer(sums); sums[lin.bias].tolist()
        [0.0]
    """

    def __init__(
        self,
        dense: Sequence[nn.Parameter],
        tables: Sequence[nn.Parameter],
        group: ProcessGroup = None,
        bucket_cap_mb: float = 25.0,
    ) -> None:
        if not bucket_cap_mb >= 0:
            raise ConfigError(
                f"bucket_cap_mb={bucket_cap_mb!r} must be >= 0 (megabytes per all-reduce "
                "bucket); use the default 25.0."
            )
        self.group = group
        self.tables = list(tables)
        self.buckets = _buckets(list(dense), int(bucket_cap_mb * 2**20))
        dtypes = {t.dtype for t in self.tables}
        if len(dtypes) > 1:
            raise ConfigError(
                f"replicated tables have mixed dtypes {sorted(map(str, dtypes))}; their rows are "
                "exchanged in one buffer. Give every embedding table the same dtype."
            )

    def __call__(
        self,
        sums: dict[nn.Parameter, ClippedSum],
        vote: int = 0,
        agreed: Callable[[list[int]], None] | None = None,
    ) -> None:
        """Sum ``sums`` over the ranks. With ``agreed`` (there must be a dense bucket), the first
        bucket's all-reduce also carries every rank's ``vote`` (a small int, one slot per rank)
        and ``agreed(votes)`` runs right after it, before any other collective: the engine
        agrees there whether to take the step (a refused one raises on every rank), at no
        collective of its own."""
        assert agreed is None or self.buckets, "no collective to carry the votes"
        for k, bucket in enumerate(self.buckets):
            votes = self._reduce_dense(bucket, sums, vote if agreed and k == 0 else None)
            if agreed is not None and votes is not None:
                agreed(votes)
        if self.tables:
            self._gather_rows(sums)

    def _reduce_dense(
        self, bucket: list[nn.Parameter], sums: dict[nn.Parameter, ClippedSum], vote: int | None
    ) -> list[int] | None:
        parts = []
        for p in bucket:
            s = sums.get(p)
            if isinstance(s, SparseRows):  # a non-table parameter never gets rows; be safe
                s = s.to_dense()
            dtype = sum_dtype(p)
            parts.append(
                torch.zeros(p.numel(), dtype=dtype, device=p.device)
                if s is None
                else s.detach().reshape(-1).to(dtype)
            )
        rank, size = world(self.group)
        if vote is not None and size > 1:
            # Exact in any float dtype: small ints, one rank's in each slot.
            slots = torch.zeros(size, dtype=parts[0].dtype, device=parts[0].device)
            slots[rank] = vote
            parts.append(slots)
        flat = all_reduce_sum_(torch.cat(parts), self.group)
        votes = None
        if vote is not None:
            votes = [int(v) for v in flat[-size:].tolist()] if size > 1 else [vote]
        offset = 0
        for p in bucket:
            sums[p] = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return votes

    def _gather_rows(self, sums: dict[nn.Parameter, ClippedSum]) -> None:
        local = [_as_rows(sums.get(t), t) for t in self.tables]
        dims = [t.shape[1] for t in self.tables]
        device = comm_device(self.group)
        counts = all_gather_sizes(
            torch.tensor([r.indices.numel() for r in local], dtype=torch.long, device=device),
            self.group,
        ).cpu()  # (W, T)
        indices = all_gather_varlen(
            torch.cat([r.indices for r in local]).to(device), counts.sum(1).tolist(), self.group
        )
        dim = torch.tensor(dims)
        dtype = sum_dtype(self.tables[0])  # one dtype for all tables (checked at set-up)
        values = all_gather_varlen(
            torch.cat([r.values.reshape(-1).to(dtype) for r in local]).to(device),
            (counts * dim).sum(1).tolist(),
            self.group,
        )
        # Split the rank-major concatenation back into tables: rank r holds table t's rows at
        # (sum of earlier ranks) + (sum of earlier tables of rank r).
        idx_chunks = torch.split(indices, counts.reshape(-1).tolist())
        val_chunks = torch.split(values, (counts * dim).reshape(-1).tolist())
        world_size, n_tables = counts.shape
        for k, t in enumerate(self.tables):
            picks = [r * n_tables + k for r in range(world_size)]
            sums[t] = SparseRows(
                torch.cat([idx_chunks[j] for j in picks]).to(t.device),
                torch.cat([val_chunks[j] for j in picks]).view(-1, dims[k]).to(t.device),
                t.shape[0],
            )


#: Tags a table exchange's first collective: a read by a training forward or by one under
#: torch.no_grad(), a sharded table's update (apply_clipped_sum), its gather_weight (export).
READ_TRAIN, READ_EVAL, UPDATE, GATHER = 0x4C5A01, 0x4C5A02, 0x4C5A03, 0x4C5A04
_NAMES = {READ_TRAIN: "training forward", READ_EVAL: "no_grad forward", GATHER: "gather_weight"}


def check_same_exchange(kinds: list[int], what: str) -> None:
    """ConfigError on every rank alike unless every rank is in the same kind of exchange.

    ``kinds`` holds each rank's tag (from the exchange's first collective, so every rank sees
    all of them). A forward run on some ranks only -- ``if rank == 0: evaluate(model)``, the
    DDP idiom -- otherwise meets the others' next training forward in this collective: the job
    hangs in gloo until its timeout, aborts on a size mismatch, or (worse) pairs unrelated
    exchanges. Raised after that one collective and before any row is caught up or sent."""
    found = [int(k) for k in kinds]
    if all(k == found[0] for k in found):
        return
    if GATHER in found:
        raise ConfigError(
            f"gather_weight() (engine.export() with sharded tables) ran on some ranks only: "
            f"the ranks are in {[_NAMES.get(k, 'another collective') for k in found]} "
            "(rank 0 first). Assembling a sharded table is a collective: call engine.export() "
            "on every rank at the same step (rank 0 alone writes the file). Nothing was "
            "charged (replicated LazyDP tables it flushed on rank 0 alone differ now: resume "
            "every rank from the last checkpoint)."
        )
    names = {READ_TRAIN: "training", READ_EVAL: "no_grad"}
    raise ConfigError(
        f"a read of {what} ran on some ranks only: the ranks are in "
        f"{[names.get(k, 'another collective') for k in found]} forwards (rank 0 first). "
        "Reads of a table with pending LazyDP noise, and every read of a sharded table, are "
        "collectives. Evaluate on every rank, with as many batches on each; or, for "
        "replicated tables, call engine.flush() on every rank first: until the next step a "
        "flushed table's reads need no collective, so rank 0 may then evaluate alone; or "
        "engine.export() on every rank and evaluate the exported model. Nothing was changed "
        "or charged."
    )


def read_kind() -> int:
    """This forward's tag for :func:`check_same_exchange`."""
    return READ_TRAIN if torch.is_grad_enabled() else READ_EVAL


def union_catch_up_hook(
    table: LazyTable,
    step: Callable[[], int],
    group: ProcessGroup = None,
    settled: Callable[[], bool] | None = None,
) -> Callable[[Tensor], None]:
    """A read hook: catch up the union over ranks of the rows about to be read, at ``step()``.

    Every rank must run the same table forwards in the same order (a collective per call),
    except evaluation reads (under torch.no_grad()) while ``settled()``: the tables were fully
    flushed at this step (the same answer on every rank, as the flush must run on all), so no
    row owes noise and the read is local.
    """

    def hook(rows: Tensor) -> None:
        if not torch.is_grad_enabled() and settled is not None and settled():
            # Nothing pending: a catch-up would add exactly 0 and only consume shared draws.
            # Skipping it on every rank alike keeps the replicas identical, and lets rank 0
            # evaluate alone after engine.flush() on every rank (no collective to wait in).
            # Training reads keep their collective: it checks that the ranks are in step.
            return
        device = comm_device(group)
        mine = torch.unique(rows).to(device)
        sizes = torch.tensor([mine.numel(), read_kind()], device=device)
        info = all_gather_sizes(sizes, group)  # (W, 2): rows and read kind per rank
        check_same_exchange(info[:, 1].tolist(), "a replicated LazyDP table")
        union = all_gather_varlen(mine, info[:, 0].tolist(), group)
        table.catch_up(union.to(table.weight.device), step())

    return hook
