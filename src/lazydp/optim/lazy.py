"""LazyDP: lazy noise update with aggregated noise sampling (Lim et al., ASPLOS 2024).

DP-SGD with plain SGD adds ``lr_s * sigma * C / B * z_s`` (z_s ~ N(0, I)) to *every* row of a table at
every step s. Because the update is a sum, a row's noise can wait until the row is next observed,
and the k pending steps can be drawn as ONE Gaussian with std sigma*C/B * sqrt(sum_s lr_s^2): the
final model has exactly the DP-SGD distribution.

State per table (the *history table*): for each row, the step up to which its noise has been applied
(int32: 4 bytes per row). Per parameter group: prefix sums of lr and lr^2 over steps (so any LR
schedule is exact; the sum of lr is only used by the constant-noise test override). SGD's weight
decay is deferred with the noise through a prefix product (:class:`LrPrefix`); SGD with momentum
keeps a velocity per row and is in ``lazy_momentum.py``.

Invariant: no row is observed with pending noise. ``catch_up(rows, t)`` runs before every forward
lookup (training or evaluation), ``flush(t)`` before state_dict / export / end of an epoch.
Per training step only rows read by the batch are touched -- no work proportional to table size.

Deferred write (``catch_up(..., defer=True)``, training forwards of layers that can read from the
caught-up block): the noised rows stay in the block, the forward reads them from there, and the
step's update writes block + gradient once, instead of writing the block and then rewriting the
same rows (a scattered row write is the dearest part of a high-pooling step: 4.5 ms for 150k rows
of d=32, twice per table per step on rmc1). Until then the table holds those rows without their
new noise, so every other way in -- another catch-up, an update that cannot use the block, a
flush, ``settle()`` -- writes the block back first. Noise is never lost: the block already holds
it, and the history table already counts it. (A write to those rows from outside between the
forward and the step is overwritten, as it was before by the update's row write.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lazydp import huge_pages
from lazydp._dispatch import cast, no_grad
from lazydp._timing import PhaseTimer
from lazydp.clipping._base import SparseRows
from lazydp.errors import ConfigError, PrivacyError
from lazydp.noise import GaussianNoise, active_override
from lazydp.noise_pool import NoisePool
from lazydp.optim.prefix_sum import PrefixSum
from lazydp.optim.rows import add_rows_
from lazydp.row_groups import RowGroups

_FLUSH_ROWS = 1 << 16  # rows per chunk in a full flush: bounds the temporary noise buffer


def check_table_lr(lr: float, weight_decay: float = 0.0) -> None:
    """ConfigError unless ``lr`` and ``weight_decay`` are finite and >= 0 with lr * weight_decay
    < 1: the prefix sums must stay exact, and a decay factor 1 - lr * wd <= 0 would zero or
    flip every row."""
    if not math.isfinite(lr) or lr < 0:
        raise ConfigError(
            f"learning rate {lr!r} of a LazyDP table's parameter group: it must be finite "
            "and >= 0 (check the LR schedule). No parameter was changed and nothing was charged."
        )
    if not math.isfinite(weight_decay) or weight_decay < 0 or lr * weight_decay >= 1:
        raise ConfigError(
            f"weight_decay {weight_decay!r} with learning rate {lr!r} on a LazyDP table: SGD "
            "multiplies every row by 1 - lr * weight_decay each step, which must stay in (0, 1] "
            "(weight_decay finite, >= 0 and below 1 / lr). No parameter was changed and nothing "
            "was charged."
        )


@dataclass(frozen=True)
class SgdStep:
    """One step's hyper-parameters of a table's torch.optim.SGD group (read live each step)."""

    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    nesterov: bool = False


#: The most steps a history table can record: it counts them in int32 (4 bytes per row). The
#: step past it is refused before its charge; the catch-up's index_fill_ raised torch's
#: "value cannot be converted to type int without overflow" from inside a forward.
MAX_STEPS = 2**31 - 1

#: A decay prefix product below this is rebased (after a full flush of its tables) long
#: before 1 / P^2 in the sums of lr^2 could overflow float64 (~1e308).
REBASE_BELOW = 1e-100


class LrPrefix:
    """Prefix sums over steps, in float64, of SGD with weight decay wd_s (0: plain SGD).

    With f_s = 1 - lr_s * wd_s, one step of eager DP-SGD on a row is
    ``W_{s+1} = f_s W_s + lr_s n_s - lr_s G_s / B`` (n_s the step's noise on the row, G_s its
    clipped sum, zero when the batch does not read it). With P[t] = prod_{s<t} f_s, a row whose
    noise and decay are applied up to step a equals, at step t > a and without reads,
    ``(P[t] / P[a]) W_a + sum_{s=a}^{t-1} lr_s (P[t] / P[s+1]) n_s``: a decay and ONE Gaussian
    of variance std^2 P[t]^2 (S2[t] - S2[a]) per element, with
    S2[t] = sum_{s<t} (lr_s / P[s+1])^2. S1[t] = sum_{s<t} lr_s / P[s+1] gives the same sum for
    a constant per-step noise (the test override). Without decay P is exactly 1, and S1, S2 are
    the plain sums of lr and lr^2: any LR (and decay) schedule is exact.

    S1 and S2 are compensated sums (optim/prefix_sum.py): a window keeps steps whose lr^2 is
    far below the sum of all steps before them. P, S1 and S2 are kept from the last rebase on
    (``offset``): a rebase follows every full flush (each epoch's end), so a run of any length
    holds about one epoch of them, not 40 bytes for every step it ever took.

    A step's clipped sum enters before that step's decay is applied (the row's history stays at
    the step), so the update adds ``-lr G / (B f)``: the next catch-up's decay turns it into
    ``-lr G / B`` (see :meth:`update_alpha`).
    """

    def __init__(self) -> None:
        self._s1, self._s2 = PrefixSum(), PrefixSum()
        self._p = torch.ones(1024, dtype=torch.float64)
        self._p_last = 1.0  # P[steps], as a Python float
        self.steps = 0
        self.base = 0  # the last rebase: no row's history may lie before it
        self.decays = False  # whether any step had a decay factor below 1

    def append_step(self, step: SgdStep) -> None:
        self.append(step.lr, step.weight_decay)

    def update_alpha(self, step: SgdStep, expected_batch_size: float) -> float:
        """The factor the step's clipped sum is added with: -lr / (B * f), f = 1 - lr * wd
        (the row's decay for this step comes at its next catch-up)."""
        return -step.lr / (expected_batch_size * (1.0 - step.lr * step.weight_decay))

    def append(self, lr: float, weight_decay: float = 0.0) -> None:
        check_table_lr(lr, weight_decay)
        t = self.steps
        i = t + 1 - self.offset
        if i >= self._p.numel():  # amortised O(1) growth
            self._p = torch.cat([self._p, torch.ones_like(self._p)])
        f = 1.0 - lr * weight_decay
        self.decays = self.decays or f != 1.0
        self._p_last *= f
        self._p[i] = self._p_last
        r = lr / self._p_last  # lr exactly when nothing decays (P == 1.0)
        self._s1.append(t, r)
        self._s2.append(t, r * r)
        self.steps = t + 1

    @property
    def offset(self) -> int:
        """The step of the first kept entry of P, S1 and S2 (the last rebase, or 0)."""
        return self._s2.offset

    def pending(
        self, applied: Tensor, t: int, sum_lr: bool = True
    ) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """(s1, s2, decay) for each row over the steps [applied, t): the constant-noise sum
        (None unless asked for: only the test override reads it), the variance factor, and the
        factor P[t] / P[applied] for the row's value (None when no step ever decayed)."""
        live = t == self.steps  # the current step: no tensor read (a read costs a sync)
        p_t = self._p_last if live else float(self._p[t - self.offset])
        # P, S1 and S2 restart together: one index into all three
        index = self._s2.index_of(applied)
        s2 = self._s2.window_at(index, self._s2.last if live else self._s2.at(t))
        decay = None
        if self.decays:
            # A true division: a row already at t gets exactly 1.
            decay = torch.full_like(s2, p_t).div_(self._p.index_select(0, index))
            s2.mul_(p_t * p_t)
        if not sum_lr:
            return None, s2, decay
        s1 = self._s1.window_at(index, self._s1.last if live else self._s1.at(t))
        return (s1.mul_(p_t) if self.decays else s1), s2, decay

    def needs_rebase(self) -> bool:
        return self._p_last < REBASE_BELOW

    def rebase(self) -> None:
        """Restart the sums at the current step, dropping those before it. Only after every
        table on this prefix was flushed to it: no row may be behind ``steps`` (their old sums
        are gone)."""
        t = self.steps
        self._p_last = 1.0
        self._s1.restart(t)
        self._s2.restart(t)
        with torch.inference_mode(False):  # a flush may run in inference mode (PrefixSum)
            self._p = torch.ones(1024, dtype=torch.float64)  # P[t] = 1 at index 0
        self.base = t

    def state_dict(self) -> dict[str, object]:
        n = self.steps + 1
        (s1, s1_lo), (s2, s2_lo) = self._s1.state(n), self._s2.state(n)
        return {
            "s1": s1,
            "s2": s2,
            "s1_lo": s1_lo,
            "s2_lo": s2_lo,
            "p": self._p[: n - self.offset].clone(),
            "base": self.base,
            "offset": self.offset,  # the step of each array's first entry
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        s1, s2 = state["s1"], state["s2"]
        assert isinstance(s1, Tensor) and isinstance(s2, Tensor)
        p = state.get("p")  # absent in checkpoints from before weight decay: P was 1
        base = state.get("base", 0)
        self.base = base if isinstance(base, int) else 0
        offset = state.get("offset", 0)  # absent in checkpoints from before: every step kept
        offset = offset if isinstance(offset, int) else 0
        n = s1.numel()  # entries kept, from step ``offset`` on
        self.steps = offset + n - 1
        for sums, hi, key in ((self._s1, s1, "s1_lo"), (self._s2, s2, "s2_lo")):
            lo = state.get(key)  # absent in checkpoints from before the compensated sums: 0
            sums.load(hi, lo if isinstance(lo, Tensor) else None, self.base, offset)
        self._p = torch.ones(max(1024, 2 * n), dtype=torch.float64)
        if isinstance(p, Tensor):
            self._p[:n] = p
        self.decays = bool((self._p[self.base - offset : n] != 1.0).any())
        self._p_last = float(self._p[n - 1])


class HistoryTable:
    """Per row of one embedding table: the step up to which its noise has been applied."""

    def __init__(self, num_rows: int, device: torch.device | str = "cpu") -> None:
        # read and written at the rows of each batch, like the table: on huge pages too
        self.applied = huge_pages.empty((num_rows,), torch.int32, device).zero_()

    def __len__(self) -> int:
        return self.applied.numel()


class LazyTable:
    """Lazy noise for one embedding table's weight."""

    def __init__(
        self,
        weight: nn.Parameter,
        prefix: LrPrefix,
        noise: GaussianNoise | NoisePool,
        noise_std: float,
        padding_idx: int | None = None,
        timer: PhaseTimer | None = None,
    ) -> None:
        self.timer = timer or PhaseTimer()
        self.weight = weight
        self.prefix = prefix
        # Several tables may share one pool (and so one stream): each value is still used once.
        self.pool = noise if isinstance(noise, NoisePool) else NoisePool(noise)
        self.noise = self.pool.noise
        # sigma * C / B_expected: the per-unit-lr std of one step's noise on one row.
        self.noise_std = noise_std
        self.padding_idx = padding_idx
        self.history = HistoryTable(weight.shape[0], weight.device)
        # The last catch-up's grouping of the ids it read (the step's clipped sum reuses it).
        self.last_read = RowGroups(torch.empty(0, dtype=torch.long, device=weight.device))
        # (rows, their values as the catch-up wrote them, the table's version right after)
        self._written: tuple[Tensor, Tensor, int] | None = None
        self._deferred = False  # _written's block is not in the table yet (see the module doc)
        self.frozen_at: int | None = None  # the step its weight stopped requiring grad

    def sync_frozen(self, t: int) -> bool:
        """Follow ``weight.requires_grad`` (True while the table is frozen).

        Eager DP-SGD neither updates nor noises a frozen parameter. So a table frozen at step
        f first gets the noise of every step it trained in (one full flush), then owes nothing
        while it sits out; unfrozen at step t, every row's history moves to t.
        """
        frozen = not self.weight.requires_grad
        if frozen != (self.frozen_at is not None):
            if frozen:
                self.settle()
                self._flush_rows(t)
                self.frozen_at = t
            else:
                self.history.applied.fill_(t)
                self.frozen_at = None
        return frozen

    @no_grad
    def catch_up(self, rows: Tensor, t: int, defer: bool = False) -> None:
        """Apply all pending noise (steps before t) to ``rows``.

        ``defer``: keep the noised rows in :meth:`deferred_block` instead of writing them (the
        caller then reads them from the block).

        Every distinct row gets a draw, also one already caught up to t (read twice in a step,
        or by an evaluation since the last step): its pending sum of lr^2 is exactly 0, so its
        draw adds exactly 0 and the block still holds its value. Filtering those rows out would
        cost a compare, a reduction and a sync per table per step for a case that is rare."""
        self.settle()
        # The step's clipped sum for this table usually carries the very same id tensor: keep
        # the grouping so that update() and coalesce() need not sort it again.
        self.last_read = groups = RowGroups(rows, self.weight.shape[0])  # ids validated
        if self.sync_frozen(t):  # nothing pending: flushed when it was frozen
            self._written = None
            return
        rows = groups.rows
        block = self._apply(rows, self.history.applied.index_select(0, rows), t, write=not defer)
        # The update usually writes exactly these rows again: keep them.
        self._written = None if block is None else (rows, block, self.weight._version)
        self._deferred = defer and block is not None

    def deferred_block(self) -> Tensor | None:
        """The rows of ``last_read.rows`` with their noise, while they are not in the table."""
        return self._written[1] if self._deferred and self._written is not None else None

    @no_grad
    def settle(self) -> None:
        """Write a deferred block into the table (no-op when none is pending)."""
        if self._deferred and self._written is not None:
            rows, block, _ = self._written
            self.weight.index_copy_(0, rows, block)
            self._written = (rows, block, self.weight._version)
        self._deferred = False

    @no_grad
    def update(self, grad: SparseRows, alpha: float) -> None:
        """``W += alpha * grad`` for the step's clipped sum.

        Common case, one read of this table per step: the clipped sum carries the very id tensor
        the catch-up read, and the catch-up wrote every distinct row of it (all were behind) with
        nothing written to the table since (its version counter is where the catch-up left it).
        Then the sum is added straight into the rows as the catch-up wrote them (duplicate ids
        summed through the catch-up's grouping) and written once: no second sort, no gather.
        """
        block, summed = self._caught_up_sum(grad)
        if block is not None and summed is not None:
            rows = self.last_read.rows
            with self.timer.phase("param_update"):
                block.add_(summed, alpha=alpha)
                self.weight.index_copy_(0, rows, block)  # a deferred block lands here too
            self._written, self._deferred = None, False
            return
        with self.timer.phase("param_update"):
            self.settle()  # a deferred block goes into the table before anything else is added
        self._written = None
        with self.timer.phase("coalesce"):
            grad = self.coalesce(grad)
        with self.timer.phase("param_update"):
            add_rows_(self.weight, grad.indices, grad.values, alpha, grad.coalesced)

    def sum_groups(self, grad: SparseRows) -> RowGroups | None:
        """The grouping :meth:`update` will sum ``grad`` by (the last catch-up's), or None when
        it takes the slow path. The step may sum several tables' gradients by it at once
        (``SparseRows.presum``); update() then finds its sum done."""
        written, groups = self._written, self.last_read
        if (
            written is None
            or grad.coalesced
            or grad.indices is not groups.ids
            or written[0] is not groups.rows
            or written[2] != self.weight._version
        ):
            return None
        return groups

    def _caught_up_sum(self, grad: SparseRows) -> tuple[Tensor | None, Tensor | None]:
        """(the rows as the catch-up left them, ``grad`` summed per row) when ``grad`` is the
        step's sum of exactly the rows the last catch-up read and nothing wrote the table since;
        (None, None) otherwise (see :meth:`update`)."""
        written, groups = self._written, self.sum_groups(grad)
        if written is None or groups is None:
            return None, None
        with self.timer.phase("coalesce"):
            return written[1], cast(grad.summed_by(groups), self.weight.dtype)

    def coalesce(self, grad: SparseRows) -> SparseRows:
        """``grad`` with duplicated rows summed; free of a sort when its ids are the tensor the
        last catch-up read (one call of this table per step, the common case)."""
        if grad.coalesced:
            return grad
        groups = self.last_read
        if grad.indices is not groups.ids:
            return grad  # add_rows_ coalesces it itself
        return SparseRows(groups.rows, grad.summed_by(groups), grad.num_rows, True)

    def _apply(self, rows: Tensor, applied: Tensor, t: int, write: bool = True) -> Tensor | None:
        """One aggregated draw for unique ``rows`` whose noise is applied up to ``applied``;
        returns the rows with their noise (written to the table unless ``write`` is False: then
        the caller owns getting them there)."""
        if rows.numel() == 0:
            return None
        s1, s2, decay = self.prefix.pending(applied, t, sum_lr=active_override() is not None)
        # Noise enters as W += lr*sigma*C/B*z, the same sign the eager table path uses. The rows
        # are unique, so gathering them, adding the noise in one pass and writing them back is
        # the fast path on every table size (optim/rows.py has the measurements).
        block = self.weight.index_select(0, rows)
        if decay is not None:  # SGD's weight decay over the pending steps (see LrPrefix)
            block.mul_(decay.to(block.dtype).unsqueeze(1))
        # Timed apart from the bookkeeping: the draw (and its add) is the floor every lazy
        # scheme pays; the rest (unique, history, row gather/write) is bookkeeping.
        with self.timer.phase("lazy_catch_up_noise"):
            self.noise.add_aggregated_(block, s1, s2, self.noise_std, pool=self.pool, checked=True)
        if write:
            self.weight.index_copy_(0, rows, block)
        self.history.applied.index_fill_(0, rows, t)
        return block

    @no_grad
    def flush(self, t: int) -> None:
        """Bring every row up to step t (O(table); only at epoch end, export and state_dict)."""
        self.settle()
        if not self.sync_frozen(t):
            self._flush_rows(t)

    def _flush_rows(self, t: int) -> None:
        n = self.weight.shape[0]
        for start in range(0, n, _FLUSH_ROWS):
            applied = self.history.applied[start : start + _FLUSH_ROWS]
            stale = applied < t
            if self.padding_idx is not None and start <= self.padding_idx < start + stale.numel():
                stale[self.padding_idx - start] = False  # its gradient is always 0: no noise
            rows = stale.nonzero().squeeze(1)  # already unique and sorted
            self._apply(rows + start, applied[rows], t)

    def pending_rows(self, t: int) -> int:
        """How many rows still carry pending noise at step t (for tests and reports; a deferred
        block's rows are counted as caught up, as their history says)."""
        if self.frozen_at is not None:
            return 0
        stale = self.history.applied < t
        if self.padding_idx is not None:
            stale[self.padding_idx] = False
        return int(stale.sum())

    def state_dict(self) -> dict[str, Any]:
        frozen = -1 if self.frozen_at is None else self.frozen_at
        return {"applied": self.history.applied.clone(), "frozen_at": frozen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        applied = state["applied"]
        if applied.shape != self.history.applied.shape:
            raise PrivacyError(
                f"history table has {applied.numel()} rows but the table has "
                f"{self.history.applied.numel()}; the checkpoint belongs to another model."
            )
        self.history.applied.copy_(applied)
        frozen = int(state.get("frozen_at", -1))  # absent in older checkpoints: not frozen
        self.frozen_at = None if frozen < 0 else frozen
        # The table's values were just loaded too: a block caught up before belongs to the old ones.
        self._written, self._deferred = None, False
