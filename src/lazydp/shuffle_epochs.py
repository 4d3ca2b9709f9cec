"""How many shuffled epochs a ledger's steps drew their batches from.

The accountant charges shuffled fixed-size batches one Gaussian release per epoch: an example
is in one batch of each permutation, so it is used at most once per epoch. Counting releases
as ceil(steps / floor(N/B)) assumes every batch the permutation hands out is stepped on. A
batch the loop receives and never steps on (a peek with ``next(iter(loader))``, a loop that
fetches one batch ahead and stops) is lost to its epoch: the permutation runs ahead of the
steps, and an example can be used in one epoch more than ceil(steps / floor(N/B)) charges.
Two runs that each start a fresh permutation (a ledger resumed without its checkpoint's
sampler state) each use every example once per epoch of their own.

So each shuffled step also records where the loop is: the newest permutation epoch the
private loader had handed to the loop when the step was charged (every batch the step can
use was handed over by then, so its epoch is at most that), and the permutation's lineage (a
random id a fresh sampler draws and a checkpoint carries, so a resumed run continues its
lineage and a new permutation starts another). A group's releases are then the epochs each
lineage's recorded span covers:

* from epoch 0, for the first (sample rate, noise) group that stepped in the lineage: every
  permutation starts there, and a loop may have held batches of any earlier epoch;
* from one epoch below the lowest recorded, for a group that takes over a lineage (a run
  resumed with other noise at an epoch boundary): a resume hands out the batches its
  checkpoint kept first, and those may come from the epoch before.

That is an upper bound on the epochs any example was used in, and equals
ceil(steps / floor(N/B)) for a plain loop: the ledger charges the larger of the two (steps
recorded before this field existed are covered by the second alone).
"""

from __future__ import annotations

from collections.abc import Hashable


class ShuffledEpochs:
    """Per (group, lineage): the lowest and highest epoch recorded by a step."""

    def __init__(self) -> None:
        self._spans: dict[tuple[Hashable, str], list[int]] = {}
        self._first: dict[str, Hashable] = {}  # lineage -> the group that stepped in it first

    def record(self, group: Hashable, lineage: str, epoch: int) -> None:
        self._first.setdefault(lineage, group)
        span = self._spans.setdefault((group, lineage), [epoch, epoch])
        span[0], span[1] = min(span[0], epoch), max(span[1], epoch)

    def releases(self, group: Hashable) -> int:
        """Epochs ``group``'s steps can have drawn from, summed over lineages (0: none
        recorded).

        >>> e = ShuffledEpochs()
        >>> for epoch in (0, 0, 1): e.record("a", "p1", epoch)
        >>> e.record("b", "p1", 4); e.record("b", "p2", 0)
        >>> e.releases("a"), e.releases("b")
        (2, 3)
        """
        total = 0
        for (g, lineage), (low, high) in self._spans.items():
            if g == group:
                start = 0 if self._first[lineage] == group else max(0, low - 1)
                total += high - start + 1
        return total
