"""dpsgd_r's clipped sums: a second forward and one backward of sum_i c_i * l_i (the paper's
"reweighted" DP-SGD).

The first forward/backward gave the per-example norms, hence the clip factors c_i. Scaling the
output gradient of example i by c_i and backpropagating again gives sum_i c_i g_i -- but only if
the second pass computes the same function as the first. Two ways it may not, both checked here
before the step is charged (a mismatch would release a gradient that was never clipped):

- a random forward (dropout, random augmentation) would draw new masks: the RNG state recorded at
  the first forward is replayed, and the replayed output must equal the first one exactly;
- a loss with a part that does not pass through the model's output (an auxiliary loss on an
  intermediate activation) is dropped by the second backward, and the rest alone may be larger
  than C: every layer's output gradient in the second pass must be c_i times the first pass's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lazydp.capture import CaptureSet, replayed_rng
from lazydp.clipping._base import ClippedSum, SparseRows
from lazydp.errors import ConfigError

_NOTHING_CHARGED = "Nothing was changed or charged."


def reweighted_clipped_sums(cap: CaptureSet, c: Tensor) -> dict[nn.Parameter, ClippedSum]:
    """sum_i c_i g_i for every captured parameter, from a replayed forward and one backward."""
    root = cap.root_record
    if root is None or root.grad_output is None or cap.root_rng is None:
        return {}
    g = root.grad_output * _rows(c, root.grad_output)
    params = [q for layer in cap.layers for q in layer.params().values()]
    saved = [q.grad for q in params]
    for q in params:
        q.grad = None
    try:
        with torch.enable_grad(), cap.passthrough(), replayed_rng(cap.root_rng):
            cap.replayed = []
            out = cap.model(*cap.root_args, **cap.root_kwargs)
            _check_same_output(root.out, out)
            torch.autograd.backward(out, g)
            _check_reweighted(cap, c)
        sums: dict[nn.Parameter, ClippedSum] = {}
        for q in params:
            if q.grad is not None:
                grad = q.grad
                if grad.is_sparse:
                    grad = grad.coalesce()
                    sums[q] = SparseRows(grad.indices()[0], grad.values(), q.shape[0], True)
                else:
                    sums[q] = grad
        return sums
    finally:
        for q, old in zip(params, saved):
            q.grad = old


def _rows(c: Tensor, like: Tensor) -> Tensor:
    """c shaped to scale dimension 0 (the examples) of ``like``."""
    return c.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))


def _check_same_output(first: Tensor | None, second: object) -> None:
    if (
        first is None
        or not isinstance(second, Tensor)
        or second.shape != first.shape
        or not torch.equal(second.detach(), first)
    ):
        raise ConfigError(
            "mode='dpsgd_r' re-runs the forward to reweight the loss, and the second run gave a "
            "different output than the first, even with the RNG replayed (a forward that keeps "
            "state between calls, a random draw outside torch's generator, or a non-"
            "deterministic kernel). The reweighted gradient would not be the clipped one. Use "
            f"mode='dpsgd_b' or 'dpsgd_f', which need one forward. {_NOTHING_CHARGED}"
        )


def _check_reweighted(cap: CaptureSet, c: Tensor) -> None:
    replayed = cap.replayed or []
    for layer in cap.layers:
        firsts = [r.grad_output for r in layer.records]
        seconds = [rec.grad_output for lay, rec in replayed if lay is layer]
        ok = len(firsts) == len(seconds)
        for first, got in zip(firsts, seconds):
            if first is None or got is None:  # a call that did not reach the loss
                ok = (
                    ok
                    and (first is None or not bool(first.any()))
                    and (got is None or not bool(got.any()))
                )
                continue
            want = first * _rows(c, first)
            # Rounding differs (c scales the root, not the layer); an auxiliary loss does not
            # shrink with c, so it shows far above this tolerance.
            atol = 1e-4 * float(want.abs().max()) + 1e-12
            ok = ok and got.shape == want.shape and torch.allclose(got, want, rtol=1e-3, atol=atol)
        if not ok:
            raise ConfigError(
                f"mode='dpsgd_r' backpropagates the reweighted gradient of the model's output "
                f"only, but layer {layer.name!r} also got gradient another way (a loss term on "
                "an intermediate activation, or a second output the loss uses). That part would "
                "be dropped and the rest may exceed the clipping bound. Compute the whole loss "
                "from the model's returned tensor, or use mode='dpsgd_b' or 'dpsgd_f'. "
                f"{_NOTHING_CHARGED}"
            )
