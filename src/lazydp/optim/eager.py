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
from lazydp.noise import CHUNK_NUMEL, GaussianNoise, active_override
from lazydp.noise_pool import NoisePool
from lazydp.optim.rows import add_rows_


@torch.no_grad()
def noisy_dense_grads(
    clipped: list[tuple[ClippedSum | None, Tensor]],
    noise: GaussianNoise,
    noise_std: float,
    expected_batch_size: float,
    timer: PhaseTimer,
    pool: NoisePool | None = None,
) -> list[Tensor]:
    """(sum_i c_i g_i + N(0, noise_std^2)) / B_expected as a dense gradient for each
    (clipped sum, parameter) pair.

    The gradients are views into one flat buffer per (dtype, device): the buffer's noise is one
    generator call, drawn as an even number of equal pieces (a fixed rule, so seeded draws do
    not depend on the thread count) that the threads share, and the sums are merged with two
    multi-tensor ops instead of a clone, an add and a divide per tensor. A row-sparse sum is
    added into its view by row: no second table-sized tensor.

    ``pool`` (its own stream): a float32 CPU buffer it serves takes its noise from there, drawn
    ahead many steps at a time. A generator call costs a fixed set-up and runs on one thread
    below a chunk: rmc1's 80k MLP values took 0.52 ms a step as one call inside a step (0.2 ms
    alone in a loop), against a 4M-value refill every ~50 steps on both threads.
    """
    grads: dict[int, Tensor] = {}
    kinds: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, (_, like) in enumerate(clipped):
        kinds.setdefault((like.dtype, like.device), []).append(i)
    for (dtype, device), index in kinds.items():
        likes = [clipped[i][1] for i in index]
        flat = torch.empty(sum(q.numel() for q in likes), dtype=dtype, device=device)
        with timer.phase("noise"):
            if noise_std <= 0:
                flat.zero_()
            elif pool is not None and _pool_serves(pool, flat):
                torch.mul(pool.standard(flat.numel()), noise_std, out=flat)
            else:
                noise.normal_each_(_balanced_pieces(flat), noise_std)
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
    return [grads[i] for i in range(len(clipped))]


def _pool_serves(pool: NoisePool, flat: Tensor) -> bool:
    """Whether ``flat``'s noise comes from ``pool``: float32 on the CPU, at most half a refill,
    and no test override (which the stream's own draws apply)."""
    return (
        flat.dtype == torch.float32
        and flat.device.type == "cpu"
        and pool.serves(flat.numel())
        and active_override() is None
    )


def _balanced_pieces(flat: Tensor) -> list[Tensor]:
    """``flat`` in an even number of equal pieces, each at most one generator chunk (a single
    piece below a quarter chunk, where splitting costs more than it saves): two cores then get
    equal shares (basic's 762k MLP parameters as one buffer were 512k + 250k)."""
    n = flat.numel()
    if n <= CHUNK_NUMEL // 4:
        return [flat]
    k = -(-n // CHUNK_NUMEL)
    return list(flat.tensor_split(k + k % 2))


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
    momentum: float = 0.0,
    nesterov: bool = False,
    velocity: Tensor | None = None,
) -> None:
    """torch's SGD step on the noisy gradient g = (sum_i c_i g_i + noise_std z) / B, streamed
    over the table in place: no table-sized gradient is ever allocated.

    Without momentum: ``W <- (1 - lr wd) W - lr g``. With momentum mu (``velocity``: torch's
    momentum buffer of this table, updated in place; dampening 0): ``v <- mu v + wd W + g``,
    then ``W <- W - lr v``, or with Nesterov ``W <- W - lr (wd W + g + mu v)``, streamed as
    ``W' = W + lr mu v_old``, ``v <- mu (1 - lr wd) v_old + wd W' + g``, ``W <- W' - lr (1+mu) v``
    (the same numbers, without a second table-sized buffer).

    z is symmetric, so adding it equals subtracting it in distribution; LazyDP's catch-up adds
    with the same sign, which keeps the constant-noise equivalence test exact. The padding row
    keeps its value: its gradient is identically zero, so it owes no noise, and LazyDP never
    catches it up (so it does not decay there either; nn.Embedding's pad is zero, which decay
    leaves as it is).
    """
    saved = saved_v = None
    if padding_idx is not None and (noise_std > 0 or weight_decay or momentum):
        saved = weight[padding_idx].clone()
        if momentum:  # its velocity too: noise there would be a state LazyDP never has
            assert velocity is not None
            saved_v = velocity[padding_idx].clone()
    b = expected_batch_size
    if momentum:
        assert velocity is not None
        with timer.phase("param_update"):
            if nesterov:
                weight.add_(velocity, alpha=lr * momentum)
                velocity.mul_(momentum * (1.0 - lr * weight_decay))
            else:
                velocity.mul_(momentum)
            if weight_decay:
                velocity.add_(weight, alpha=weight_decay)
        _noise_and_rows(velocity, clipped, noise, noise_std / b, 1.0 / b, timer)
        with timer.phase("param_update"):
            weight.add_(velocity, alpha=-lr * (1.0 + momentum) if nesterov else -lr)
    else:
        if weight_decay:
            with timer.phase("param_update"):
                weight.mul_(1.0 - lr * weight_decay)
        _noise_and_rows(weight, clipped, noise, lr * noise_std / b, -lr / b, timer)
    if saved is not None:
        weight[padding_idx] = saved
    if saved_v is not None:
        assert velocity is not None
        velocity[padding_idx] = saved_v


def _noise_and_rows(
    target: Tensor,
    clipped: ClippedSum | None,
    noise: GaussianNoise,
    std: float,
    alpha: float,
    timer: PhaseTimer,
) -> None:
    """``target += std * z + alpha * clipped`` (z ~ N(0, I)), the clipped rows coalesced first."""
    if std > 0:
        with timer.phase("noise"):
            noise.add_normal_(target, std)
    if clipped is None:
        return
    if isinstance(clipped, SparseRows):
        with timer.phase("coalesce"):  # duplicated rows summed (the paper's own row)
            clipped = clipped.coalesce()
    with timer.phase("param_update"):
        if isinstance(clipped, SparseRows):
            add_rows_(target, clipped.indices, clipped.values, alpha, clipped.coalesced)
        else:
            target.add_(clipped, alpha=alpha)
