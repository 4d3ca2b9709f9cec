"""dpsgd_r's reweighted pass: a second forward and one backward of sum_i c_i * l_i (the paper's
"reweighted" DP-SGD), checked against the per-example clipped sum.

The first forward/backward gave per-example gradients g_i, hence the clip factors c_i. Scaling
the output gradient of example i by c_i and backpropagating again gives sum_i c_i g_i -- when
the second pass computes the same function as the first and the whole loss passes through the
model's output. The method's cost is this second pass, so it runs; but what the step releases is
the per-example sum sum_i c_i g_i built from the first pass, whose sensitivity is C by
construction. The second pass only has to agree with it (else the step is refused, uncharged):

- a random forward (dropout, random augmentation) would draw new masks: the RNG state recorded at
  the first forward is replayed, and the replayed output must equal the first one exactly;
- a loss with a part that does not pass through the model's output (an auxiliary loss on an
  intermediate activation), or a forward that keeps state between calls, gives another sum.

Module buffers the second forward updates (running statistics, counters) are put back as the
first forward left them. Python attributes a forward changes cannot be: it runs twice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lazydp.capture import CaptureSet, replayed_rng
from lazydp.clipping._base import ClippedSum, SparseRows
from lazydp.clipping.registry import clip_factors
from lazydp.errors import ConfigError

_NOTHING_CHARGED = "Nothing was changed or charged."


def check_reweighted(
    cap: CaptureSet, c: Tensor, sums: dict[nn.Parameter, ClippedSum], max_grad_norm: float
) -> None:
    """Run the reweighted second pass; ConfigError unless it reproduces ``sums``."""
    root = cap.root_record
    if root is None or root.grad_output is None or cap.root_rng is None:
        if any(r.grad_output is not None for layer in cap.layers for r in layer.records):
            # Returning here would run dpsgd_b under dpsgd_r's name: no second pass, no check.
            raise ConfigError(
                "mode='dpsgd_r' re-runs model(...) and backpropagates a reweighted gradient of "
                "its output, but this step's gradient did not come through model(...)'s output "
                "(the loss is computed by another method calling the layers, or from an "
                "intermediate tensor). Compute the loss from the tensor model(...) returns, or "
                f"use mode='dpsgd_b' or 'dpsgd_f'. {_NOTHING_CHARGED}"
            )
        return
    g = root.grad_output * _rows(c, root.grad_output)
    params = [q for layer in cap.layers for q in layer.params().values()]
    saved = [q.grad for q in params]
    buffers = [(b, b.detach().clone()) for b in cap.model.buffers()]
    for q in params:
        q.grad = None
    try:
        with torch.enable_grad(), cap.passthrough(), replayed_rng(cap.root_rng):
            out = cap.model(*cap.root_args, **cap.root_kwargs)
            _check_same_output(root.out, out)
            torch.autograd.backward(out, g)
        # Under autocast the second pass computes in bfloat16/float16: compare to its rounding.
        low = [dtype for _, enabled, dtype in cap.root_rng[2] if enabled]
        for q in params:
            if not _agree(q.grad, sums.get(q), q, max_grad_norm, low):
                raise ConfigError(
                    "mode='dpsgd_r': the reweighted second pass did not reproduce the clipped "
                    "per-example sum. The loss must depend on the parameters only through the "
                    "model's returned tensor (no auxiliary loss on an intermediate activation, "
                    "no second output the loss uses), and the forward must compute the same "
                    "function twice. Compute the whole loss from the returned tensor, or use "
                    f"mode='dpsgd_b' or 'dpsgd_f'. {_NOTHING_CHARGED}"
                )
    finally:
        with torch.no_grad():
            for b, old in buffers:
                b.copy_(old)
        # The values the step's buffer check just accepted, in new versions: marked again, or
        # a retry of this step (refused here, or on another rank after this pass) is refused
        # as a step whose buffers changed since the forward.
        cap.mark_buffers()
        for q, old_grad in zip(params, saved):
            q.grad = old_grad


def _rows(c: Tensor, like: Tensor) -> Tensor:
    """c shaped to scale dimension 0 (the examples) of ``like``."""
    return clip_factors(c, like.shape[0], like).view(-1, *([1] * (like.dim() - 1)))


def _same_output(first: Tensor, second: Tensor) -> bool:
    """Equal up to a few units of rounding: torch may round a kernel differently when a weight
    requires grad (F.linear on a transposed input differs by one ulp). A changed function
    (dropout, state, a foreign RNG) differs by far more; ``_agree`` then checks the gradients."""
    if second.shape != first.shape or second.dtype != first.dtype:
        return False
    if not first.is_floating_point():
        return torch.equal(second, first)
    eps = 64 * torch.finfo(first.dtype).eps
    scale = float(first.abs().max()) if first.numel() else 0.0
    return torch.allclose(second, first, rtol=eps, atol=eps * scale, equal_nan=True)


def _check_same_output(first: Tensor | None, second: object) -> None:
    if first is None or not isinstance(second, Tensor) or not _same_output(first, second.detach()):
        raise ConfigError(
            "mode='dpsgd_r' re-runs the forward to reweight the loss, and the second run gave a "
            "different output than the first, even with the RNG replayed (a forward that keeps "
            "state between calls, a random draw outside torch's generator, or a non-"
            "deterministic kernel). The reweighted gradient would not be the clipped one. Use "
            f"mode='dpsgd_b' or 'dpsgd_f', which need one forward. {_NOTHING_CHARGED}"
        )


def _agree(
    grad: Tensor | None,
    clipped: ClippedSum | None,
    q: nn.Parameter,
    c_max: float,
    compute_dtypes: Sequence[torch.dtype] = (),
) -> bool:
    """Whether the second pass's gradient equals the per-example sum up to rounding (of q's
    dtype, or of the autocast ``compute_dtypes`` the forward ran in).

    Privacy does not rest on this tolerance (the per-example sum is what is released); it only
    has to pass every model the method is meant for, in float32 and in bfloat16.
    """
    a, b = _as_tensor(grad, q), _as_tensor(clipped, q)
    if a is not None and b is not None and a.is_sparse != b.is_sparse:
        a, b = a.to_dense(), b.to_dense()  # one side is dense already: that memory is there
    diff = _norm(a - b if a is not None and b is not None else a if a is not None else b)
    size = _norm(a) + _norm(b)
    dtypes = [q.dtype, *compute_dtypes] if q.is_floating_point() else list(compute_dtypes)
    rtol = max([1e-2] + [20 * torch.finfo(d).eps for d in dtypes])
    return math.isfinite(diff) and diff <= rtol * size + 1e-3 * c_max


def _as_tensor(s: Tensor | ClippedSum | None, q: nn.Parameter) -> Tensor | None:
    """A dense tensor, or a sparse COO one for row-sparse sums (never densified: tables)."""
    if s is None:
        return None
    if isinstance(s, SparseRows):
        return torch.sparse_coo_tensor(
            s.indices.unsqueeze(0), s.values, tuple(q.shape), check_invariants=False
        )
    return s


def _norm(x: Tensor | None) -> float:
    if x is None:
        return 0.0
    if x.is_sparse:
        x = x.coalesce().values()
    return float(x.double().norm())
