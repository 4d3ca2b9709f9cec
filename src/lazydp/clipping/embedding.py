"""nn.Embedding: exact per-example norms and row-sparse clipped sums, repeated ids included.

Contract: ids of shape (B, ...) (any number of positions per example), grad_output (B, ..., dim).
Example i's gradient on row r is the sum of g over the positions of example i whose id is r; rows
equal to ``padding_idx`` get nothing. Norms group (example, row) pairs first (key = i * num_rows + id,
one ``torch.unique``), so an id repeated inside one example is counted as one row with the summed
gradient: never as independent rows. Calls of the same layer are concatenated per example.
``max_norm`` (renormalises rows in forward, a data-dependent in-place change) and
``scale_grad_by_freq`` (scales by batch-wide counts, which mixes examples) are refused.

This module also holds the id helpers shared with EmbeddingBag: ``validate_ids``, ``group_pairs``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lazydp.clipping._base import (
    Call,
    ClippedSum,
    LayerClipper,
    PerSample,
    PerSampleRows,
    SparseRows,
    sq_norms,
)
from lazydp.clipping.registry import batch_size, call_arg, clip_factors, register_clipper
from lazydp.errors import InputError, UnsupportedLayerError


def validate_ids(module: nn.Module, ids: Any, num_rows: int) -> Tensor:
    """Return ``ids`` if it is an integer tensor with every id in [0, num_rows); else InputError.

    One min/max reduction, no per-id Python work.

    Example::

        >>> validate_ids(nn.Embedding(10, 2), torch.tensor([1, 9]), 10)
        tensor([1, 9])
    """
    label = f"{type(module).__name__}({num_rows} rows)"
    if not isinstance(ids, Tensor) or ids.dtype not in (
        torch.int64,
        torch.int32,
        torch.int16,
        torch.uint8,
        torch.int8,
    ):
        kind = ids.dtype if isinstance(ids, Tensor) else type(ids).__name__
        raise InputError(
            f"{label} got ids of type {kind}; ids must be an integer tensor (int64 or int32), "
            "e.g. torch.as_tensor(ids, dtype=torch.long)"
        )
    if ids.numel():
        lo, hi = torch.aminmax(ids)
        lo_i, hi_i = int(lo), int(hi)
        if lo_i < 0 or hi_i >= num_rows:
            bad = lo_i if lo_i < 0 else hi_i
            raise InputError(
                f"{label} got id {bad} outside [0, {num_rows}); ids must be < num_embeddings "
                "(did preprocessing use a different bucket count?)"
            )
    return ids


def padded_positions(
    positions: Tensor, keep: Tensor, block: Tensor, padding_row: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """LazyDP's deferred read of a padded table: the block row of every input entry (``keep``:
    the entries that are not padding, whose block rows are ``positions``, in order) with padding
    entries pointing at one extra row appended to ``block`` (``padding_row``, zeros if None).

    >>> index, ext = padded_positions(torch.tensor([1, 0]), torch.tensor([True, False, True]),
    ...                               torch.ones(2, 3))
    >>> index.tolist(), ext.shape
    ([1, 2, 0], torch.Size([3, 3]))
    """
    index = positions.new_full(keep.shape, block.shape[0])
    index[keep] = positions
    extra = block.new_zeros(1, block.shape[1]) if padding_row is None else padding_row.view(1, -1)
    return index.view(-1), torch.cat([block, extra.to(block.dtype)])


def check_table(module: nn.Embedding | nn.EmbeddingBag) -> None:
    """Refuse table settings with no exact per-example gradient (shared by both table kinds)."""
    name = type(module).__name__
    if module.max_norm is not None:
        raise UnsupportedLayerError(
            f"{name}(max_norm={module.max_norm}) renormalises looked-up rows in place during forward "
            "(a data-dependent change outside the DP mechanism); use max_norm=None"
        )
    if module.scale_grad_by_freq:
        raise UnsupportedLayerError(
            f"{name}(scale_grad_by_freq=True) divides gradients by batch-wide id counts, which mixes "
            "examples; use scale_grad_by_freq=False"
        )


def group_pairs(example: Tensor, ids: Tensor, num_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group (example, row) pairs: returns (pair_example, pair_row, inverse) with
    ``inverse[j]`` the pair of entry j; each (example, row) pair appears once in the outputs.

    Example::

        >>> group_pairs(torch.tensor([0, 0, 1]), torch.tensor([4, 4, 4]), 10)
        (tensor([0, 1]), tensor([4, 4]), tensor([0, 0, 1]))
    """
    key = example * num_rows + ids
    uniq, inverse = torch.unique(key, return_inverse=True)
    return uniq // num_rows, uniq % num_rows, inverse


def _entries(module: nn.Embedding, calls: list[Call]) -> tuple[Tensor, Tensor, Tensor, int]:
    """Flat (example, id, grad row) of every non-padding lookup across calls, and B."""
    batch = batch_size(calls)
    ids_parts, grad_parts = [], []
    for call in calls:
        ids = call_arg(call.args, call.kwargs, 0, "input")
        ids_parts.append(ids.reshape(batch, -1))
        grad_parts.append(call.grad_output.detach().reshape(batch, -1, module.embedding_dim))
    ids = ids_parts[0] if len(calls) == 1 else torch.cat(ids_parts, 1)
    grad = grad_parts[0] if len(calls) == 1 else torch.cat(grad_parts, 1)
    positions = ids.shape[1]
    example = torch.arange(batch, device=ids.device).repeat_interleave(positions)
    flat_grad = grad.reshape(-1, module.embedding_dim)
    # One call: hand the step the very id tensor the forward gave LazyDP's catch-up (rows_read),
    # so that the update recognises the rows the catch-up gathered (LazyTable.update's fast path).
    memo = calls[0].memo if len(calls) == 1 else {}
    if "flat_ids" in memo:
        keep = memo["keep"]  # None: no padding_idx
        if keep is not None:
            example, flat_grad = example[keep], flat_grad[keep]
        return example, memo["flat_ids"], flat_grad, batch
    flat_ids = ids.reshape(-1).long()
    if module.padding_idx is not None:
        keep = flat_ids != module.padding_idx
        example, flat_ids, flat_grad = example[keep], flat_ids[keep], flat_grad[keep]
    return example, flat_ids, flat_grad, batch


def _pair_grads(module: nn.Embedding, calls: list[Call]) -> tuple[Tensor, Tensor, Tensor, int]:
    """Per (example, row) pair: example, row and summed gradient (coalesced), and B."""
    example, ids, grad, batch = _entries(module, calls)
    pair_example, pair_row, inverse = group_pairs(example, ids, module.num_embeddings)
    summed = grad.new_zeros((pair_row.numel(), module.embedding_dim))
    summed.index_add_(0, inverse, grad)
    return pair_example, pair_row, summed, batch


@register_clipper(nn.Embedding)
class EmbeddingClipper(LayerClipper):
    """Exact norms and row-sparse clipped sums for nn.Embedding."""

    def check(self, module: nn.Module) -> None:
        assert isinstance(module, nn.Embedding)
        check_table(module)

    def norms2(self, module: nn.Module, calls: list[Call]) -> Tensor:
        assert isinstance(module, nn.Embedding)
        if not module.weight.requires_grad:
            return calls[0].grad_output.new_zeros(batch_size(calls))
        if len(calls) == 1 and call_arg(calls[0].args, calls[0].kwargs, 0, "input").dim() == 1:
            # One id per example: no repeats are possible, so no grouping is needed.
            example, _, grad, batch = _entries(module, calls)
            return grad.new_zeros(batch).index_add_(0, example, sq_norms(grad))
        pair_example, _, summed, batch = _pair_grads(module, calls)
        return summed.new_zeros(batch).index_add_(0, pair_example, sq_norms(summed))

    def clipped_sum(self, module: nn.Module, calls: list[Call], c: Tensor) -> dict[str, ClippedSum]:
        assert isinstance(module, nn.Embedding)
        if not module.weight.requires_grad:
            return {}
        example, ids, grad, batch = _entries(module, calls)
        cw = clip_factors(c, batch, grad)[example]
        return {"weight": SparseRows(ids, grad * cw[:, None], module.num_embeddings)}

    def per_sample(self, module: nn.Module, calls: list[Call]) -> dict[str, PerSample]:
        assert isinstance(module, nn.Embedding)
        if not module.weight.requires_grad:
            return {}
        pair_example, pair_row, summed, batch = _pair_grads(module, calls)
        return {
            "weight": PerSampleRows(pair_example, pair_row, summed, module.num_embeddings, batch)
        }

    def rows_read(
        self,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        memo: dict[str, Any] | None = None,
    ) -> Tensor | None:
        assert isinstance(module, nn.Embedding)
        ids = validate_ids(module, call_arg(args, kwargs, 0, "input"), module.num_embeddings)
        if ids.dim() == 0 and torch.is_grad_enabled():  # dim 0 of the output would be d, not B
            raise InputError(
                f"Embedding({module.num_embeddings} rows) got a 0-d id tensor in a training "
                "forward; per-example clipping needs a batch dimension: pass shape (B,) or "
                "(B, L), e.g. ids.unsqueeze(0) for one example."
            )
        flat = ids.reshape(-1).long()
        keep = None if module.padding_idx is None else flat != module.padding_idx
        if keep is not None:
            flat = flat[keep]
        if memo is not None:  # _entries hands the very same tensor to the step
            memo["flat_ids"], memo["keep"] = flat, keep
        return flat

    def reads_block(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], memo: dict[str, Any]
    ) -> bool:
        # Only torch's own forward (max_norm is refused by check_table).
        assert isinstance(module, nn.Embedding)
        return type(module).forward is nn.Embedding.forward

    def forward_from_block(
        self,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        block: Tensor,
        positions: Tensor,
        memo: dict[str, Any],
    ) -> Tensor:
        assert isinstance(module, nn.Embedding)
        ids = call_arg(args, kwargs, 0, "input")
        if module.padding_idx is None:
            return F.embedding(positions.view(ids.shape), block)
        # Padding entries read the table's padding row as it is (it never gets noise or a
        # gradient, so it is never in a block): appended to the block as one extra row.
        row = module.weight.detach()[module.padding_idx]
        index, block = padded_positions(positions, ids != module.padding_idx, block, row)
        return F.embedding(index.view(ids.shape), block)
