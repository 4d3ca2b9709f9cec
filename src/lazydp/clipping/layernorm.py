"""nn.LayerNorm (elementwise affine, with or without bias): exact per-example gradients.

Contract: input x of shape (B, ..., *normalized_shape) and grad_output g of the same shape. The
normalised input x_hat is recomputed from the captured input with the layer's own ``eps`` (LayerNorm
has no running statistics, so this is exactly the forward's x_hat). Per example, summed over every
non-batch, non-normalised position and over every call:
dgamma_i = sum g * x_hat, dbeta_i = sum g. These are only (B, *normalized_shape), so the norms and the
clipped sum are derived from them for every mode (``MaterialisedClipper``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lazydp.clipping._base import Call, PerSample, widened
from lazydp.clipping.materialised import MaterialisedClipper
from lazydp.clipping.registry import batch_size, call_arg, register_clipper
from lazydp.errors import InputError


@register_clipper(nn.LayerNorm)
class LayerNormClipper(MaterialisedClipper):
    """Per-example gamma/beta gradients for nn.LayerNorm, from the captured input."""

    def per_sample(self, module: nn.Module, calls: list[Call]) -> dict[str, PerSample]:
        assert isinstance(module, nn.LayerNorm)
        batch = batch_size(calls)
        shape = tuple(module.normalized_shape)
        want_weight = module.weight is not None and module.weight.requires_grad
        want_bias = module.bias is not None and module.bias.requires_grad
        d_weight: Tensor | None = None
        d_bias: Tensor | None = None
        for call in calls:
            x = call_arg(call.args, call.kwargs, 0, "input")
            if x.dim() <= len(shape):
                raise InputError(
                    f"LayerNorm input has shape {tuple(x.shape)}; per-example clipping needs a batch "
                    f"dimension in front of normalized_shape {shape}"
                )
            param = module.weight if module.weight is not None else module.bias
            g = widened(call.grad_output.detach().reshape(batch, -1, *shape), param)
            if want_weight:
                x_hat = F.layer_norm(x.detach().to(g.dtype), shape, None, None, module.eps)
                part = (g * x_hat.reshape(batch, -1, *shape)).sum(1)
                d_weight = part if d_weight is None else d_weight + part
            if want_bias:
                part = g.sum(1)
                d_bias = part if d_bias is None else d_bias + part
        out: dict[str, PerSample] = {}
        if d_weight is not None:
            out["weight"] = d_weight
        if d_bias is not None:
            out["bias"] = d_bias
        return out
