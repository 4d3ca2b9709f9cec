"""How many shuffled epochs a ledger's steps drew their batches from.

The accountant charges shuffled fixed-size batches one Gaussian release per epoch: an example
is in one batch of each permutation, so it is used at most once per epoch -- as long as no
batch is stepped on twice. Counting releases as ceil(steps / floor(N/B)) assumes every batch
the permutation hands out is stepped on. A batch the loop receives and never steps on (a peek
with ``next(iter(loader))``, a loop that fetches one batch ahead and stops) is lost to its
epoch: the permutation runs ahead of the steps, and an example can be used in one epoch more
than that charges. Two runs that each start a fresh permutation (a ledger continued without
its checkpoint's sampler state) each use every example once per epoch of their own.

So each shuffled step's ledger line also records where the loop is: the *position* of the
newest batch the private loader had handed to the loop (batches drawn before it in the
permutation's lineage: epoch * floor(N/B) + index in the epoch; the step's own batch is at or
before it) and the *lineage* (a random id a fresh sampler draws and a checkpoint carries). A
group's releases are the epochs its runs in each lineage cover:

* from epoch 0 for the first (sample rate, noise) group that stepped in a lineage: every
  permutation starts there, and a loop may hold batches of any earlier epoch;
* for a group that takes over a lineage (a run resumed with other noise at an epoch boundary),
  from the epoch after the newest position recorded before it: a resume hands out no batch at
  or before that position (``DPDataLoader.restore``).

That bounds the epochs any example was used in, and equals ceil(steps / floor(N/B)) for a
plain loop: the ledger charges the larger of the two (steps recorded before positions existed
are covered by the second alone). The newest position per lineage is also what a resume skips
past, so that no batch a charged step may have taken is handed out again.
"""

from __future__ import annotations

from collections.abc import Hashable


class ShuffledEpochs:
    """Per (group, lineage): the epoch intervals its steps can have drawn from."""

    def __init__(self) -> None:
        self._runs: dict[tuple[Hashable, str], list[list[int]]] = {}
        self._last: dict[str, tuple[Hashable, int]] = {}  # lineage -> (last group, newest)

    def record(self, group: Hashable, lineage: str, position: int, per_epoch: int) -> None:
        """A step of ``group`` charged with the loop's newest batch at ``position``."""
        epoch = position // per_epoch
        runs = self._runs.setdefault((group, lineage), [])
        last = self._last.get(lineage)
        if last is None:
            runs.append([0, epoch])
        elif last[0] != group or not runs:  # takes over from another group
            runs.append([min(epoch, (last[1] + 1) // per_epoch), epoch])
        else:
            runs[-1][1] = max(runs[-1][1], epoch)
        self._last[lineage] = (group, position if last is None else max(position, last[1]))

    def last_position(self, lineage: str | None) -> int | None:
        """The newest position any step recorded in ``lineage`` (None: none did)."""
        last = self._last.get(lineage) if lineage is not None else None
        return None if last is None else last[1]

    def releases(self, group: Hashable) -> int:
        """Epochs ``group``'s steps can have drawn from, summed over lineages (0: none
        recorded).

        >>> e = ShuffledEpochs()
        >>> for position in (0, 3, 4): e.record("a", "p1", position, per_epoch=4)
        >>> e.record("b", "p1", 9, 4); e.record("b", "p2", 0, 4)
        >>> e.releases("a"), e.releases("b"), e.last_position("p1")
        (2, 3, 9)
        """
        total = 0
        for (g, _), runs in self._runs.items():
            if g != group:
                continue
            end = -1  # the union of the intervals, in order (they may touch)
            for lo, hi in sorted(runs):
                total += max(0, hi - max(lo, end + 1) + 1)
                end = max(end, hi)
        return total
