"""Batch selection for DP-SGD: Poisson sampling (the default) and shuffled fixed-size batches.

Contract (DESIGN.md invariants 1 and 5):
* :class:`PoissonSampling`: at every step each of the N examples joins the batch independently
  with probability ``sample_rate`` -- exactly the mechanism the accountant amplifies. A step is
  drawn in O(batch): K ~ Binomial(N, q), then K distinct indices uniformly (numpy's
  ``Generator.choice(replace=False)`` runs Floyd's algorithm, O(K), when K <= N/20 and N > 1e4,
  and a partial shuffle, O(N) = O(20 K), otherwise). Batches are sorted lists and may be EMPTY.
* :class:`DistributedPoissonSampling`: rank r samples its shard r, r+W, r+2W, ... at the *global*
  rate q, so the union over ranks is a Poisson sample of the whole data set; every rank runs
  the same number of steps, so empty local batches never desynchronise the all-reduce.
* :class:`ShuffledFixedSize` (``name = "shuffle"``): fixed-size batches from a shuffled epoch.
  The Poisson epsilon does NOT apply to it; the accountant charges it without amplification.
* Randomness comes from OS entropy unless a seed is given (then the run is reproducible and not
  meant for production). Step t of rank r draws from ``SeedSequence(entropy, spawn_key=(r, t))``:
  streams never overlap across steps or ranks, and a seeded run reproduces step t exactly
  however it was interrupted.
* ``state_dict()`` is plain data. A resumed Poisson sampler keeps its step position but, unless
  seeded, draws fresh OS entropy: it never replays the batches of the run that crashed
  (amplification by subsampling needs fresh coins). A shuffled sampler restores its permutation
  so that no example is used twice in one epoch (its accounting assumes no secrecy of batches),
  and hands out no batch at or before the newest position the ledger's steps recorded
  (``DPDataLoader.restore``, shuffle_epochs.py). Batches workers drew ahead of the loop are neither
  dropped nor redrawn: the private loader hands them out again (``loader._Counted``), and a
  checkpoint keeps them.
* Positions count batches *drawn*; a DataLoader with workers draws a few ahead of training.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from lazydp._validate import check_choice, check_positive_int, check_sample_rate
from lazydp.errors import ConfigError


class _StatefulBatchSampler(Sampler[list[int]]):
    """Entropy, per-key generators and the epoch position shared by every batch sampler here."""

    name = ""

    def __init__(self, num_samples: int, steps: int, seed: int | None) -> None:
        self.num_samples = check_positive_int("num_samples", num_samples)
        self.steps = check_positive_int("steps", steps)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ConfigError(
                f"seed must be None (OS entropy, for production) or an int >= 0; got {seed!r}."
            )
        self.seeded = seed is not None
        # SeedSequence(None) pools 128 bits of OS entropy.
        self._entropy: int = int(np.random.SeedSequence(seed).entropy)  # type: ignore[arg-type]
        self._step = 0  # batches drawn since construction (plus those of a resumed run)
        self._position = 0  # batches drawn in the current epoch

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.Generator(
            np.random.PCG64(np.random.SeedSequence(self._entropy, spawn_key=key))
        )

    def _draw(self, step: int, position: int) -> list[int]:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.steps

    def _next(self) -> list[int]:
        """Draw the batch at the current position and move past it."""
        batch = self._draw(self._step, self._position)
        self._step += 1
        self._position += 1
        return batch

    @property
    def drawn(self) -> int:
        """Batches drawn since the run began (a resumed run's included)."""
        return self._step

    def __iter__(self) -> Iterator[list[int]]:
        # A resumed sampler starts mid-epoch; afterwards every epoch starts at 0. An iteration
        # that stopped right after its epoch's last batch leaves the epoch's (empty) rest to
        # the next: a loop resumed from a checkpoint taken there counts its epochs right.
        while self._position < self.steps:
            yield self._next()
        self._position = 0

    def state_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint: the sampler's kind and its position.

        >>> PoissonSampling(100, 0.1).state_dict()["position"]
        0
        """
        return {"name": self.name, "step": self._step, "position": self._position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (what :meth:`state_dict` returned in the interrupted run)."""
        check_choice("state['name']", state.get("name"), (self.name,))
        position = int(state["position"])
        if not 0 <= position <= self.steps:
            raise ConfigError(
                f"state['position']={position} is outside this sampler's epoch of {self.steps} "
                "steps; resume with the same data set size and sample rate as the checkpoint."
            )
        self._step = int(state["step"])
        self._position = position


class PoissonSampling(_StatefulBatchSampler):
    """Batch sampler: every example joins each batch independently with probability q.

    ``len()`` is ``steps`` (default ``round(1/q)``, one expected epoch).

    >>> sampler = PoissonSampling(num_samples=1000, sample_rate=0.01, seed=0)
    >>> len(sampler), sampler.expected_batch_size
    (100, 10.0)
    >>> batch = next(iter(sampler))
    >>> batch == sorted(set(batch)) and all(0 <= i < 1000 for i in batch)
    True
    """

    name = "poisson"

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps: int | None = None,
        seed: int | None = None,
    ) -> None:
        self.sample_rate = check_sample_rate(sample_rate)
        if steps is None:
            steps = max(1, round(1 / self.sample_rate))
        super().__init__(num_samples, steps, seed)
        self.expected_batch_size = self.sample_rate * self.num_samples
        self.rank, self.world_size = 0, 1
        self.shard_size = self.num_samples

    def _draw(self, step: int, position: int) -> list[int]:
        rng = self._rng(self.rank, step)
        k = int(rng.binomial(self.shard_size, self.sample_rate))
        local = rng.choice(self.shard_size, size=k, replace=False, shuffle=False)
        local.sort()
        return (self.rank + self.world_size * local).tolist()


class DistributedPoissonSampling(PoissonSampling):
    """Poisson sampling of rank ``rank``'s shard (indices rank, rank+W, ...) at the global rate.

    >>> shards = [DistributedPoissonSampling(10, 0.5, rank=r, world_size=2, seed=1) for r in (0, 1)]
    >>> [b[0] % 2 for b in (next(iter(s)) for s in shards) if b]  # each rank stays in its shard
    [0, 1]
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        rank: int,
        world_size: int,
        steps: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(num_samples, sample_rate, steps=steps, seed=seed)
        self.world_size = check_positive_int("world_size", world_size)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ConfigError(
                f"rank must be an int in [0, world_size={world_size}); got {rank!r}. "
                "Pass torch.distributed.get_rank()."
            )
        self.rank = rank
        self.shard_size = len(range(rank, self.num_samples, self.world_size))


class ShuffledFixedSize(_StatefulBatchSampler):
    """Fixed-size batches from a fresh permutation each epoch (the last partial batch dropped).

    Not Poisson sampling: the accountant charges it without amplification (``name="shuffle"``).

    >>> sampler = ShuffledFixedSize(num_samples=10, batch_size=3, seed=0)
    >>> batches = list(sampler)
    >>> len(batches), len(set(sum(batches, []))), sampler.sample_rate
    (3, 9, 0.3)
    """

    name = "shuffle"

    def __init__(self, num_samples: int, batch_size: int, seed: int | None = None) -> None:
        self.batch_size = check_positive_int("batch_size", batch_size)
        if batch_size > num_samples:
            raise ConfigError(
                f"batch_size={batch_size} exceeds num_samples={num_samples}; with drop_last a "
                "shuffled epoch would have no batch. Use a smaller batch_size."
            )
        super().__init__(num_samples, num_samples // batch_size, seed)
        self.sample_rate = self.batch_size / self.num_samples
        self.expected_batch_size = float(self.batch_size)
        self._epoch = 0
        self._perm: np.ndarray | None = None
        self._looked_up: tuple[int, np.ndarray] | None = None  # batch_at's last permutation
        # This permutation's id in the ledger (shuffle_epochs.py): a fresh sampler starts a new
        # lineage (its epochs use every example again), a checkpoint's state continues one.
        self.lineage = secrets.token_hex(8)

    def _draw(self, step: int, position: int) -> list[int]:
        if position == 0 or self._perm is None:
            if position == 0 and step > 0:
                self._epoch += 1
            self._perm = self._rng(0, self._epoch).permutation(self.num_samples)
        return self._batch_of(self._perm, position)

    def _batch_of(self, perm: np.ndarray, position: int) -> list[int]:
        """The sorted examples of ``perm``'s batch at ``position``."""
        return np.sort(perm[position * self.batch_size : (position + 1) * self.batch_size]).tolist()

    def batch_at(self, position: int) -> list[int]:
        """The batch drawn at ``position`` (counted from the lineage's first draw)."""
        epoch, index = divmod(position, self.steps)
        if self._looked_up is None or self._looked_up[0] != epoch:  # O(N) per epoch, not batch
            self._looked_up = (epoch, self._rng(0, epoch).permutation(self.num_samples))
        return self._batch_of(self._looked_up[1], index)

    def handed_out(self) -> list[tuple[int, list[int]]]:
        """(position, batch) of each batch this epoch's permutation has handed out so far, and
        of the previous epoch's (an older checkpoint's replayed batches must be among them)."""
        start = max(0, self._epoch - 1) * self.steps
        return [(p, self.batch_at(p)) for p in range(start, self._step)]

    def skip(self, batches: int) -> None:
        """Move past ``batches`` batches as if they had been drawn (across epochs too)."""
        for _ in range(batches):
            if self._position >= self.steps:  # the epoch ended: the next starts at 0
                self._position = 0
            self._next()  # drawn, so that the epoch and permutation keep in step

    def state_dict(self) -> dict[str, Any]:
        """Position plus the permutation's entropy and epoch (not secret: no amplification)."""
        return {
            **super().state_dict(),
            "epoch": self._epoch,
            "entropy": self._entropy,
            "lineage": self.lineage,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._entropy = int(state["entropy"])
        self._epoch = int(state["epoch"])
        if self._epoch != max(0, self._step - 1) // self.steps:
            raise ConfigError(
                f"state['epoch']={self._epoch} does not fit state['step']={self._step} at "
                f"{self.steps} batches an epoch"
            )
        self._perm = None
        lineage = state.get("lineage")  # absent in checkpoints from before it: a new lineage
        if lineage is not None:
            if not isinstance(lineage, str) or not 0 < len(lineage) <= 64:
                raise ConfigError(f"state['lineage']={lineage!r} must be a short string")
            self.lineage = lineage
