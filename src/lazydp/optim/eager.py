"""Eager DP-SGD noise: every parameter element, every step (the ``dpsgd_*`` modes and dense params).

Tables on plain SGD are updated in one streaming pass each, straight into the weight: noise is
added in place by the chunked multi-threaded generator, then the clipped rows are merged. No
table-sized gradient is ever allocated, so peak memory stays at the parameters (a strong baseline:
this is what LazyDP has to beat).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lazydp._timing import PhaseTimer
from lazydp.clipping._base import ClippedSum, SparseRows
from lazydp.noise import GaussianNoise
from lazydp.optim.rows import add_rows_


@torch.no_grad()
def noisy_dense_grads(
    clipped: list[tuple[ClippedSum | None, Tensor]],
    noise: GaussianNoise,
    noise_std: float,
    expected_batch_size: float,
    timer: PhaseTimer,
) -> list[Tensor]:
    """(sum_i c_i g_i + N(0, noise_std^2)) / B_expected as a dense gradient for each
    (clipped sum, parameter) pair; all the noise in one generator call (all threads)."""
    grads = []
    with timer.phase("coalesce"):
        for s, like in clipped:
            if s is None:
                grads.append(torch.zeros_like(like))
            elif isinstance(s, SparseRows):
                grads.append(s.to_dense())
            else:
                grads.append(s.detach().clone())
    with timer.phase("noise"):
        if noise_std > 0:
            noise.add_normal_each_(grads, noise_std)
    return [g.div_(expected_batch_size) for g in grads]


@torch.no_grad()
def eager_table_sgd(
    weight: Tensor,
    clipped: ClippedSum | None,
    lr: float,
    noise: GaussianNoise,
    noise_std: float,
    expected_batch_size: float,
    padding_idx: int | None,
    timer: PhaseTimer,
) -> None:
    """W <- W - lr/B * sum_i c_i g_i + lr*noise_std/B * z, streamed over the table once.

    z is symmetric, so adding it equals subtracting it in distribution; LazyDP's catch-up adds with
    the same sign, which keeps the constant-noise equivalence test exact.
    """
    if noise_std > 0:
        with timer.phase("noise"):
            saved = weight[padding_idx].clone() if padding_idx is not None else None
            noise.add_normal_(weight, lr * noise_std / expected_batch_size)
            if saved is not None:  # the padding row's gradient is identically zero: no noise
                weight[padding_idx] = saved
    if clipped is None:
        return
    with timer.phase("param_update"):
        if isinstance(clipped, SparseRows):
            add_rows_(weight, clipped.indices, clipped.values, -lr / expected_batch_size)
        else:
            weight.add_(clipped, alpha=-lr / expected_batch_size)
