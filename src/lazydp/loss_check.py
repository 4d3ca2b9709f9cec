"""Is the loss a sum (or mean) of per-example terms? A check to run once, before make_private.

Why: DP-SGD bounds each example's influence by clipping its gradient, which exists only when
the loss is a sum of per-example losses. A loss that couples the examples of a batch -- in-batch
negatives (the two-tower retrieval loss ``cross_entropy(q_user @ q_item.T, arange(B))``), a
contrastive loss, a weighted mean normalised by the batch's total weight -- gives each example a
"gradient" that carries every other example's terms, and the guarantee fails silently (an audit
measured one example moving the update by 1.7x the clip bound). The coupling happens in the loss,
which the engine never sees, so it cannot refuse it; this check can, given the loss.

Contract: ``check_per_example_loss(model, loss_fn, examples, collate_fn)`` computes the
parameters' gradient of ``loss_fn(model, collate_fn(examples))`` and of each single example's
``loss_fn(model, collate_fn([example]))``, with the model in eval mode (dropout off: both must
see the same function) and its mode restored after. It returns ``"sum"`` or ``"mean"`` -- the
reduction under which the batch's gradient equals the sum (or mean) of the single examples'
gradients to ``rtol`` relative to the examples' own gradient norms -- and raises PrivacyError
when neither holds. ConfigError, not a verdict, when there is nothing to compare: the batch
gives another gradient a second time (random negatives, a random op eval() keeps), a gradient
is NaN or inf, or every gradient is zero. Nothing is updated: the parameters' ``.grad`` are
left as they were. Run it on the plain model, before make_private (the engine records every
training forward), with varied examples: coupling that vanishes at the examples given (a
batch-normalised weighting with equal weights) passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import default_collate

from lazydp.errors import ConfigError, PrivacyError

__all__ = ["check_per_example_loss"]


def _flat_grad(loss: Any, params: list[nn.Parameter]) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ConfigError(
            f"loss_fn must return a scalar tensor; got {getattr(loss, 'shape', type(loss))}."
        )
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [
            # nn.Embedding(sparse=True) gives a sparse gradient, which has no reshape.
            (torch.zeros_like(p) if g is None else g.to_dense() if g.is_sparse else g)
            .detach()
            .reshape(-1)
            .double()
            for p, g in zip(params, grads)
        ]
    )


def check_per_example_loss(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    examples: Sequence[Any],
    collate_fn: Callable[[list[Any]], Any] = default_collate,
    rtol: float = 1e-4,
) -> str:
    """``"sum"`` or ``"mean"``: how ``loss_fn`` reduces per-example terms; PrivacyError when the
    batch's gradient is neither the sum nor the mean of the single examples' gradients.

    >>> model = nn.Linear(3, 1)
    >>> data = [(torch.randn(3), torch.randn(1)) for _ in range(4)]
    >>> def mse(m, batch):
    ...     x, y = batch
    ...     return nn.functional.mse_loss(m(x), y)
    >>> check_per_example_loss(model, mse, data)
    'mean'
    """
    examples = list(examples)
    if len(examples) < 2:
        raise ConfigError(f"give at least 2 examples to compare; got {len(examples)}.")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no parameter that requires grad: nothing to check.")
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            batch = _flat_grad(loss_fn(model, collate_fn(examples)), params)
            # Random negatives drawn in the collate_fn (which the refusal below recommended) or
            # a random op that eval() does not turn off make the batch and the single examples
            # see different functions: refused as coupling. A second batch pass tells.
            again = _flat_grad(loss_fn(model, collate_fn(examples)), params)
            singles = [_flat_grad(loss_fn(model, collate_fn([e])), params) for e in examples]
    finally:
        model.train(was_training)
    total = torch.stack(singles).sum(0)
    if not torch.allclose(batch, again, rtol=rtol, atol=1e-12, equal_nan=True):
        raise ConfigError(
            "loss_fn(model, collate_fn(examples)) gives another gradient each time (random "
            "negatives drawn in the collate_fn or the loss, a random op that model.eval() "
            "does not turn off): the check cannot compare it. Fix the randomness for the check, "
            "e.g. draw each example's negatives once, into the examples."
        )
    # A NaN read as "couples the examples" and all-zero gradients passed as "sum": neither
    # compares anything.
    if not (bool(batch.isfinite().all()) and bool(total.isfinite().all())):
        raise ConfigError("the loss's gradient is not finite (NaN or inf): nothing to compare.")
    if not (bool(batch.any()) or bool(total.any())):
        raise ConfigError(
            "every gradient is zero at these examples (a loss that does not depend on the "
            "parameters, or saturated): nothing to compare; give examples with a gradient."
        )
    # Relative to the examples' own gradients, not to their sum: float32 rounding is a fraction
    # of each term, and near a minimum (a model fitted to these examples) the terms cancel, so
    # a legit loss differed from its sum by ~1 relative to the sum's norm.
    size = sum(float(g.norm()) for g in singles)
    n = len(examples)
    errors = {
        "sum": float((batch - total).norm()) / max(size, float(batch.norm()), 1e-30),
        "mean": float((batch - total / n).norm()) / max(size / n, float(batch.norm()), 1e-30),
    }
    reduction = min(errors, key=errors.__getitem__)
    if errors[reduction] <= rtol:
        return reduction
    raise PrivacyError(
        f"the loss couples the examples of a batch: its gradient on {len(examples)} examples "
        f"differs from the sum of their one-example gradients by {errors['sum']:.3g} (relative) "
        f"and from their mean by {errors['mean']:.3g}. DP-SGD clips per-example gradients, "
        "which exist only for a sum (or mean) of per-example losses: with in-batch negatives (a "
        "softmax over q_user @ q_item.T), a contrastive loss or a batch-normalised weighting, "
        "each example's gradient carries the others' terms and the privacy guarantee does not "
        "hold. Score each example against negatives of its own (drawn per example), or "
        "normalise weights by a constant, not by the batch."
    )
