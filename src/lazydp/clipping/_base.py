"""The contract every per-layer clipper fulfils.

A *call* is one forward invocation of a layer, captured by the engine: the positional and keyword
arguments it was called with, and the gradient of the loss w.r.t. its output, already scaled to
*per-example* loss gradients (the engine undoes the 1/B of a mean-reduced loss). Dimension 0 of the
output is the batch (for EmbeddingBag with offsets: the bags). A layer called k times in one forward
(weight sharing) gives k calls; a clipper treats them as one longer sequence per example.

A clipper never changes a parameter. It returns, per example i, the squared norm of that example's
gradient over all of the layer's *trainable direct* parameters, and the clipped sum
sum_i c_i * grad_i, for each trainable parameter (by parameter name, e.g. ``"weight"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lazydp.row_groups import RowGroups


@dataclass
class Call:
    """One captured forward call of a layer."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    grad_output: Tensor  # per-example dL_i/d(output), shape (B, ...)
    # What a clipper derived from args alone (e.g. an EmbeddingBag's flattened bags), shared by
    # rows_read at forward time and norms2 / clipped_sum at step time: computed once per call.
    memo: dict[str, Any] = field(default_factory=dict)


@dataclass
class BagFactors:
    """Entry j of a row-sparse gradient as ``w[j] * per_bag[bag[j]]`` (w None: weight 1).

    An EmbeddingBag's clipped sum has this form: every entry of bag b carries that bag's
    clipped output gradient. Kept factored, the per-row sums read a (bags, dim) matrix that
    fits in cache instead of an (entries, dim) one (21 MB per table on rmc1) that is written
    once and read once.
    """

    bag: Tensor | None  # int64, (n,); None: equal bags, entry j in bag j // length
    per_bag: Tensor  # (bags, dim)
    w: Tensor | None = None  # (n,)
    length: int = 1  # entries per bag when ``bag`` is None (1: pooling 1)
    # (bags,): a factor per bag (the clip factors), applied with w as the per-row sums' weights
    # instead of scaling per_bag (one (bags, dim) multiply and temporary less per table).
    bag_scale: Tensor | None = None

    def entry_weights(self) -> Tensor | None:
        """(n,) weight of each entry: w times its bag's scale (None: all 1)."""
        if self.bag_scale is None:
            return self.w
        if self.bag is not None:
            scale = self.bag_scale.index_select(0, self.bag)
        elif self.length > 1:
            scale = self.bag_scale.repeat_interleave(self.length)
        else:
            scale = self.bag_scale
        return scale if self.w is None else scale * self.w.to(scale.dtype)

    def values(self) -> Tensor:
        if self.bag is not None:
            rows = self.per_bag.index_select(0, self.bag)
        elif self.length > 1:
            rows = self.per_bag.repeat_interleave(self.length, 0)
        else:
            rows = self.per_bag
        w = self.entry_weights()
        return rows if w is None else rows * w.to(rows.dtype)[:, None]


class SparseRows:
    """A row-sparse gradient of a (num_rows, dim) table: rows ``indices`` get ``values`` added.

    Duplicated indices are allowed (they add up) unless ``coalesced`` is True. ``values`` may be
    given as :class:`BagFactors` instead, and are then built only if something asks for them.
    """

    def __init__(
        self,
        indices: Tensor,
        values: Tensor | BagFactors,
        num_rows: int,
        coalesced: bool = False,
    ) -> None:
        self.indices = indices  # int64, (n,)
        self.num_rows = num_rows
        self.coalesced = coalesced
        self.factors = values if isinstance(values, BagFactors) else None
        self._values = None if isinstance(values, BagFactors) else values
        self._summed: tuple[RowGroups, Tensor] | None = None  # see presum

    def presum(self, groups: RowGroups, summed: Tensor) -> None:
        """Hand over ``summed_by(groups)``, computed elsewhere (several tables at once:
        ``shared_rows.sum_shared_bags``); it must be exactly that sum."""
        self._summed = (groups, summed)

    @property
    def values(self) -> Tensor:  # (n, dim)
        if self._values is None:
            assert self.factors is not None
            self._values = self.factors.values()
        return self._values

    def summed_by(self, groups: RowGroups) -> Tensor:
        """Values summed per distinct row of ``groups`` (built from these ``indices``)."""
        if self._summed is not None and self._summed[0] is groups:
            summed, self._summed = self._summed[1], None  # used once, as a fresh sum would be
            return summed
        if self.factors is not None:  # cheaper than the values even once they are built
            f = self.factors
            return groups.sum_gathered(f.per_bag, f.bag, f.entry_weights(), f.length)
        return groups.sum_per_row(self.values)

    def coalesce(self) -> SparseRows:
        """Sum duplicated rows: unique sorted indices, one value row each."""
        if self.coalesced:
            return self
        groups = RowGroups(self.indices)
        return SparseRows(groups.rows, self.summed_by(groups), self.num_rows, True)

    def to_dense(self) -> Tensor:
        dense = self.values.new_zeros((self.num_rows, self.values.shape[1]))
        dense.index_add_(0, self.indices, self.values)
        return dense


@dataclass
class PerSampleRows:
    """Materialised per-example embedding gradients, kept compact (never B x rows x dim).

    Example ``example[j]`` has gradient ``values[j]`` on table row ``indices[j]``; each
    (example, row) pair appears at most once (coalesced), so norms are exact.
    """

    example: Tensor  # int64, (n,)
    indices: Tensor  # int64, (n,)
    values: Tensor  # (n, dim)
    num_rows: int
    batch_size: int = field(default=0)


# A materialised per-example gradient: a dense (B, *param.shape) tensor or compact rows.
PerSample = Tensor | PerSampleRows
# A clipped sum: dense (param.shape) or row-sparse for embedding tables.
ClippedSum = Tensor | SparseRows


class LayerClipper:
    """Per-example norms and clipped sums for one kind of layer. Subclasses are stateless."""

    #: The layer types this clipper handles (set by ``register_clipper``).
    layer_types: tuple[type[nn.Module], ...] = ()

    def check(self, module: nn.Module) -> None:
        """Raise UnsupportedLayerError if this module's configuration has no exact norm."""

    def norms2(self, module: nn.Module, calls: list[Call]) -> Tensor:
        """(B,) squared per-example gradient norms over all trainable direct parameters.

        Ghost norms where the layer allows: per-example gradients are never materialised.
        """
        raise NotImplementedError

    def norm_rows(self, module: nn.Module, calls: list[Call]) -> Tensor | None:
        """A (B, D) tensor whose squared row norms are exactly :meth:`norms2`, or None. The
        step then reduces layers whose rows are views into one tensor together
        (``shared_rows.py``)."""
        return None

    def clipped_sum(self, module: nn.Module, calls: list[Call], c: Tensor) -> dict[str, ClippedSum]:
        """sum_i c[i] * grad_i per trainable parameter name, from the captured calls alone."""
        raise NotImplementedError

    def per_sample(self, module: nn.Module, calls: list[Call]) -> dict[str, PerSample]:
        """Materialised per-example gradients (the ``dpsgd_b`` / ``dpsgd_r`` path)."""
        raise NotImplementedError

    def rows_read(
        self,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        memo: dict[str, Any] | None = None,
    ) -> Tensor | None:
        """For embedding tables: the (unique or not) int64 row ids a forward call reads, after
        validating them (out of range -> InputError naming the layer, the id and the table size).
        ``padding_idx`` is excluded. None for layers that are not tables. ``memo`` becomes the
        call's :attr:`Call.memo`: work done here can be reused at step time."""
        return None

    def reads_block(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], memo: dict[str, Any]
    ) -> bool:
        """Whether :meth:`forward_from_block` can run this table call (after ``rows_read``)."""
        return False

    def forward_from_block(
        self,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        block: Tensor,
        positions: Tensor,
        memo: dict[str, Any],
    ) -> Tensor:
        """The call's output computed from ``block`` (the distinct rows it reads, with their
        noise) instead of the table: ``positions[j]`` is the block row of the call's j-th id
        (in ``rows_read`` order; ``memo`` is the call's, as ``reads_block`` left it). Must equal
        the layer's own forward exactly."""
        raise NotImplementedError


def trainable_direct_params(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters a layer owns directly (not its children's) that require grad."""
    cls = type(module)
    if (
        cls.named_parameters is not nn.Module.named_parameters
        or cls._named_members is not nn.Module._named_members
    ):
        return {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    # named_parameters(recurse=False) without its generator machinery (read every step, for
    # every layer): the same names, in the same order, each parameter once.
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for n, p in module._parameters.items():
        if p is None or id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            out[n] = p
    return out


def sq_norms(x: Tensor, dim: int | tuple[int, ...] = 1) -> Tensor:
    """Squared L2 norms over ``dim``: ``x.pow(2).sum(dim)`` as one fused reduction (no x-sized
    temporary; 30% faster on a 2048 x 512 activation here).

    >>> sq_norms(torch.tensor([[3.0, 4.0]])).tolist()
    [25.0]
    """
    return at_least_float32(torch.linalg.vector_norm(x, dim=dim)).square()


#: Too narrow for norms and clip factors: float16's largest square is 65504 (a norm of 256), and
#: bfloat16 keeps 8 bits, so a clip factor from its rounded norm let an example exceed C by ~1%.
_HALF = (torch.float16, torch.bfloat16)


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` as float32 if it is float16 / bfloat16, else as it is (see ``_HALF``).

    >>> at_least_float32(torch.ones(2, dtype=torch.float16)).dtype
    torch.float32
    """
    return x.float() if x.dtype in _HALF else x


def widened(x: Tensor, param: Tensor) -> Tensor:
    """``x`` in the wider of its dtype, ``param``'s and float32. Under autocast a layer runs in
    bfloat16/float16 while its parameters stay float32, and a half-precision model has both in
    half: norms and clipped sums are then taken in float32, so the clip bound holds to float32
    rounding, not to bfloat16's (about 0.4%), and float16 squares do not overflow.

    >>> widened(torch.ones(2, dtype=torch.bfloat16), torch.zeros(1)).dtype
    torch.float32
    >>> widened(torch.ones(2, dtype=torch.float16), torch.zeros(1).half()).dtype
    torch.float32
    """
    if x.dtype == param.dtype and x.dtype not in _HALF:  # the common case: no cast dispatched
        return x
    return x.to(torch.promote_types(torch.promote_types(x.dtype, param.dtype), torch.float32))
