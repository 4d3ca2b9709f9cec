"""The private data loader: the user's dataset and collate function behind a DP batch sampler.

Poisson sampling produces batches of random size, including empty ones; the default collate
function cannot build an empty batch, so we build one by slicing a real example to length 0. That
keeps shapes and dtypes right and lets an empty step run (and be charged) like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from torch.utils.data._utils.collate import default_collate

from lazydp.errors import ConfigError


def _empty_like(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x[:0]
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple
        return type(x)(*(_empty_like(v) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_empty_like(v) for v in x)
    if isinstance(x, dict):
        return {k: _empty_like(v) for k, v in x.items()}
    return x


class EmptySafeCollate:
    """Wraps a collate function so that an empty index list yields an empty batch."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any], dataset: Dataset) -> None:
        self.collate_fn = collate_fn
        self.dataset = dataset

    def __call__(self, batch: Sequence[Any]) -> Any:
        if isinstance(batch, Sequence) and len(batch) == 0:
            return _empty_like(self.collate_fn([self.dataset[0]]))
        return self.collate_fn(list(batch) if isinstance(batch, tuple) else batch)  # type: ignore[arg-type]


class DPDataLoader(DataLoader):
    """A DataLoader whose batches come from a DP batch sampler (Poisson by default).

    ``on_epoch_end`` runs when an epoch has been fully iterated (LazyDP flushes pending noise there).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_sampler: Sampler[list[int]],
        collate_fn: Callable[[list[Any]], Any] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        if isinstance(dataset, IterableDataset):
            raise ConfigError(
                "data_loader wraps an IterableDataset; DP sampling needs random access to pick "
                "each example independently. Use a map-style Dataset (__getitem__/__len__)."
            )
        super().__init__(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=EmptySafeCollate(collate_fn or default_collate, dataset),
            num_workers=num_workers,
            pin_memory=pin_memory,
        )
        self.on_epoch_end: Callable[[], None] | None = None
        self.batches_drawn = 0  # by this process: the report compares it with the steps taken

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        for batch in super().__iter__():
            self.batches_drawn += 1
            yield batch
        if self.on_epoch_end is not None:
            self.on_epoch_end()
