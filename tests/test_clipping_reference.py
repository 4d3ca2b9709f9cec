"""The slow, obviously-correct reference every clipper is checked against (plus its own tests).

capture(): runs a layer on a batch the way the engine would see it; the per-example loss is
loss_i = sum over calls <out_i, r_i> with random r, so grad_output is r itself.
reference_grads(): batch-of-ONE autograd: each example forwarded alone, its loss backpropagated,
the parameter gradients read back. check_clipper(): every clipper method against that reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lazydp.clipping import (
    Call,
    PerSampleRows,
    SparseRows,
    clipper_for,
    per_sample_clipped_sum,
    per_sample_norms2,
    trainable_direct_params,
)

Inputs = tuple[tuple[Any, ...], dict[str, Any]]
# (args, kwargs, example index) -> the inputs of that example alone (a batch of one).
Slicer = Callable[[tuple[Any, ...], dict[str, Any], int], Inputs]


def slice_batch(args: tuple[Any, ...], kwargs: dict[str, Any], i: int) -> Inputs:
    """Default slicer: every tensor argument is batched along dimension 0."""

    def one(v: Any) -> Any:
        return v[i : i + 1] if isinstance(v, Tensor) and v.dim() > 0 else v

    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


def capture(module: nn.Module, inputs: list[Inputs], seed: int) -> list[Call]:
    """One Call per forward, grad_output = r (random, float64) for loss_i = <out_i, r_i>."""
    gen = torch.Generator().manual_seed(seed)
    calls = []
    with torch.no_grad():
        for args, kwargs in inputs:
            out = module(*args, **kwargs)
            r = torch.randn(out.shape, generator=gen, dtype=out.dtype)
            calls.append(Call(args, kwargs, r))
    return calls


def reference_grads(
    module: nn.Module, calls: list[Call], slicer: Slicer = slice_batch
) -> dict[str, Tensor]:
    """(B, *shape) per-example gradient of every trainable direct parameter, one example at a time."""
    params = trainable_direct_params(module)
    batch = calls[0].grad_output.shape[0]
    per_example: dict[str, list[Tensor]] = {n: [] for n in params}
    for i in range(batch):
        loss = torch.zeros((), dtype=torch.float64)
        for call in calls:
            args, kwargs = slicer(call.args, call.kwargs, i)
            out = module(*args, **kwargs)
            loss = loss + (out * call.grad_output[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, p), g in zip(params.items(), grads):
            per_example[name].append(torch.zeros_like(p) if g is None else g.to_dense())
    return {n: torch.stack(v) for n, v in per_example.items()}


def dense(x: Tensor | SparseRows | PerSampleRows, shape: tuple[int, ...]) -> Tensor:
    """A clipped sum or per-example gradient as a dense tensor of ``shape``."""
    if isinstance(x, SparseRows):
        return x.to_dense()
    if isinstance(x, PerSampleRows):
        pairs = x.example * x.num_rows + x.indices
        assert pairs.unique().numel() == pairs.numel(), (
            "PerSampleRows must be coalesced per (example, row)"
        )
        out = x.values.new_zeros(shape)
        out.index_put_((x.example, x.indices), x.values, accumulate=True)
        return out
    return x


def check_clipper(
    module: nn.Module, calls: list[Call], slicer: Slicer = slice_batch, seed: int = 0
) -> dict[str, Tensor]:
    """Assert norms2, clipped_sum, per_sample and the materialised helpers all match the reference."""
    ref = reference_grads(module, calls, slicer)
    batch = calls[0].grad_output.shape[0]
    clipper = clipper_for(module)
    ref_norms2 = sum((g.reshape(batch, -1) ** 2).sum(1) for g in ref.values())
    c = torch.rand(batch, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    ref_sum = {n: torch.einsum("b,b...->...", c, g) for n, g in ref.items()}

    torch.testing.assert_close(clipper.norms2(module, calls), ref_norms2, rtol=1e-6, atol=1e-9)
    rows = clipper.norm_rows(module, calls)  # the step's shared-reduction form, where offered
    if rows is not None:
        assert rows.shape[0] == batch
        torch.testing.assert_close((rows**2).sum(1), ref_norms2, rtol=1e-6, atol=1e-9)
    sums = clipper.clipped_sum(module, calls, c)
    assert set(sums) == set(ref)
    for name, value in sums.items():
        torch.testing.assert_close(
            dense(value, tuple(ref_sum[name].shape)), ref_sum[name], rtol=1e-6, atol=1e-9
        )

    ps = clipper.per_sample(module, calls)
    assert set(ps) == set(ref)
    for name, value in ps.items():
        torch.testing.assert_close(
            dense(value, tuple(ref[name].shape)), ref[name], rtol=1e-6, atol=1e-9
        )
    torch.testing.assert_close(per_sample_norms2(ps, batch), ref_norms2, rtol=1e-6, atol=1e-9)
    shapes = {
        n: (p.shape[0] if isinstance(ps[n], PerSampleRows) else tuple(p.shape))
        for n, p in trainable_direct_params(module).items()
    }
    for name, value in per_sample_clipped_sum(ps, c, shapes).items():
        torch.testing.assert_close(
            dense(value, tuple(ref_sum[name].shape)), ref_sum[name], rtol=1e-6, atol=1e-9
        )
    return ref


def test_reference_matches_the_linear_formula() -> None:
    """The reference itself: per-example dW of Linear on 2-D input is the outer product g_i a_i^T."""
    layer = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    calls = capture(layer, [((x,), {})], seed=3)
    ref = reference_grads(layer, calls)
    g = calls[0].grad_output
    torch.testing.assert_close(ref["weight"], g[:, :, None] * x[:, None, :])
    torch.testing.assert_close(ref["bias"], g)


def test_dense_rejects_uncoalesced_per_sample_rows() -> None:
    rows = PerSampleRows(
        torch.tensor([0, 0]), torch.tensor([1, 1]), torch.ones(2, 2), num_rows=3, batch_size=1
    )
    try:
        dense(rows, (1, 3, 2))
    except AssertionError:
        return
    raise AssertionError("dense() accepted duplicated (example, row) pairs")
