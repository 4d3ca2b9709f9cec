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
from lazydp.optim.rows import add_rows_, sorts_rows


@torch.no_grad()
def noisy_dense_grads(
    clipped: list[tuple[ClippedSum | None, Tensor]],
    noise: GaussianNoise,
    noise_std: float,
    expected_batch_size: float,
    timer: PhaseTimer,
) -> list[Tensor]:
    """(sum_i c_i g_i + N(0, noise_std^2)) / B_expected as a dense gradient for each
    (clipped sum, parameter) pair.

    The gradients are views into one flat buffer per (dtype, device): the buffer's noise is one
    generator call (its chunks spread over all threads) and the sums are merged with two
    multi-tensor ops. Cloning each sum, adding noise through a packed buffer and dividing tensor by
    tensor took 3x as long for the 12 tensors of rmc1's 80k-parameter MLPs (1.2-1.7 against
    0.4-0.5 ms here). A row-sparse sum is added into its view by row: no second table-sized
    tensor.
    """
    grads: list[Tensor | None] = [None] * len(clipped)
    kinds: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, (_, like) in enumerate(clipped):
        kinds.setdefault((like.dtype, like.device), []).append(i)
    for (dtype, device), index in kinds.items():
        likes = [clipped[i][1] for i in index]
        flat = torch.empty(sum(q.numel() for q in likes), dtype=dtype, device=device)
        with timer.phase("noise"):
            if noise_std > 0:
                noise.normal_(flat, noise_std)
            else:
                flat.zero_()
        views = [v.view_as(q) for v, q in zip(flat.split([q.numel() for q in likes]), likes)]
        with timer.phase("merge"):
            dense: list[tuple[Tensor, Tensor]] = []
            for view, i in zip(views, index):
                s = clipped[i][0]
                if isinstance(s, SparseRows):
                    view.index_add_(0, s.indices, s.values.to(dtype))
                elif s is not None:
                    dense.append((view, s.detach().to(dtype)))
            if dense:
                torch._foreach_add_([v for v, _ in dense], [s for _, s in dense])
            torch._foreach_div_(views, expected_batch_size)
        for i, view in zip(index, views):
            grads[i] = view
    out = [g for g in grads if g is not None]
    assert len(out) == len(clipped)  # every pair got its view
    return out


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
    weight_decay: float = 0.0,
) -> None:
    """W <- (1 - lr*wd) W - lr/B * sum_i c_i g_i + lr*noise_std/B * z, streamed over the table.

    That is torch's SGD step ``W - lr (g + wd W)`` on the noisy gradient g. z is symmetric, so
    adding it equals subtracting it in distribution; LazyDP's catch-up adds with the same sign,
    which keeps the constant-noise equivalence test exact. The padding row keeps its value: its
    gradient is identically zero, so it owes no noise, and LazyDP never catches it up (so it
    does not decay there either; nn.Embedding's pad is zero, which decay leaves as it is).
    """
    saved = None
    if padding_idx is not None and (noise_std > 0 or weight_decay):
        saved = weight[padding_idx].clone()
    if weight_decay:
        with timer.phase("param_update"):
            weight.mul_(1.0 - lr * weight_decay)
    if noise_std > 0:
        with timer.phase("noise"):
            noise.add_normal_(weight, lr * noise_std / expected_batch_size)
    if saved is not None:
        weight[padding_idx] = saved
    if clipped is None:
        return
    if isinstance(clipped, SparseRows) and sorts_rows(weight):
        with timer.phase("coalesce"):  # duplicated rows summed (the paper's own row)
            clipped = clipped.coalesce()
    with timer.phase("param_update"):
        if isinstance(clipped, SparseRows):
            add_rows_(
                weight,
                clipped.indices,
                clipped.values,
                -lr / expected_batch_size,
                clipped.coalesced,
            )
        else:
            weight.add_(clipped, alpha=-lr / expected_batch_size)
