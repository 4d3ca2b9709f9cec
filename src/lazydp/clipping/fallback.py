"""Any other parameterised leaf layer: exact per-example gradients through torch.func.

Contract: for each call, example i's gradient is grad_params <f(params, x_i), g_i>, where f is the
layer's *class* forward run on that example alone (batch of one) with the captured arguments;
calls add up. ``per_sample`` materialises (B, *param.shape) with vmap(grad); ``norms2`` derives from
it; ``clipped_sum`` takes one gradient of sum_i c_i <f(x_i), g_i> through the vmapped forward, so
it holds no per-example tensor and still treats every example in isolation (a layer that secretly
mixes examples cannot leak through the sum more than its per-example norm says).

Tensor arguments whose dimension 0 equals B are treated as per-example; every other argument is
shared. That guess is checked: the examples run one by one must give the layer's batched output,
or the layer is refused (a shared tensor that happens to have B rows, or a layer that mixes
examples, would otherwise be trained on a function it does not compute). The forward is called through the class (``type(module).forward``) so hooks or a forward
the engine installed on the instance are not re-entered; the layer's buffers are cloned so a
forward that updates them cannot change the real ones. A layer that fails under vmap (data-dependent
control flow, in-place buffer updates, randomness) raises UnsupportedLayerError naming the layer and
the original error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lazydp.clipping._base import Call, ClippedSum, PerSample, trainable_direct_params
from lazydp.clipping.materialised import MaterialisedClipper
from lazydp.clipping.registry import batch_size, clip_factors, register_fallback
from lazydp.errors import UnsupportedLayerError


class _ClassForward(nn.Module):
    """Calls the wrapped layer's class forward directly (no hooks, no instance-level override)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.inner).forward(self.inner, *args, **kwargs)


def _state(module: nn.Module, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """The wrapper's parameters and buffers; buffers cloned so a forward cannot change them."""
    buffers = {f"inner.{n}": b.detach().clone() for n, b in module.named_buffers(recurse=False)}
    return {f"inner.{n}": p for n, p in params.items()} | buffers


def _with_zero_state(module: nn.Module, call: Call) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's arguments, with the zero state a GRUCell/RNNCell makes for ``hx=None`` given
    explicitly: made inside the vmapped single-example call it had the whole batch's size."""
    args, kwargs = list(call.args), dict(call.kwargs)
    if not isinstance(module, nn.GRUCell | nn.RNNCell):
        return call.args, call.kwargs
    x = args[0] if args else kwargs.get("input")
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    if hx is None and isinstance(x, Tensor) and x.dim() == 2:
        zeros = x.new_zeros(x.shape[0], module.hidden_size)
        if len(args) > 1:
            args[1] = zeros
        elif "hx" in kwargs:
            kwargs["hx"] = zeros
        else:
            args.append(zeros)
    return tuple(args), kwargs


def _single_example_fn(
    module: nn.Module, call: Call, batch: int
) -> tuple[Callable[..., Tensor], list[Tensor]]:
    """f(params, *per_example_args) -> output of one example (leading batch dim of 1 kept), and
    the batched tensors to vmap over."""
    wrapper = _ClassForward(module)
    call_args, call_kwargs = _with_zero_state(module, call)
    items = [("arg", i, v) for i, v in enumerate(call_args)] + [
        ("kw", k, v) for k, v in call_kwargs.items()
    ]
    batched = [isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch for _, _, v in items]
    batched_values = [v.detach() for (_, _, v), b in zip(items, batched) if b]

    def f(params: dict[str, Tensor], *per_example: Tensor) -> Tensor:
        it = iter(per_example)
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for (kind, key, value), is_batched in zip(items, batched):
            value = next(it).unsqueeze(0) if is_batched else value
            if kind == "arg":
                args.append(value)
            else:
                kwargs[str(key)] = value
        return functional_call(wrapper, _state(module, params), tuple(args), kwargs)

    return f, batched_values


@torch.no_grad()
def _check_isolated(module: nn.Module, call: Call, params: dict[str, Tensor], batch: int) -> None:
    """UnsupportedLayerError unless the examples run alone reproduce the batched forward (once
    per call: norms and clipped sum share it)."""
    if call.memo.get("isolated_checked"):
        return
    f, batched = _single_example_fn(module, call, batch)
    alone = vmap(lambda *x_i: f(params, *x_i).squeeze(0), randomness="error")(*batched)
    together = functional_call(
        _ClassForward(module), _state(module, params), tuple(call.args), dict(call.kwargs)
    )
    if not _rows_agree(alone, together):
        raise UnsupportedLayerError(
            f"{type(module).__name__}'s output for one example depends on the other examples' "
            "inputs (it mixes examples), or an argument whose dimension 0 happens to equal the "
            f"batch size ({batch}) is shared by all examples, not one row per example. Per-"
            "example clipping needs each output row to depend on its own example only: pass "
            "shared tensors as buffers or attributes of the layer, or register a clipper for it "
            "with lazydp.clipping.register_clipper."
        )
    call.memo["isolated_checked"] = True


def _rows_agree(alone: Tensor, together: Tensor) -> bool:
    """Equal up to rounding, row by row (each row's tolerance from that row alone: a large row
    must not widen another's), with Inf/NaN in the same places."""
    if alone.shape != together.shape:
        return False
    if together.dim() == 0 or together.numel() == 0:
        return bool(torch.allclose(alone, together, equal_nan=True))
    finite = torch.isfinite(together)
    if not torch.equal(finite, torch.isfinite(alone)):
        return False
    odd_a, odd_t = alone[~finite], together[~finite]  # Inf/NaN: the same value in each place
    if not bool(((odd_a == odd_t) | (odd_a.isnan() & odd_t.isnan())).all()):
        return False
    a = torch.where(finite, alone, 0).flatten(1).double()
    t = torch.where(finite, together, 0).flatten(1).double()
    scale = torch.maximum(a.abs().amax(1), t.abs().amax(1))  # per row
    return bool(((a - t).abs().amax(1) <= 1e-4 * scale + 1e-12).all())


def _unsupported(module: nn.Module, err: Exception) -> UnsupportedLayerError:
    return UnsupportedLayerError(
        f"{type(module).__name__} has no registered clipper and its per-example gradients could not "
        f"be computed with torch.func.vmap ({type(err).__name__}: {err}); register a clipper for it "
        "with lazydp.clipping.register_clipper, or replace the layer"
    )


def _per_example_grads(
    module: nn.Module, call: Call, params: dict[str, Tensor], batch: int
) -> dict[str, Tensor]:
    """(B, *shape) per parameter: vmap over examples of grad <f(x_i), g_i>."""
    f, batched = _single_example_fn(module, call, batch)

    def inner_product(p: dict[str, Tensor], g_i: Tensor, *x_i: Tensor) -> Tensor:
        return (f(p, *x_i) * g_i.unsqueeze(0)).sum()

    in_dims = (None, 0, *([0] * len(batched)))
    return vmap(grad(inner_product), in_dims=in_dims, randomness="error")(
        params, call.grad_output.detach(), *batched
    )


def _weighted_grads(
    module: nn.Module, call: Call, params: dict[str, Tensor], batch: int, c: Tensor
) -> dict[str, Tensor]:
    """sum_i c_i grad <f(x_i), g_i> as one gradient through the vmapped single-example forward."""
    f, batched = _single_example_fn(module, call, batch)
    g = call.grad_output.detach()
    cg = g * clip_factors(c, batch, g).view(-1, *[1] * (g.dim() - 1))

    def weighted(p: dict[str, Tensor]) -> Tensor:
        out = vmap(lambda *x_i: f(p, *x_i).squeeze(0), randomness="error")(*batched)
        return (out * cg).sum()

    return grad(weighted)(params)


def _summed_over_calls(
    module: nn.Module,
    calls: list[Call],
    per_call: Callable[[Call, dict[str, Tensor], int], dict[str, Tensor]],
) -> dict[str, Tensor]:
    batch = batch_size(calls)
    params = {n: p.detach() for n, p in trainable_direct_params(module).items()}
    total: dict[str, Tensor] = {}
    for call in calls:
        try:
            _check_isolated(module, call, params, batch)
            grads = per_call(call, params, batch)
        except UnsupportedLayerError:
            raise
        except Exception as err:  # torch.func raises many types; all mean "not vmappable"
            raise _unsupported(module, err) from err
        for name, value in grads.items():
            total[name] = value if name not in total else total[name] + value
    return total


@register_fallback
class FallbackClipper(MaterialisedClipper):
    """Exact per-example gradients for any leaf layer via torch.func (vmap over grad)."""

    def per_sample(self, module: nn.Module, calls: list[Call]) -> dict[str, PerSample]:
        return dict(
            _summed_over_calls(
                module, calls, lambda call, p, b: _per_example_grads(module, call, p, b)
            )
        )

    def clipped_sum(self, module: nn.Module, calls: list[Call], c: Tensor) -> dict[str, ClippedSum]:
        return dict(
            _summed_over_calls(
                module, calls, lambda call, p, b: _weighted_grads(module, call, p, b, c)
            )
        )
