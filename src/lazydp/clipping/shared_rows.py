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

from torch import Tensor

from lazydp.clipping._base import sq_norms


def _key(rows: Tensor) -> tuple[object, ...] | None:
    if rows.dim() != 2 or rows.stride(1) != 1 or rows.numel() == 0:
        return None
    storage = rows.untyped_storage().data_ptr()
    return (storage, rows.dtype, rows.device, tuple(rows.shape), rows.stride(0))


def _runs(views: list[Tensor]) -> list[list[Tensor]]:
    """``views`` (one key, sorted by offset) split into runs of equally spaced views."""
    runs: list[list[Tensor]] = []
    for v in views:
        if runs:
            run = runs[-1]
            step = v.storage_offset() - run[-1].storage_offset()
            run_step = run[1].storage_offset() - run[0].storage_offset() if len(run) > 1 else step
            if step == run_step:
                run.append(v)
                continue
        runs.append([v])
    return runs


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
        for run in _runs(views):
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
