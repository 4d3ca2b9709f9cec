"""What make_private accepts as the user's DataLoader, whose sampling the private loader replaces.

The private loader Poisson-samples every example of ``data_loader.dataset`` at rate B/N, B the
loader's batch size: the accountant assumes exactly that. So the dataset must be map-style with a
length, and the loader's own sampler must walk all of it plainly; a sampler that picks a subset,
weights examples, draws with replacement or shards for DistributedSampler would be dropped
without a word, and is refused with what to pass instead.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

from lazydp import _validate as v
from lazydp.accounting import epoch_steps
from lazydp.errors import ConfigError
from lazydp.loader import DPDataLoader


def batch_size_of(data_loader: DataLoader, n: int) -> int:
    """The expected batch size the user's loader asks for (it sets the sample rate B/N)."""
    batch_size = data_loader.batch_size or getattr(data_loader.batch_sampler, "batch_size", None)
    if not batch_size or n == 0:
        raise ConfigError(
            f"data_loader needs a batch_size and a non-empty dataset (got batch_size="
            f"{batch_size}, {n} examples); the expected batch size sets the sample rate."
        )
    return int(batch_size)


def dataset_size(data_loader: DataLoader) -> int:
    """N, the size of the data set the private loader will sample, after the checks that it can
    replace ``data_loader``'s sampling (ConfigError otherwise). make_private_with_epsilon runs
    them before calibrating: without them a dataset with no length raised a bare TypeError, a
    private loader was refused as having no batch_size, and a replaced sampler only after the
    calibration (seconds for a long run)."""
    if not isinstance(data_loader, DataLoader):  # a list of batches: an AttributeError before
        raise ConfigError(
            f"data_loader must be a torch.utils.data.DataLoader over the training set, got "
            f"{type(data_loader).__name__}: the private loader samples the dataset's examples "
            "itself. Pass DataLoader(dataset, batch_size=B)."
        )
    dataset = data_loader.dataset
    if not hasattr(dataset, "__len__") or isinstance(dataset, IterableDataset):
        raise ConfigError(
            f"data_loader's dataset ({type(dataset).__name__}) is an IterableDataset or has no "
            "length: Poisson sampling draws each of N examples with probability B/N, so it "
            "needs a map-style dataset (with __len__ and __getitem__), not an IterableDataset."
        )
    n = len(dataset)
    check_replaceable_sampling(data_loader, n)
    return n


def check_replaceable_sampling(data_loader: DataLoader, n: int) -> None:
    """ConfigError unless the loader's own sampling over its whole dataset is what the private
    loader replaces: it samples every example of ``dataset`` at rate B/N, so a sampler that
    picks a subset (a train split), weights examples or draws with replacement would be
    dropped without a word -- held-out examples trained on, and another sample rate."""
    if isinstance(data_loader, DPDataLoader):
        raise ConfigError(
            "data_loader is already a private loader (returned by make_private); pass the "
            "plain DataLoader it was made from, with batch_size=B: a private loader's batches "
            "are already Poisson samples, and sampling them again would change the rate."
        )
    batch_sampler = data_loader.batch_sampler
    sampler = getattr(batch_sampler, "sampler", data_loader.sampler)
    plain_batches = batch_sampler is None or type(batch_sampler) is BatchSampler
    # Over the whole dataset: SequentialSampler(range(k)) or RandomSampler(range(k), ...) walks
    # the first k examples only (a train split) whatever the dataset's length.
    whole = _source_size(sampler) == n
    plain = whole and (
        type(sampler) is SequentialSampler
        or (type(sampler) is RandomSampler and not sampler.replacement and sampler.num_samples == n)
    )
    if plain_batches and plain:
        return
    used = sampler if plain_batches else batch_sampler
    if type(used).__name__ == "DistributedSampler":
        raise ConfigError(
            "data_loader samples with DistributedSampler, which make_private replaces: pass "
            "every rank the full dataset with batch_size=B (the global expected batch) and no "
            "sampler; lazydp.distributed's private loader Poisson-samples each rank's shard. "
            "A per-rank Subset would train each rank on a fraction of its shard."
        )
    raise ConfigError(
        f"data_loader samples with {type(used).__name__}, which make_private replaces: the "
        f"private loader samples every one of the dataset's {n} examples at rate B/N (what "
        "the accountant assumes), so a subset, weights or repeats chosen by that sampler "
        "would be silently dropped. Pass the examples to train on as the dataset (e.g. "
        "torch.utils.data.Subset(dataset, train_indices)) with batch_size=B and no sampler."
    )


def _source_size(sampler: Any) -> int | None:
    """The number of indices ``sampler`` walks (its data source's length; None: unknown)."""
    try:
        return len(sampler.data_source)
    except (AttributeError, TypeError):
        return None


def loader_epoch_steps(
    sampler: str, n: int, batch_size: int, q: float, steps_per_epoch: int | None
) -> int:
    """Steps the private loader runs per epoch: floor(N/B) for shuffled fixed-size batches (the
    partial batch is dropped), else ``steps_per_epoch``, by default round(1/q). Checked here
    under its own name: make_private_with_epsilon used it before the sampler's check (a string
    raised a TypeError from round()), and 0 silently meant the default."""
    if steps_per_epoch is not None:
        steps_per_epoch = v.check_positive_int("steps_per_epoch", steps_per_epoch)
    if sampler == "shuffle" or steps_per_epoch is None:
        return epoch_steps(sampler, q, n, batch_size)
    return steps_per_epoch
