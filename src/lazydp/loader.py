"""The private data loader: the user's dataset and collate function behind a DP batch sampler.

Poisson sampling produces batches of random size, including empty ones; the default collate
function cannot build an empty batch, so we build one from a real example cut to length 0
(empty_batch.py). That keeps shapes and dtypes right and lets an empty step run (and be charged)
like any other.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from torch.utils.data._utils.collate import default_collate

from lazydp.empty_batch import empty_batch
from lazydp.errors import ConfigError


class EmptySafeCollate:
    """Wraps a collate function so that an empty index list yields an empty batch."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any], dataset: Dataset) -> None:
        self.collate_fn = collate_fn
        self.dataset = dataset

    def __call__(self, batch: Sequence[Any]) -> Any:
        if isinstance(batch, Sequence) and len(batch) == 0:
            example = self.dataset[0]
            return empty_batch(self.collate_fn([example]), self.collate_fn([example, example]))
        return self.collate_fn(list(batch) if isinstance(batch, tuple) else batch)  # type: ignore[arg-type]


class _Counted(Sampler[list[int]]):
    """The DP batch sampler, keeping each batch it hands out until the loop receives it:
    ``latest`` (one queue per iteration, so that two iterators of one loader keep their own)
    holds those the DataLoader drew (workers run ahead) but has not yielded yet, and ``replay``
    those an iteration left behind, which the next one hands out before drawing new ones.

    Why: a loop that stops early (``break``, a peek with ``next(iter(loader))``) used to drop
    the batches workers had drawn ahead. Dropped shuffled batches move the permutation's epochs
    ahead of the charged steps, so an example could be used in more epochs than the accountant
    (one Gaussian release per floor(N/B) steps) charged for."""

    def __init__(self, inner: Sampler[list[int]]) -> None:
        self.inner = inner
        self.latest: deque[list[int]] = deque()
        self.replay: deque[list[int]] = deque()

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        self.latest = deque()  # set when the DataLoader's iterator asks, before any batch
        return self._batches(self.latest)

    def _batches(self, pending: deque[list[int]]) -> Iterator[list[int]]:
        while self.replay:
            batch = self.replay.popleft()
            pending.append(batch)
            yield batch
        for batch in self.inner:
            pending.append(batch)
            yield batch

    def hand_back(self, batches: deque[list[int]]) -> None:
        """``batches`` (handed out, never received) go first in line again; emptied."""
        self.replay.extendleft(reversed(batches))
        batches.clear()

    def skip(self, batches: int) -> None:
        """Move past ``batches`` batches without handing them out (replayed ones first)."""
        while batches and self.replay:
            self.replay.popleft()
            batches -= 1
        if batches:
            self.inner.skip(batches)  # type: ignore[attr-defined]


def check_replay(replay: Any, sampler: Any) -> list[list[int]]:
    """A checkpoint's replayed batches for the shuffled ``sampler`` (its checkpointed state
    already loaded), checked: ConfigError unless each is one of the batches its permutation
    handed out in the current or the previous epoch, none twice."""
    if not isinstance(replay, list):
        raise ConfigError(f"replay is {type(replay).__name__}, not a list of batches")
    if not replay:
        return []
    drawn = {tuple(b) for b in sampler.handed_out()}
    seen: set[tuple[int, ...]] = set()
    for batch in replay:
        key = tuple(batch) if isinstance(batch, list) else None
        if key is None or key not in drawn or key in seen:
            raise ConfigError(
                "a replayed batch is not one the checkpoint's permutation handed out (or is "
                "listed twice)"
            )
        seen.add(key)
    return [list(b) for b in replay]


# The user's DataLoader settings a private loader keeps (sampling and batching are its own).
WORKER_OPTIONS = (
    "worker_init_fn",
    "multiprocessing_context",
    "timeout",
    "persistent_workers",
    "prefetch_factor",
    "pin_memory_device",
)  # not in_order: batches must come back in the sampler's order (check_rows matches sizes)


def worker_options(loader: DataLoader) -> dict[str, Any]:
    """The user's loader's WORKER_OPTIONS that this torch's DataLoader knows."""
    out = {k: getattr(loader, k) for k in WORKER_OPTIONS if hasattr(loader, k)}
    if not loader.num_workers:  # DataLoader refuses prefetch_factor without workers
        out.pop("prefetch_factor", None)
        out.pop("persistent_workers", None)
    return out


#: Why fewer rows than examples is worth a word (a warning, then a report caveat).
SHORT_ROWS = (
    "a step's layers saw fewer rows in dimension 0 than its batch held examples. That is fine "
    "when collate_fn drops examples; but if dimension 0 is not the batch (a time-major layer, "
    "batch_first=False, an input transposed to (T, B, ...)), every time step is clipped as an "
    "example and one example's influence can exceed max_grad_norm many times over. Keep "
    "dimension 0 the batch in every layer."
)


_END = object()  # the end of torch's batch iterator

#: Batches yielded and not stepped on that the step checks follow, and the example indices
#: they hold (~600 MB at most: a loop that iterates without ever stepping); past either, the
#: checks are off for good.
_WAITING_CAP = 1 << 20
_KEPT_INDICES_CAP = 1 << 24


class DPDataLoader(DataLoader):
    """A DataLoader whose batches come from a DP batch sampler (Poisson by default).

    ``on_epoch_end`` runs when an epoch has been fully iterated (LazyDP flushes pending noise there).
    ``worker_options`` (worker_init_fn, persistent_workers, prefetch_factor, ...) pass to
    DataLoader as the user's loader set them.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_sampler: Sampler[list[int]],
        collate_fn: Callable[[list[Any]], Any] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        **worker_options: Any,
    ) -> None:
        if isinstance(dataset, IterableDataset):
            raise ConfigError(
                "data_loader wraps an IterableDataset; DP sampling needs random access to pick "
                "each example independently. Use a map-style Dataset (__getitem__/__len__)."
            )
        counted = _Counted(batch_sampler)
        super().__init__(
            dataset,
            batch_sampler=counted,
            collate_fn=EmptySafeCollate(collate_fn or default_collate, dataset),
            num_workers=num_workers,
            pin_memory=pin_memory,
            **worker_options,
        )
        self.on_epoch_end: Callable[[], None] | None = None
        self.batches_drawn = 0  # by this process: the report compares it with the steps taken
        # The examples in each batch the sampler handed out, in order (workers may draw a few
        # ahead), and in each batch yielded that no step has taken yet (see check_rows).
        self._counted = counted
        # Unbounded up to a cap: a loop may cache a whole epoch (``list(loader)``) before its
        # first step, and dropping sizes would misalign every later check. Past the cap (a loop
        # iterating the loader without ever stepping) the checks are off for good.
        # The batches themselves: a shuffled checkpoint taken after a batch was yielded and
        # before its step hands it out again first on resume (it was not charged; skipping it
        # too would move the permutation ahead of the charged steps).
        self._yielded: deque[list[int]] = deque()
        self._shuffled = getattr(batch_sampler, "name", "") == "shuffle"
        # Shuffled: the newest permutation epoch handed to the loop (see shuffle_position).
        self._epoch_reached: int | None = None
        self._untracked = False
        # One live iteration at a time: a newer one (or a restore with workers) supersedes the
        # older, whose undelivered batches go back to the replay queue and which then refuses
        # to go on (with persistent workers two iterations share torch's one iterator, and a
        # batch could come out of both).
        self._generation = 0
        self._live: deque[list[int]] | None = None  # the newest iteration's undelivered batches
        self.dp_sampler = batch_sampler  # its state_dict goes into checkpoints
        self.short_steps = 0  # steps whose layers saw fewer rows than their batch held

    def check_rows(self, rows: int) -> int | None:
        """Match a step's ``rows`` (dimension 0 its layers saw) with a batch yielded and not yet
        stepped on; None when they fit, else the most examples a waiting batch holds.

        A step takes the oldest waiting batch when its rows fit in it (equal, or fewer: a
        collate_fn that drops bad examples); else the first later one they fit in (the batches
        before it were skipped). More rows than that means an example was spread over several
        rows. A loop that fetches one batch ahead (a prefetcher) keeps matching; in a plain loop
        the check is exact.
        """
        waiting = self._yielded
        if not waiting or self._untracked:
            return None  # no batch from this loader (a hand-built one: the report flags it)
        fits = next((i for i, b in enumerate(waiting) if rows <= len(b)), None)
        if fits is None:
            return max(len(b) for b in waiting)
        if rows < len(waiting[fits]):
            self.short_steps += 1
            if self.short_steps == 1:
                warnings.warn(SHORT_ROWS, stacklevel=4)
        self._take(fits + 1)
        return None

    def check_skipped(self) -> int | None:
        """A step with no forward at all: None when a waiting batch is empty (taken, with the
        batches before it skipped, as check_rows skips: an empty Poisson batch is a step that
        is charged, and a batch peeked at before the loop is never stepped on) or this loader
        never yielded a batch (a hand-built loop); 0 when it has yielded batches but none is
        waiting (a second step() for a batch already stepped on); else how many examples the
        oldest waiting batch holds (the forward was forgotten)."""
        waiting = self._yielded
        if self._untracked:
            return None
        if not waiting:
            return 0 if self.batches_drawn else None
        empty = next((i for i, b in enumerate(waiting) if not b), None)
        if empty is None:
            return len(waiting[0])
        self._take(empty + 1)
        return None

    def _take(self, batches: int) -> None:
        """The oldest ``batches`` waiting batches are stepped on (or skipped)."""
        for _ in range(batches):
            self._yielded.popleft()

    def shuffle_position(self) -> tuple[str, int] | None:
        """Shuffled: (the permutation's lineage, the newest epoch a batch handed to the loop came
        from) for the step's ledger line, so that batches received and never stepped on are
        charged (shuffle_epochs.py); None for Poisson or before any batch."""
        if self._epoch_reached is None:
            return None
        return self.dp_sampler.lineage, self._epoch_reached  # type: ignore[attr-defined]

    def sampler_state(self) -> dict[str, Any]:
        """The DP sampler's state_dict, plus the batches it handed out that the loop has not
        received. Shuffled: those batches themselves (``replay``), handed out first on resume,
        so the permutation goes on exactly where the loop is, across epoch boundaries too.
        Poisson: the position moved back over them within the epoch; a resume draws those
        steps with fresh coins (across an epoch boundary it is left ahead: skipped Poisson
        steps cost nothing)."""
        state = dict(self.dp_sampler.state_dict())  # type: ignore[attr-defined]
        left = [*self._counted.replay, *self._counted.latest]
        if self._shuffled:
            left = [*self._yielded, *left]  # yielded, not stepped on: not charged
            state["replay"] = [list(b) for b in left]
            return state
        if 0 < len(left) <= int(state.get("position", 0)):
            state["position"] -= len(left)
            state["step"] -= len(left)
        return state

    def restore(self, state: dict[str, Any], redone: int = 0) -> None:
        """Load a checkpoint's sampler state (checked by :func:`check_replay` before). With
        workers, a loop still running over this loader is superseded: its prefetched batches
        belong to the state before.

        ``redone``: steps the ledger charged after the checkpoint. Shuffled, those batches
        are skipped: redone, they would use their examples again in the same epoch (a
        restored permutation), while the accountant charges a shuffled epoch once. (Poisson
        needs nothing: a resumed sampler draws fresh coins, and redone steps are charged as
        the new steps they are.)"""
        if self.num_workers > 0:
            self._supersede()  # (its batches go to the replay queue, replaced just below)
        self.dp_sampler.load_state_dict(state)  # type: ignore[attr-defined]
        replay = state.get("replay", []) if self._shuffled else []
        self._counted.replay = deque(list(b) for b in replay)
        self._yielded.clear()
        self._epoch_reached = None  # the ledger keeps what the steps before recorded
        if self._shuffled and redone > 0:
            self._counted.skip(redone)

    def _supersede(self) -> None:
        """End the live iteration: its undelivered batches go back to the replay queue."""
        self._generation += 1
        if self._live is not None:
            self._counted.hand_back(self._live)
            self._live = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self._supersede()  # an older iteration still alive stops here
        mine = self._generation
        batches = iter(super().__iter__())  # asks the sampler for its iterator: a fresh queue
        pending = self._live = self._counted.latest
        try:
            while True:
                if mine != self._generation:
                    raise ConfigError(
                        "this iteration of the private data loader was superseded by a newer "
                        "one (or by load_checkpoint) while it still had batches: iterate the "
                        "loader once at a time (a peek with next(iter(loader)) is fine; keep "
                        "no older iterator to go on with). Its undelivered batches were kept."
                    )
                batch = next(batches, _END)
                if batch is _END:
                    break
                self.batches_drawn += 1
                if self._shuffled:  # the sampler's epoch is that of its newest batch or later
                    epoch = self.dp_sampler.epoch  # type: ignore[attr-defined]
                    self._epoch_reached = max(self._epoch_reached or 0, epoch)
                if pending:
                    handed = pending.popleft()
                    if not self._untracked:
                        self._yielded.append(handed)
                    kept = len(self._yielded) * len(handed)
                    if len(self._yielded) > _WAITING_CAP or kept > _KEPT_INDICES_CAP:
                        self._untracked = True
                        self._yielded.clear()
                yield batch
        finally:
            # Drawn for this iteration and never received (the loop stopped early, workers ran
            # ahead of it): handed out again first, not dropped (see _Counted).
            self._counted.hand_back(pending)
            if self._live is pending:
                self._live = None
        if self.on_epoch_end is not None:
            self.on_epoch_end()
