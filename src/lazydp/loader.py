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


#: A batch the sampler handed out, with its position in the sampler's sequence (the number of
#: batches drawn before it since the permutation's lineage began: epoch * floor(N/B) + index).
Handed = tuple[int, list[int]]


class _Counted(Sampler[list[int]]):
    """The DP batch sampler, keeping each batch it hands out (with its position) until the loop
    receives it: ``latest`` (one queue per iteration, so that two iterators of one loader keep
    their own) holds those the DataLoader drew (workers run ahead) but has not yielded yet, and
    ``replay`` those an iteration left behind, which the next one hands out before drawing new
    ones.

    Why: a loop that stops early (``break``, a peek with ``next(iter(loader))``) used to drop
    the batches workers had drawn ahead. Dropped shuffled batches move the permutation's epochs
    ahead of the charged steps: now charged (shuffle_epochs.py), but a cost for nothing."""

    def __init__(self, inner: Sampler[list[int]]) -> None:
        self.inner = inner
        self.latest: deque[Handed] = deque()
        self.replay: deque[Handed] = deque()

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        self.latest = deque()  # set when the DataLoader's iterator asks, before any batch
        return self._batches(self.latest)

    def _batches(self, pending: deque[Handed]) -> Iterator[list[int]]:
        while self.replay:
            item = self.replay.popleft()
            pending.append(item)
            yield item[1]
        for batch in self.inner:
            pending.append((self.inner.drawn - 1, batch))  # type: ignore[attr-defined]
            yield batch

    def hand_back(self, batches: deque[Handed]) -> None:
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

    def skip_past(self, position: int) -> None:
        """Hand out no batch at or before ``position`` (replayed or new) from now on."""
        self.replay = deque(item for item in self.replay if item[0] > position)
        behind = position + 1 - self.inner.drawn  # type: ignore[attr-defined]
        if behind > 0:
            self.inner.skip(behind)  # type: ignore[attr-defined]


def check_replay(replay: Any, sampler: Any) -> list[Handed]:
    """A checkpoint's replayed batches for the shuffled ``sampler`` (its checkpointed state
    already loaded), checked: ConfigError unless each is the batch its permutation handed out
    at its position, none twice. Checkpoints from before positions list the batches alone:
    each must be one the permutation handed out in the current or the previous epoch."""
    if not isinstance(replay, list):
        raise ConfigError(f"replay is {type(replay).__name__}, not a list of batches")

    def tagged(item: Any) -> bool:  # [position, batch]
        return isinstance(item, list) and len(item) == 2 and isinstance(item[1], list)

    old_format = not all(tagged(i) for i in replay)
    drawn = {tuple(b): p for p, b in sampler.handed_out()} if old_format else {}
    out: list[Handed] = []
    seen: set[int] = set()
    for item in replay:
        if tagged(item):
            position, batch = item
        else:  # an older checkpoint: the batch alone
            batch = item
            position = drawn.get(tuple(batch), -1) if isinstance(batch, list) else -1
        if not (
            isinstance(position, int)
            and not isinstance(position, bool)
            and 0 <= position < sampler.drawn
            and isinstance(batch, list)
            and position not in seen
            and sampler.batch_at(position) == batch
        ):
            raise ConfigError(
                "a replayed batch is not the one the checkpoint's permutation handed out at "
                "its position (or is listed twice)"
            )
        seen.add(position)
        out.append((position, list(batch)))
    return out


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
        self._yielded: deque[Handed] = deque()
        self._shuffled = getattr(batch_sampler, "name", "") == "shuffle"
        # Shuffled: the position of the newest batch handed to the loop (see shuffle_position).
        self._newest: int | None = None
        self._untracked = False
        # One live iteration at a time: a newer one (or a restore with workers) supersedes the
        # older, whose undelivered batches go back to the replay queue and which then refuses
        # to go on (with persistent workers two iterations share torch's one iterator, and a
        # batch could come out of both).
        self._generation = 0
        self._live: deque[Handed] | None = None  # the newest iteration's undelivered batches
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
        fits = next((i for i, (_, b) in enumerate(waiting) if rows <= len(b)), None)
        if fits is None:
            return max(len(b) for _, b in waiting)
        if rows < len(waiting[fits][1]):
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
        empty = next((i for i, (_, b) in enumerate(waiting) if not b), None)
        if empty is None:
            return len(waiting[0][1])
        self._take(empty + 1)
        return None

    def _take(self, batches: int) -> None:
        """The oldest ``batches`` waiting batches are stepped on (or skipped)."""
        for _ in range(batches):
            self._yielded.popleft()

    def shuffle_position(self) -> tuple[str, int] | None:
        """Shuffled: (the permutation's lineage, the position of the newest batch handed to the
        loop) for the step's ledger line: the step's batch is at or before it, so batches
        received and never stepped on are charged and never handed out again
        (shuffle_epochs.py); None for Poisson or before any batch."""
        if self._newest is None:
            return None
        return self.dp_sampler.lineage, self._newest  # type: ignore[attr-defined]

    def sampler_state(self) -> dict[str, Any]:
        """The DP sampler's state_dict, plus the batches it handed out that no step has taken.
        Shuffled: those batches with their positions (``replay``), handed out first on resume
        unless a charged step may have used them (see :meth:`restore`), so the permutation goes
        on where the loop is, across epoch boundaries too. Poisson: the position moved back
        over those the loop has not received, within the epoch; a resume draws those steps
        with fresh coins (across an epoch boundary it is left ahead: skipped Poisson steps
        cost nothing)."""
        state = dict(self.dp_sampler.state_dict())  # type: ignore[attr-defined]
        left = [*self._counted.replay, *self._counted.latest]
        if self._shuffled:
            left = [*self._yielded, *left]
            state["replay"] = [[p, list(b)] for p, b in left]
            return state
        if 0 < len(left) <= int(state.get("position", 0)):
            state["position"] -= len(left)
            state["step"] -= len(left)
        return state

    def restore(self, state: dict[str, Any], used: int | None = None, redone: int = 0) -> None:
        """Load a checkpoint's sampler state (checked by :func:`check_replay` before). With
        workers, a loop still running over this loader is superseded: its prefetched batches
        belong to the state before.

        Shuffled, no batch at or before ``used`` (the newest position the ledger's steps
        recorded in the checkpoint's lineage) or before the newest this loader handed out in
        it is handed out again: a charged step, before the checkpoint or after it in a run
        that went on, may have taken it, and a restored permutation would use its examples
        twice in one epoch, which the accountant charges once. (Which of the batches a loop
        received a step took is not known -- a peek and a prefetcher look alike -- so the
        newest received bounds them all.) Ledgers from before positions give ``redone``, the
        steps charged past the checkpoint, skipped in order. Poisson needs none of it: a
        resumed sampler draws fresh coins, and redone steps are charged as the new steps
        they are."""
        if self.num_workers > 0:
            self._supersede()  # (its batches go to the replay queue, replaced just below)
        lineage = getattr(self.dp_sampler, "lineage", None)
        self.dp_sampler.load_state_dict(state)  # type: ignore[attr-defined]
        replay = check_replay(state.get("replay", []), self.dp_sampler) if self._shuffled else []
        self._counted.replay = deque(replay)
        self._yielded.clear()
        if not self._shuffled:
            return
        if self.dp_sampler.lineage != lineage:  # type: ignore[attr-defined]
            self._newest = None  # what this loader handed out belongs to another permutation
        past = max((p for p in (used, self._newest) if p is not None), default=None)
        if past is not None:
            self._counted.skip_past(past)
        elif redone > 0:  # a ledger from before positions: the steps charged, in order
            self._counted.skip(redone)

    def _check_size(self) -> None:
        """ConfigError when the dataset's length changed since make_private: the sampler draws
        from the N it had then at rate B/N, so a shrunk one failed with an IndexError from inside
        the dataset (or a worker), and examples added later were never drawn, without a word."""
        size, sampled = len(self.dataset), self.dp_sampler.num_samples  # type: ignore[arg-type,attr-defined]
        if size != sampled:
            raise ConfigError(
                f"the dataset holds {size} examples, but it held {sampled} at make_private, and "
                f"the private loader samples those {sampled} at the sample rate set then. Keep "
                "the dataset fixed during training; to train on other data, engine.detach() "
                "the model and make it private again with a new PrivacyEngine on the same "
                "ledger_path (its charges carry over)."
            )

    def _supersede(self) -> None:
        """End the live iteration: its undelivered batches go back to the replay queue."""
        self._generation += 1
        if self._live is not None:
            self._counted.hand_back(self._live)
            self._live = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self._check_size()
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
                if pending:
                    handed = pending.popleft()
                    if self._shuffled:
                        self._newest = max(handed[0], -1 if self._newest is None else self._newest)
                    if not self._untracked:
                        self._yielded.append(handed)
                    kept = len(self._yielded) * len(handed[1])
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
