"""nn.EmbeddingBag (mode "sum" or "mean"): exact ghost norms and row-sparse clipped sums.

Contract: one bag per example (dimension 0 of the output). Input is 2-D (B, L) with offsets None, or
1-D with offsets (``include_last_offset`` either way; empty bags allowed); ``per_sample_weights``
(mode "sum" only, as torch); ``padding_idx`` entries are dropped and, in mode "mean", not counted
in the bag length (as torch). Entry j of bag i with weight w_j (mean: 1/len) sends w_j * g_i to row
ids_j, so row r of example i gets s_ir * g_i with s_ir = sum of w over the bag's occurrences of r:

    ||dE_i||^2 = ||g_i||^2 * sum_r s_ir^2        (repeats grouped first: never sqrt(L) * ||g_i||)

With k calls per step, example i's gradient is sum_c sum_r s^c_ir g^c_i e_r, so
||dE_i||^2 = sum_{c,c'} (g^c_i . g^c'_i) * sum_r s^c_ir s^c'_ir: a k x k Gram per example, still
without materialising any (example, row, dim) tensor. ``mode="max"`` (no exact per-example norm),
``max_norm`` and ``scale_grad_by_freq`` are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lazydp._cache import ShapeCache
from lazydp.clipping._base import (
    BagFactors,
    Call,
    ClippedSum,
    LayerClipper,
    PerSample,
    PerSampleRows,
    SparseRows,
    sq_norms,
)
from lazydp.clipping.embedding import check_table, group_pairs, padded_positions, validate_ids
from lazydp.clipping.registry import batch_size, call_arg, clip_factors, register_clipper
from lazydp.errors import InputError, UnsupportedLayerError
from lazydp.row_groups import RowGroups


@dataclass
class _Bags:
    """The non-padding lookups of one call: row ``ids[j]`` enters bag ``bag[j]`` with weight ``w[j]``
    (``w`` None: every weight is 1, the common case, kept implicit to save a multiply per entry)."""

    ids: Tensor
    bag_index: Tensor | None  # None: ``length`` ids per bag, ``bag`` built on first use
    w: Tensor | None
    num_bags: int
    single: bool = False  # every bag holds at most one lookup (pooling 1): no repeats to group
    entries: int = -1  # input entries inside bags, padding included (-1: unknown: no block read)
    length: int = 0  # ids per bag when every bag holds the same number (with bag_index None)

    @property
    def bag(self) -> Tensor:
        """The bag of each id (non-decreasing). Equal bags build it only when a step asks:
        pooling 1 never does (4 ops a table a step saved)."""
        if self.bag_index is None:
            bags, length = self.num_bags, self.length
            ar = torch.arange(bags, device=self.ids.device)
            self.bag_index = ar[:, None].expand(bags, length).reshape(-1)
        return self.bag_index

    @property
    def one_each(self) -> bool:
        """Every bag reads exactly one row (so ``bag`` is 0, 1, ..., num_bags - 1)."""
        return self.single and self.ids.numel() == self.num_bags

    def weights(self, dtype: torch.dtype) -> Tensor:
        if self.w is None:
            return torch.ones(self.ids.numel(), dtype=dtype, device=self.ids.device)
        return self.w.to(dtype)


def _bag_lengths(module: nn.EmbeddingBag, ids: Tensor, offsets: Tensor) -> tuple[Tensor, int]:
    """Length of each bag from offsets (validated: start at 0, non-decreasing, within the input),
    and the longest length (0 without bags)."""
    n = ids.numel()
    if offsets.dim() != 1 or offsets.is_floating_point():
        raise InputError(
            f"EmbeddingBag offsets must be a 1-D integer tensor; got {offsets.dtype} of shape {tuple(offsets.shape)}"
        )
    ends = (
        offsets[1:]
        if module.include_last_offset
        else torch.cat([offsets[1:], offsets.new_tensor([n])])
    )
    starts = offsets[: ends.numel()]
    lengths = (ends - starts).long()
    first = int(offsets[0]) if offsets.numel() else 0
    last = int(ends[-1]) if ends.numel() else 0
    if first != 0 or last > n:
        raise InputError(
            f"EmbeddingBag offsets must start at 0 and end within the {n} ids; got offsets[0]={first}, "
            f"last bag end {last}"
        )
    if module.include_last_offset and offsets.numel() and last != n:
        # torch would silently drop the ids past the last offset from every bag.
        raise InputError(
            f"EmbeddingBag(include_last_offset=True): the last offset must equal the number of "
            f"ids ({n}); got {last}, which leaves {n - last} ids outside every bag"
        )
    shortest, longest = (int(x) for x in torch.aminmax(lengths)) if lengths.numel() else (0, 0)
    if shortest < 0:
        raise InputError(
            "EmbeddingBag offsets must be non-decreasing (each bag starts where the last ended)"
        )
    return lengths, longest


def _uniform_pooling(module: nn.EmbeddingBag, ids: Tensor, offsets: Tensor) -> int | None:
    """L when 1-D ``offsets`` hold equal bags of L >= 1 ids (the benchmark's and most DLRM
    inputs): then the bags need no lengths, no validation syncs and no repeat_interleave."""
    n = ids.numel()
    bags = offsets.numel() - (1 if module.include_last_offset else 0)
    if offsets.dim() != 1 or offsets.is_floating_point() or bags <= 0 or n % bags:
        return None
    length = n // bags
    if length == 0:
        return None
    end = n + length if module.include_last_offset else n
    return length if torch.equal(offsets, _steps(end, length, offsets)) else None


#: ``arange(0, end, length)`` as a dtype on a device, kept for the next batch of the same shape
#: (never written: only compared with).
_ARANGES: ShapeCache[tuple[int, int, torch.dtype, torch.device], Tensor] = ShapeCache(
    lambda key: torch.arange(0, key[0], key[1], dtype=key[2], device=key[3])
)


def _steps(end: int, length: int, like: Tensor) -> Tensor:
    """``arange(0, end, length)`` as ``like``'s dtype and device (cached)."""
    return _ARANGES((end, length, like.dtype, like.device))


def _bags(module: nn.EmbeddingBag, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Bags:
    ids = call_arg(args, kwargs, 0, "input")
    offsets = call_arg(args, kwargs, 1, "offsets")
    weights = call_arg(args, kwargs, 2, "per_sample_weights")
    if ids.dim() == 2 and offsets is not None:
        raise InputError("EmbeddingBag with 2-D input takes offsets=None (each row is one bag)")
    if ids.dim() == 1 and offsets is not None:
        length = _uniform_pooling(module, ids, offsets)
        num_bags = offsets.numel() - (1 if module.include_last_offset else 0)
    else:
        length, num_bags = (ids.shape[1], ids.shape[0]) if ids.dim() == 2 else (None, 0)
    bag: Tensor | None = None
    if length is not None:  # equal bags: 2-D input, or 1-D with evenly spaced offsets
        single = length <= 1
        entries = num_bags * length
    elif ids.dim() == 1 and offsets is not None:
        lengths, longest = _bag_lengths(module, ids, offsets)
        num_bags = lengths.numel()
        single = longest <= 1
        bag = torch.arange(num_bags, device=ids.device).repeat_interleave(lengths)
        entries = bag.numel()
    else:
        raise InputError(
            f"EmbeddingBag input has shape {tuple(ids.shape)} with offsets "
            f"{'None' if offsets is None else 'given'}; use 2-D (B, L) input, or 1-D input with offsets"
        )
    if ids.dim() == 1 and ids.numel() == entries and ids.dtype == torch.int64:
        flat = ids  # what the line below gives, without three no-op dispatches per table
    else:
        flat = ids.reshape(-1)[:entries].long()
    w = None if weights is None else weights.detach().reshape(-1)[:entries]
    bags = _Bags(flat, bag, w, num_bags, single, entries, length or 0)
    if module.padding_idx is not None:
        keep = flat != module.padding_idx
        bags.ids, bags.bag_index = flat[keep], bags.bag[keep]
        bags.w = None if w is None else w[keep]
    if module.mode == "mean":  # torch counts only non-padding entries in a bag's length
        bag = bags.bag
        bags.w = 1.0 / torch.bincount(bag, minlength=num_bags).double()[bag]
    return bags


def _memo_bags(
    module: nn.EmbeddingBag, args: tuple[Any, ...], kwargs: dict[str, Any], memo: dict[str, Any]
) -> _Bags:
    """``_bags`` once per call: the forward's rows_read computes it, the step reuses it."""
    if "bags" not in memo:
        memo["bags"] = _bags(module, args, kwargs)
    bags: _Bags = memo["bags"]
    return bags


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _row_groups(module: nn.EmbeddingBag, call: Call, bags: _Bags) -> RowGroups:
    """The call's ids grouped by row: LazyDP's catch-up already sorted them (``row_groups`` in
    the call's memo); otherwise sorted here, once per call."""
    groups = call.memo.get("row_groups")
    if not isinstance(groups, RowGroups) or groups.ids is not bags.ids:
        groups = call.memo["row_groups"] = RowGroups(bags.ids, module.num_embeddings)
    return groups


def _all_bags(module: nn.EmbeddingBag, calls: list[Call]) -> tuple[list[_Bags], int]:
    batch = batch_size(calls)
    bags = [_memo_bags(module, call.args, call.kwargs, call.memo) for call in calls]
    return bags, batch


@register_clipper(nn.EmbeddingBag)
class EmbeddingBagClipper(LayerClipper):
    """Exact ghost norms and row-sparse clipped sums for nn.EmbeddingBag(mode="sum" | "mean")."""

    def check(self, module: nn.Module) -> None:
        assert isinstance(module, nn.EmbeddingBag)
        if module.mode not in ("sum", "mean"):
            raise UnsupportedLayerError(
                f'EmbeddingBag(mode="{module.mode}") has no exact per-example norm; use mode="sum" or "mean"'
            )
        check_table(module)

    def norms2(self, module: nn.Module, calls: list[Call]) -> Tensor:
        assert isinstance(module, nn.EmbeddingBag)
        bags, batch = _all_bags(module, calls)
        grads = [call.grad_output.detach().reshape(batch, -1) for call in calls]
        if not module.weight.requires_grad:
            return grads[0].new_zeros(batch)
        dtype = grads[0].dtype
        if len(calls) == 1:
            b = bags[0]
            equal = b.bag_index is None  # equal bags of b.length, no bag tensor built
            found = None
            if not b.single:
                found = _row_groups(module, calls[0], b).pairs(b.bag_index, b.length)
            if found is None and b.one_each and b.w is None:
                return sq_norms(grads[0])  # every bag reads exactly one row, with weight 1
            w = b.w
            if found is None and w is None and equal:
                return sq_norms(grads[0]) * b.length  # no repeats: sum_r s_ir^2 = L
            if found is None and w is None:
                # No bag reads a row twice: sum_r s_ir^2 is the sum of its squared weights.
                s2 = torch.bincount(b.bag, minlength=batch).to(dtype)
            elif found is None:
                assert w is not None
                s2 = grads[0].new_zeros(batch).index_add_(0, b.bag, w.to(dtype).square())
            else:
                pair_bag, pair = found  # pair[j]: the pair of the j-th id in sorted order
                if w is None:  # s = how often the pair's bag reads its row
                    s = torch.bincount(pair, minlength=pair_bag.numel()).to(dtype)
                else:
                    w = w.index_select(0, _row_groups(module, calls[0], b).order).to(dtype)
                    s = grads[0].new_zeros(pair_bag.numel()).index_add_(0, pair, w)
                s2 = grads[0].new_zeros(batch).index_add_(0, pair_bag, s * s)
            return s2 * sq_norms(grads[0])
        k = len(calls)
        bag = _cat([b.bag for b in bags])
        ids = _cat([b.ids for b in bags])
        w = _cat([b.weights(dtype) for b in bags])
        which = _cat([torch.full_like(b.bag, j) for j, b in enumerate(bags)])
        pair_bag, _, inverse = group_pairs(bag, ids, module.num_embeddings)
        # s[u, c]: summed weight of (example, row) pair u in call c.
        s = w.new_zeros(pair_bag.numel() * k).index_add_(0, inverse * k + which, w).view(-1, k)
        outer = (s[:, :, None] * s[:, None, :]).view(-1, k * k)
        overlap = w.new_zeros((batch, k * k)).index_add_(0, pair_bag, outer)
        g = torch.stack(grads, 1)  # (B, k, D)
        gram = torch.bmm(g, g.transpose(1, 2)).view(batch, k * k)
        return (overlap * gram).sum(1)

    def norm_rows(self, module: nn.Module, calls: list[Call]) -> Tensor | None:
        assert isinstance(module, nn.EmbeddingBag)
        if len(calls) != 1 or not module.weight.requires_grad:
            return None
        bags, batch = _all_bags(module, calls)
        if not (bags[0].one_each and bags[0].w is None):
            return None
        return calls[0].grad_output.detach().reshape(batch, -1)  # every bag one row, weight 1

    def clipped_sum(self, module: nn.Module, calls: list[Call], c: Tensor) -> dict[str, ClippedSum]:
        assert isinstance(module, nn.EmbeddingBag)
        if not module.weight.requires_grad:
            return {}
        bags, batch = _all_bags(module, calls)
        cw = clip_factors(c, batch, calls[0].grad_output)
        ids = _cat([b.ids for b in bags])
        # Entry j of call k carries w_j * cw[b] * g^k[b] for its bag b: kept per bag (factors),
        # cw as a per-bag weight of the sums rather than multiplied into g.
        per_bag = _cat([call.grad_output.detach() for call in calls])
        bag: Tensor | None = None  # one call, one lookup per bag: entry j is bag j
        length = 1
        if len(bags) == 1 and bags[0].bag_index is None and bags[0].length > 1:
            length = bags[0].length  # equal bags: entry j is in bag j // length
        elif len(bags) > 1 or not bags[0].one_each:
            bag = _cat([b.bag if k == 0 else b.bag + k * batch for k, b in enumerate(bags)])
        dtype = per_bag.dtype
        w = None if all(b.w is None for b in bags) else _cat([b.weights(dtype) for b in bags])
        scale = cw if len(calls) == 1 else cw.repeat(len(calls))
        factors = BagFactors(bag, per_bag, w, length, scale)
        return {"weight": SparseRows(ids, factors, module.num_embeddings)}

    def per_sample(self, module: nn.Module, calls: list[Call]) -> dict[str, PerSample]:
        assert isinstance(module, nn.EmbeddingBag)
        if not module.weight.requires_grad:
            return {}
        bags, batch = _all_bags(module, calls)
        bag = _cat([b.bag for b in bags])
        ids = _cat([b.ids for b in bags])
        entries = _cat(
            [BagFactors(b.bag, c.grad_output.detach(), b.w).values() for b, c in zip(bags, calls)]
        )
        pair_bag, pair_row, inverse = group_pairs(bag, ids, module.num_embeddings)
        summed = entries.new_zeros((pair_row.numel(), module.embedding_dim))
        summed.index_add_(0, inverse, entries)
        return {"weight": PerSampleRows(pair_bag, pair_row, summed, module.num_embeddings, batch)}

    def reads_block(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], memo: dict[str, Any]
    ) -> bool:
        # Only torch's own forward, and only when every input id lies in a bag (none past the
        # last offset). per_sample_weights that require grad read the block too: autograd then
        # saves the block (untouched until the step), not the table, which a later catch-up of
        # the same table in this forward writes (torch would refuse that backward).
        assert isinstance(module, nn.EmbeddingBag)
        return (
            type(module).forward is nn.EmbeddingBag.forward
            and module.max_norm is None
            and _memo_bags(module, args, kwargs, memo).entries
            == call_arg(args, kwargs, 0, "input").numel()
        )

    def forward_from_block(
        self,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        block: Tensor,
        positions: Tensor,
        memo: dict[str, Any],
    ) -> Tensor:
        assert isinstance(module, nn.EmbeddingBag)
        ids = call_arg(args, kwargs, 0, "input")
        weights = call_arg(args, kwargs, 2, "per_sample_weights")
        if (
            weights is None
            and module.padding_idx is None
            and _memo_bags(module, args, kwargs, memo).one_each
        ):
            # Pooling 1: every bag is one row, as it is (a mean of one row too): a row gather
            # costs half of embedding_bag's kernel (2048 bags: 20 against 41 us).
            return block.index_select(0, positions)
        index, padding = positions, None
        if module.padding_idx is not None:
            # Padding entries point at one extra row, which embedding_bag's padding_idx skips
            # (and leaves out of a "mean" bag's length), exactly as the table's own padding row.
            index, block = padded_positions(positions, ids != module.padding_idx, block)
            padding = block.shape[0] - 1
        return F.embedding_bag(
            index.to(ids.dtype).view(ids.shape),
            block,
            call_arg(args, kwargs, 1, "offsets"),
            mode=module.mode,
            per_sample_weights=call_arg(args, kwargs, 2, "per_sample_weights"),
            include_last_offset=module.include_last_offset,
            padding_idx=padding,
        )

    def rows_read(
        self,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        memo: dict[str, Any] | None = None,
    ) -> Tensor | None:
        assert isinstance(module, nn.EmbeddingBag)
        validate_ids(module, call_arg(args, kwargs, 0, "input"), module.num_embeddings)
        return _memo_bags(module, args, kwargs, {} if memo is None else memo).ids
