"""Round robin with the modes' tables shared: interleaved timing where the models do not fit twice.

The benchmark times sgd and lazydp round robin in one process (``time_interleaved``): a burst
of other work on this shared machine then hits both alike. At 10 tables of 10M rows
(12.8 GB) two models do not fit in 24 GB, and the sweep fell back to one process per mode,
whose lazydp / sgd swung 1.03-2.07 between identical runs (RESULTS.md, twentieth session).

A step's time does not depend on the values in its tables, only on which rows it touches. So
the later modes of the round robin use the first mode's table tensors (the same Parameter
objects; each mode still has its own MLPs, optimizer and engine): one set of tables in memory.
Two things keep the timing honest:
* each mode draws its batches from its own seed: with the same ids, a mode would find the rows
  the previous mode just read still in the cache (10 tables x 2048 rows x 128 B = 2.6 MB fit
  in L3), which separate tables never give it. Only under uniform locality: the hot rows of
  a zipf or movielens layout are the same rows whatever the batch seed (their layout has a
  seed of its own), and at zipf:1.1 59% of a mode's reads hit rows the other had just read,
  so those round robins are not shared;
* the shared values are written by every mode (sgd's update, lazydp's noise and update): they
  stay finite and of the same magnitude, and nothing here reads them as a result.
The results say so (``tables_shared``), and the sweep prints a note.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from lazydp.bench.workload import BenchSpec, build_model
from lazydp.data.synthetic import parse_locality

#: The note a sweep prints for a round robin that shared its tables.
SHARED_NOTE = (
    "{pairs}: the modes shared one set of tables (timing only: a step's time does not depend on "
    "the values in the tables; each mode drew its own batches), so they could be interleaved"
)


def can_share(specs: list[BenchSpec]) -> bool:
    """Whether a round robin of these workloads may share tables: all the same workload (a
    round robin across table sizes has tables of different shapes), with uniform locality
    (another one's hot rows do not move with the batch seed: see the module docstring)."""
    return (
        len(specs) > 1
        and all(s == specs[0] for s in specs)
        and parse_locality(specs[0].locality)[0] == "uniform"
    )


def model_on_tables_of(source: nn.Module, spec: BenchSpec, mode: str) -> nn.Module:
    """``build_model(spec, mode)`` with ``source``'s embedding tables in place of its own,
    without ever allocating its own (built with one-row tables, then given source's)."""
    model = build_model(replace(spec, scale=1e-12), mode)  # every table one row
    mine, theirs = _bags(model), _bags(source)
    if len(mine) != len(theirs):
        raise ValueError(f"{len(mine)} tables against the source's {len(theirs)}")
    for bag, other in zip(mine, theirs, strict=True):
        bag.weight = other.weight  # the same Parameter: no copy
        bag.num_embeddings = other.num_embeddings
    if hasattr(source, "table_rows"):
        model.table_rows = source.table_rows
    return model


def batch_seed(spec: BenchSpec, index: int) -> BenchSpec:
    """``spec`` with the batch seed of the ``index``-th mode of a shared round robin."""
    return replace(spec, seed=spec.seed + index)


def _bags(model: nn.Module) -> list[nn.EmbeddingBag | nn.Embedding]:
    return [m for m in model.modules() if isinstance(m, (nn.EmbeddingBag, nn.Embedding))]
