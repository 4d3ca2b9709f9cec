"""Several layers' ghost norms in one reduction when their output gradients share one tensor.

Why: on a DLRM every table's pooled output enters the interaction through one ``torch.stack``,
so autograd hands each table a (B, d) view into the same (B, tables + 1, d) gradient. At
pooling 1 a table's per-example squared norm is the squared norm of its view's row (the
EmbeddingBag clipper's ``norm_rows``). Reduced one table at a time that is 26 small reductions
on DLRM basic, 67 us each inside a step (1.7-2.3 ms); side by side they are one (B, K, d)
reduction over the very same numbers.

Contract: ``sum_sq_norms(rows)`` returns (B,) tensors whose sum equals
``sum(sq_norms(r) for r in rows)`` up to float rounding (the order of the additions differs).
Views are reduced together only when they are evenly spaced in one storage: same storage,
dtype, device, shape and strides (s, 1), offsets o, o + step, o + 2 step, ... Then the strided
(B, K, d) tensor with strides (s, step, 1) at offset o holds view k as its [:, k, :], element
for element (whatever the step: gaps between views are never read). Anything else is reduced
on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor
from torch.nn import functional as F

from lazydp._cache import ShapeCache
from lazydp.clipping._base import SparseRows, sq_norms
from lazydp.row_groups import _SEGMENT_SUM_DTYPES as SEGMENT_SUM_DTYPES
from lazydp.row_groups import RowGroups

T = TypeVar("T")


def _key(rows: Tensor) -> tuple[object, ...] | None:
    if rows.dim() != 2 or rows.stride(1) != 1 or rows.numel() == 0:
        return None
    storage = rows.untyped_storage().data_ptr()
    return (storage, rows.dtype, rows.device, tuple(rows.shape), rows.stride(0))


def _runs(items: list[T], view: Callable[[T], Tensor]) -> list[list[T]]:
    """``items`` (one key, sorted by their view's offset) split into runs of equally spaced
    views."""
    runs: list[list[T]] = []
    for item in items:
        if runs:
            run = runs[-1]
            step = view(item).storage_offset() - view(run[-1]).storage_offset()
            run_step = (
                view(run[1]).storage_offset() - view(run[0]).storage_offset()
                if len(run) > 1
                else step
            )
            if step == run_step:
                run.append(item)
                continue
        runs.append([item])
    return runs


def _itself(t: Tensor) -> Tensor:
    return t


def sum_sq_norms(rows: list[Tensor]) -> list[Tensor]:
    """(B,) parts adding up to the squared row norms of every tensor in ``rows``, summed."""
    parts: list[Tensor] = []
    groups: dict[tuple[object, ...], list[Tensor]] = {}
    for r in rows:
        key = _key(r)
        if key is None:
            parts.append(sq_norms(r.reshape(r.shape[0], -1)))
        else:
            groups.setdefault(key, []).append(r)
    for views in groups.values():
        views.sort(key=Tensor.storage_offset)
        for run in _runs(views, _itself):
            if len(run) == 1:
                parts.append(sq_norms(run[0]))
                continue
            first = run[0]
            batch, width = first.shape
            step = run[1].storage_offset() - first.storage_offset()
            side_by_side = first.as_strided(
                (batch, len(run), width), (first.stride(0), step, 1), first.storage_offset()
            )
            parts.append(sq_norms(side_by_side, (1, 2)))
    return parts


def _bag_key(s: SparseRows, groups: RowGroups) -> tuple[object, ...] | None:
    """What tables must share for their per-row sums to be one embedding_bag: one bag per id
    (pooling 1, no per-sample weights), the same clip factors, and output gradients that are
    views into one storage (``_key``). None: this sum is not one of them."""
    f = s.factors
    if (
        f is None
        or f.bag is not None
        or f.length != 1
        or f.w is not None
        or f.bag_scale is None
        or groups.ids is not s.indices
        or f.per_bag.dtype not in SEGMENT_SUM_DTYPES
        or f.per_bag.shape[0] != s.indices.numel()
    ):
        return None
    key = _key(f.per_bag)
    return None if key is None else (*key, id(f.bag_scale))


def sum_shared_bags(items: list[tuple[SparseRows, RowGroups]]) -> None:
    """``s.summed_by(groups)`` of every item, computed together where they allow it and handed
    over with ``s.presum``.

    Why: a DLRM step sums each table's clipped gradient per distinct row (LazyDP's update), one
    embedding_bag per table. Each is a small parallel kernel (2048 bags of 32 floats), and on a
    small, shared machine each costs far more in OpenMP hand-offs than in work (10 tables of
    rmc1: 0.3-2.6 ms apart against 0.24-0.51 ms together, same numbers). At pooling 1 every
    table's gradient is a (B, d) view into the interaction's one output gradient and every
    entry's weight is its example's clip factor, so the tables' sums are the segments of ONE
    embedding_bag over that storage: entry j of table k reads row ``j * s / p + k * step / p``
    of the storage seen as rows ``p`` apart (s the views' row stride, step their spacing, p
    their gcd, at least the row width: rows never overlap). Each
    output row sums the same products in the same order as the table's own call: the same bits.

    Items that do not fit (other poolings, weights, storages) are left alone: their
    ``summed_by`` computes them as before.
    """
    groups_of: dict[tuple[object, ...], list[tuple[Tensor, SparseRows, RowGroups]]] = {}
    for s, g in items:
        key = _bag_key(s, g)
        if key is not None:
            assert s.factors is not None
            groups_of.setdefault(key, []).append((s.factors.per_bag, s, g))
    for members in groups_of.values():
        members.sort(key=lambda m: m[0].storage_offset())
        runs = _runs(members, lambda m: m[0])
        for run in runs:
            if len(run) > 1:
                _sum_run(run)


def _sum_run(run: list[tuple[Tensor, SparseRows, RowGroups]]) -> None:
    """One embedding_bag for the tables of ``run`` (equally spaced views, see sum_shared_bags)."""
    first = run[0][0]
    batch, width = first.shape
    step = int(run[1][0].storage_offset() - first.storage_offset())
    row_stride = int(first.stride(0))
    pitch = math.gcd(step, row_stride)  # rows of the storage seen as a (rows, width) matrix
    if step <= 0 or pitch < width:
        return  # no such matrix without overlapping rows: each table sums its own
    per_example, per_table = row_stride // pitch, step // pitch
    base = first.as_strided(
        ((batch - 1) * per_example + (len(run) - 1) * per_table + 1, width),
        (pitch, 1),
        first.storage_offset(),
    )
    orders = torch.cat([g.order for _, _, g in run])
    sizes = tuple(g.order.numel() for _, _, g in run)
    # entry j of table k: row j * per_example + k * per_table
    index = torch.add(_TABLE_ROWS((sizes, per_table, orders.device)), orders, alpha=per_example)
    scale = run[0][1].factors.bag_scale  # type: ignore[union-attr]
    assert scale is not None
    weights = scale.index_select(0, orders).to(base.dtype)
    counts = torch.cat([g.counts for _, _, g in run])
    out = F.embedding_bag(
        index, base, counts.cumsum(0) - counts, mode="sum", per_sample_weights=weights
    )
    for (_, s, g), summed in zip(run, out.split([g.rows.numel() for _, _, g in run])):
        s.presum(g, summed)


def _table_rows(key: tuple[tuple[int, ...], int, torch.device]) -> Tensor:
    sizes, per_table, device = key
    first_rows = torch.arange(len(sizes), device=device) * per_table
    return first_rows.repeat_interleave(torch.tensor(sizes, device=device))


#: k * per_table repeated sizes[k] times (table k's row offset for each of its entries), kept
#: for the next step of that shape.
_TABLE_ROWS: ShapeCache[tuple[tuple[int, ...], int, torch.device], Tensor] = ShapeCache(_table_rows)
