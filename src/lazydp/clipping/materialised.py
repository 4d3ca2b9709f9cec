"""Norms and clipped sums from *materialised* per-example gradients (the ``dpsgd_b`` path).

Contract: given ``ps``, a dict parameter name -> per-example gradient (a dense (B, *shape) tensor or
a coalesced ``PerSampleRows``), ``per_sample_norms2`` returns the (B,) squared norm over all entries
and ``per_sample_clipped_sum`` returns sum_i c[i] * grad_i per name (dense tensors stay dense, rows
stay row-sparse). ``MaterialisedClipper`` turns any clipper that can materialise (cheap layers,
LayerNorm) into a full clipper by deriving ``norms2`` and ``clipped_sum`` from ``per_sample``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lazydp.clipping._base import (
    Call,
    ClippedSum,
    LayerClipper,
    PerSample,
    PerSampleRows,
    SparseRows,
    sq_norms,
)
from lazydp.clipping.registry import batch_size, clip_factors
from lazydp.errors import InputError


def per_sample_norms2(ps: Mapping[str, PerSample], batch_size: int) -> Tensor:
    """(B,) squared per-example norms summed over every parameter in ``ps``.

    Example::

        >>> per_sample_norms2({"w": torch.ones(2, 3)}, 2)
        tensor([3., 3.])
    """
    total: Tensor | None = None
    for name, grad in ps.items():
        if isinstance(grad, PerSampleRows):
            part = grad.values.new_zeros(batch_size)
            part.index_add_(0, grad.example, sq_norms(grad.values))
        else:
            if grad.shape[0] != batch_size:
                raise InputError(
                    f"per-example gradient {name!r} has {grad.shape[0]} examples; expected {batch_size}"
                )
            part = sq_norms(grad.reshape(batch_size, -1))
        total = part if total is None else total + part
    if total is None:
        return torch.zeros(batch_size)
    return total


def per_sample_clipped_sum(
    ps: Mapping[str, PerSample],
    c: Tensor,
    param_shapes_or_num_rows: Mapping[str, tuple[int, ...] | torch.Size | int] | None = None,
) -> dict[str, ClippedSum]:
    """sum_i c[i] * grad_i per parameter; ``param_shapes_or_num_rows`` (optional) is checked.

    Example::

        >>> per_sample_clipped_sum({"w": torch.ones(2, 3)}, torch.tensor([1.0, 0.5]))["w"]
        tensor([1.5000, 1.5000, 1.5000])
    """
    out: dict[str, ClippedSum] = {}
    for name, grad in ps.items():
        expected = None if param_shapes_or_num_rows is None else param_shapes_or_num_rows.get(name)
        if isinstance(grad, PerSampleRows):
            if expected is not None and expected != grad.num_rows:
                raise InputError(f"{name!r} has {grad.num_rows} rows; expected {expected}")
            cw = c.to(grad.values.dtype)[grad.example]
            out[name] = SparseRows(grad.indices, grad.values * cw[:, None], grad.num_rows)
        else:
            batch = grad.shape[0]
            if expected is not None and tuple(grad.shape[1:]) != tuple(expected):  # type: ignore[arg-type]
                raise InputError(
                    f"{name!r} per-example gradient has shape {tuple(grad.shape[1:])}; expected {tuple(expected)}"  # type: ignore[arg-type]
                )
            cw = clip_factors(c, batch, grad)
            out[name] = (cw @ grad.reshape(batch, -1)).reshape(grad.shape[1:])
    return out


class MaterialisedClipper(LayerClipper):
    """A clipper whose norms and clipped sums come from its own (cheap) ``per_sample``."""

    def norms2(self, module: nn.Module, calls: list[Call]) -> Tensor:
        norms = per_sample_norms2(self.per_sample(module, calls), batch_size(calls))
        return norms.to(calls[0].grad_output.device)

    def clipped_sum(self, module: nn.Module, calls: list[Call], c: Tensor) -> dict[str, ClippedSum]:
        return per_sample_clipped_sum(self.per_sample(module, calls), c)
