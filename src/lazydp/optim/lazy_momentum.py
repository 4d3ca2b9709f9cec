"""LazyDP for SGD with momentum (Nesterov and weight decay included): exact, by the joint
Gaussian of a row and its velocity.

torch's SGD keeps a velocity v per element: ``v' = mu v + g + wd W`` and ``W' = W - lr v'``
(Nesterov: ``W' = W - lr (g + wd W + mu v')``). Both are linear in (W, v, g), so with x = (W, v)
one step is ``x' = A x + b g`` with

    plain:    A = [[1 - lr wd, -lr mu],        [wd, mu]],  b = (-lr, 1)
    Nesterov: A = [[1 - lr (1+mu) wd, -lr mu^2], [wd, mu]],  b = (-lr (1+mu), 1).

(A first step, where torch sets v = d_p, is this step from v = 0, as long as dampening is 0:
dampening is refused.) In DP-SGD every row's g holds a noise n_s ~ N(0, s^2) every step, read
or not. A row not read from step a to t ends at

    x_t = Phi(a,t) x_a + sum_{r=a}^{t-1} Phi(r+1,t) b_r n_r,   Phi(a,t) = A_{t-1} ... A_a,

a 2x2 map of (W, v) plus ONE joint Gaussian per element, of covariance s^2 Sigma(a,t) with
Sigma(a,t) = sum_r Phi(r+1,t) b_r b_r^T Phi(r+1,t)^T, drawn as L (z1, z2) (L Sigma's Cholesky
factor, two standard normals per element). A constant per-step noise c (the test override) adds
c s m(a,t) with m(a,t) = sum_r Phi(r+1,t) b_r.

Unlike LrPrefix's scalar prefix sums, Phi has no stable difference form (its inverse grows like
mu^-t), so Phi, Sigma and m are kept for every start a that a row may still have: each step maps
them all (``Phi(a,t+1) = A_t Phi(a,t)``, no inverse anywhere). That is O(window) per step on a
few floats per start; the window restarts at every full flush (the end of every epoch) and is
capped at MAX_WINDOW steps (a full flush then).

A step's clipped sum G enters before that step's transition (the row's history stays at the
step): the update adds ``A_t^-1 b_t G / B`` to (W, v), which the next catch-up's A_t turns into
``b_t G / B``. A_t is invertible (det = mu, or mu (1 - lr wd) for Nesterov) because mu > 0 here;
tables with momentum 0 use LrPrefix.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lazydp import huge_pages
from lazydp._dispatch import no_grad
from lazydp._timing import PhaseTimer
from lazydp.clipping._base import SparseRows
from lazydp.errors import ConfigError, PrivacyError
from lazydp.noise import GaussianNoise, active_override
from lazydp.noise_pool import NoisePool
from lazydp.optim.lazy import LazyTable, SgdStep, check_table_lr
from lazydp.optim.rows import add_rows_

#: Steps a momentum prefix keeps before it asks for a full flush (a few floats per step).
MAX_WINDOW = 1 << 16


def transition(step: SgdStep) -> tuple[tuple[float, float, float, float], tuple[float, float]]:
    """(A as a11, a12, a21, a22; b) of one SGD-with-momentum step on x = (W, v)."""
    lr, wd, mu = step.lr, step.weight_decay, step.momentum
    if step.nesterov:
        return (1 - lr * (1 + mu) * wd, -lr * mu * mu, wd, mu), (-lr * (1 + mu), 1.0)
    return (1 - lr * wd, -lr * mu, wd, mu), (-lr, 1.0)


def check_momentum(step: SgdStep) -> None:
    """ConfigError unless the step is one this prefix can defer (before anything changes)."""
    check_table_lr(step.lr, step.weight_decay)
    if not (step.momentum > 0 and step.momentum < float("inf")):
        raise ConfigError(
            f"momentum {step.momentum!r} of a LazyDP table that started with momentum: it must "
            "stay finite and > 0 (the velocity of every row is deferred with its noise). Keep "
            "the tables' momentum fixed. No parameter was changed and nothing was charged."
        )


def check_step(
    step: SgdStep, prefix: object, table: str, weight: Tensor | None = None, clip: float = 0.0
) -> None:
    """ConfigError (before anything changes) unless ``step`` is an update ``prefix`` defers
    exactly: its kind (with or without a velocity) is fixed when training starts. With the
    table's ``weight`` and the clip norm, also unless its deferred velocity fits the dtype."""
    if isinstance(prefix, MomentumPrefix):
        check_momentum(step)
        # (No clipping -- the noise-free "equals SGD" check -- leaves nothing to bound.)
        if weight is not None and weight.is_floating_point() and clip < float("inf"):
            _check_velocity_range(step, weight.dtype, clip, table)
    elif step.momentum and prefix is not None:
        raise ConfigError(
            f"momentum was switched on for LazyDP table {table} after make_private; set it "
            "before (its rows' velocity is then kept from the first step). No parameter was "
            "changed and nothing was charged."
        )
    else:
        check_table_lr(step.lr, step.weight_decay)


def _check_velocity_range(step: SgdStep, dtype: torch.dtype, clip: float, table: str) -> None:
    """A step's clipped sum G enters the row's velocity as ``A^-1 b G / B`` (the update_alpha
    of MomentumPrefix): |G| / B <= clip, times 1 / (momentum (1 - lr wd)) from A^-1. Checked
    before the charge, so that a tiny momentum never overflows the table's dtype mid-update."""
    scale = clip / (step.momentum * (1.0 - step.lr * step.weight_decay))
    if not scale < torch.finfo(dtype).max / 16:
        raise ConfigError(
            f"momentum {step.momentum!r} of LazyDP table {table} is too small for its "
            f"{dtype} rows: the deferred velocity holds each step's gradient scaled by "
            f"1 / momentum, up to {scale:.3g}, past what {dtype} can hold. Use momentum=0 "
            "(plain SGD) for the tables, or a momentum of at least 1e-3. No parameter was "
            "changed and nothing was charged."
        )


class MomentumPrefix:
    """Phi(a, t), Sigma(a, t) and m(a, t) of every start a in [base, steps] (t = steps)."""

    def __init__(self) -> None:
        self.steps = 0
        self.base = 0
        self._phi = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)  # a11 a12 a21 a22
        self._sigma = torch.zeros(1, 3, dtype=torch.float64)  # s11 s12 s22
        self._mean = torch.zeros(1, 2, dtype=torch.float64)
        self._coef: Tensor | None = None  # pending()'s table for the current step

    def append_step(self, step: SgdStep) -> None:
        check_momentum(step)
        (a11, a12, a21, a22), (b1, b2) = transition(step)
        p11, p12, p21, p22 = self._phi.unbind(1)
        phi = torch.stack(
            [a11 * p11 + a12 * p21, a11 * p12 + a12 * p22, a21 * p11 + a22 * p21,
             a21 * p12 + a22 * p22], 1,
        )  # fmt: skip
        s11, s12, s22 = self._sigma.unbind(1)
        t11, t12 = a11 * s11 + a12 * s12, a11 * s12 + a12 * s22  # first row of A Sigma
        t21, t22 = a21 * s11 + a22 * s12, a21 * s12 + a22 * s22
        sigma = torch.stack(
            [t11 * a11 + t12 * a12 + b1 * b1, t11 * a21 + t12 * a22 + b1 * b2,
             t21 * a21 + t22 * a22 + b2 * b2], 1,
        )  # fmt: skip
        m1, m2 = self._mean.unbind(1)
        mean = torch.stack([a11 * m1 + a12 * m2 + b1, a21 * m1 + a22 * m2 + b2], 1)
        # The start a = steps + 1 owes nothing yet: identity, zero covariance, zero mean.
        self._phi = torch.cat([phi, self._phi.new_tensor([[1.0, 0.0, 0.0, 1.0]])])
        self._sigma = torch.cat([sigma, sigma.new_zeros(1, 3)])
        self._mean = torch.cat([mean, mean.new_zeros(1, 2)])
        self._coef = None
        self.steps += 1

    def update_alpha(self, step: SgdStep, expected_batch_size: float) -> tuple[float, float]:
        """(to W, to v): ``A^-1 b / B`` of this step (see the module doc)."""
        (a11, a12, a21, a22), (b1, b2) = transition(step)
        det = a11 * a22 - a12 * a21
        return (
            (a22 * b1 - a12 * b2) / (det * expected_batch_size),
            (a11 * b2 - a21 * b1) / (det * expected_batch_size),
        )

    def pending(self, applied: Tensor, t: int, dtype: torch.dtype) -> Tensor:
        """Per row, in ``dtype``: (n, 9) columns Phi (a11 a12 a21 a22), Sigma's Cholesky factor
        (l11 l21 l22) and m (m1 m2) -- one gather from a table computed once per step for the
        whole window (shared by every table on this prefix), not per row."""
        if t != self.steps:
            raise PrivacyError(f"momentum catch-up to step {t}, but the prefix is at {self.steps}")
        if self._coef is None or self._coef.dtype != dtype:
            s11, s12, s22 = self._sigma.unbind(1)
            l11 = s11.clamp_min(0).sqrt()
            l21 = torch.where(l11 > 0, s12 / l11.clamp_min(1e-300), torch.zeros_like(s12))
            l22 = (s22 - l21 * l21).clamp_min(0).sqrt()  # rounding may leave -1e-17 for rank 1
            chol = torch.stack([l11, l21, l22], 1)
            self._coef = torch.cat([self._phi, chol, self._mean], 1).to(dtype)
        return self._coef.index_select(0, (applied - self.base).long())

    def needs_rebase(self) -> bool:
        return self._phi.shape[0] > MAX_WINDOW

    def rebase(self) -> None:
        """Drop every start before the current step (only after all its tables were flushed)."""
        self._phi, self._sigma, self._mean = self._phi[-1:], self._sigma[-1:], self._mean[-1:]
        self._coef = None
        self.base = self.steps

    def state_dict(self) -> dict[str, object]:
        return {
            "kind": "momentum",
            "steps": self.steps,
            "base": self.base,
            "phi": self._phi.clone(),
            "sigma": self._sigma.clone(),
            "mean": self._mean.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.base = int(state["steps"]), int(state["base"])
        self._phi, self._sigma = state["phi"].clone(), state["sigma"].clone()
        self._mean = state["mean"].clone()
        self._coef = None

    @staticmethod
    def check_state(state: Any) -> tuple[int, int]:
        """(steps, base) of a saved momentum prefix; ValueError if it is not one."""
        steps, base = state.get("steps"), state.get("base")
        if any(isinstance(x, bool) or not isinstance(x, int) for x in (steps, base)):
            raise ValueError("steps and base must be ints")
        if not 0 <= base <= steps:
            raise ValueError(f"base {base} outside [0, {steps}]")
        window = steps - base + 1
        for key, width in (("phi", 4), ("sigma", 3), ("mean", 2)):
            t = state.get(key)
            if not isinstance(t, Tensor) or t.dtype != torch.float64 or t.shape != (window, width):
                raise ValueError(f"{key} is not float64 of shape ({window}, {width})")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{key} is not finite")
        return steps, base


class MomentumTable(LazyTable):
    """A lazily noised table on SGD with momentum: its rows' velocity is kept here (torch's
    optimizer never steps the table) and caught up with the rows."""

    prefix: MomentumPrefix  # type: ignore[assignment]

    def __init__(
        self,
        weight: nn.Parameter,
        prefix: MomentumPrefix,
        noise: GaussianNoise | NoisePool,
        noise_std: float,
        padding_idx: int | None = None,
        timer: PhaseTimer | None = None,
    ) -> None:
        super().__init__(weight, prefix, noise, noise_std, padding_idx, timer)  # type: ignore[arg-type]
        self.velocity = huge_pages.empty(tuple(weight.shape), weight.dtype, weight.device).zero_()
        # (rows, their caught-up velocity) not yet written: deferred with the rows' block (a
        # training forward), written once by the update with the step's sum, or by settle().
        self._v_block: tuple[Tensor, Tensor] | None = None

    @no_grad
    def settle(self) -> None:
        super().settle()
        if self._v_block is not None:
            rows, v = self._v_block
            self.velocity.index_copy_(0, rows, v)
            self._v_block = None

    def _apply(self, rows: Tensor, applied: Tensor, t: int, write: bool = True) -> Tensor | None:
        if rows.numel() == 0:
            return None
        w, v = self.weight.index_select(0, rows), self.velocity.index_select(0, rows)
        c = self.prefix.pending(applied, t, w.dtype)  # columns: Phi, Cholesky factor, mean
        new_w = torch.addcmul(w * c[:, 0:1], v, c[:, 1:2])
        new_v = torch.addcmul(w * c[:, 2:3], v, c[:, 3:4])
        s = self.noise_std
        with self.timer.phase("lazy_catch_up_noise"):
            if active_override() is not None:  # constants through the same code as draws
                m = c[:, 7:9].double()
                zeros = torch.zeros_like(m[:, 0])
                new_w.add_(self.noise.aggregated(m[:, 0], zeros, w.shape[1], w.dtype), alpha=s)
                new_v.add_(self.noise.aggregated(m[:, 1], zeros, w.shape[1], w.dtype), alpha=s)
            else:
                n, d = w.shape
                z = (
                    self.pool.standard(2 * n * d)
                    if self.pool.serves(2 * n * d) and w.dtype == torch.float32
                    else self.noise.normal_(torch.empty(2 * n * d, dtype=w.dtype))
                ).view(2, n, d)
                new_w.addcmul_(z[0], c[:, 4:5], value=s)
                new_v.addcmul_(z[0], c[:, 5:6], value=s).addcmul_(z[1], c[:, 6:7], value=s)
        if write:
            self.weight.index_copy_(0, rows, new_w)
            self.velocity.index_copy_(0, rows, new_v)
        else:  # deferred with the block (see settle)
            self._v_block = (rows, new_v)
        self.history.applied.index_fill_(0, rows, t)
        return new_w

    @no_grad
    def update(self, grad: SparseRows, alpha: Any) -> None:
        """``(W, v) += (alpha_w, alpha_v) * grad`` for the step's clipped sum (rows caught up)."""
        to_w, to_v = alpha
        v_block = self._v_block
        fresh = v_block is not None and v_block[0] is self.last_read.rows
        w_block, summed = self._caught_up_sum(grad) if fresh else (None, None)
        if v_block is not None and w_block is not None and summed is not None:
            # The common case, as in LazyTable.update: the sum goes into the caught-up blocks
            # (duplicates summed through the catch-up's grouping), each written once.
            rows = self.last_read.rows
            with self.timer.phase("param_update"):
                if to_w:
                    w_block.add_(summed, alpha=to_w)
                if to_w or self._deferred:
                    self.weight.index_copy_(0, rows, w_block)
                self.velocity.index_copy_(0, rows, v_block[1].add_(summed, alpha=to_v))
            self._written, self._deferred, self._v_block = None, False, None
            return
        self.settle()
        self._written = None
        with self.timer.phase("coalesce"):
            grad = self.coalesce(grad)
            if not grad.coalesced:
                grad = grad.coalesce()  # one sort for both tensors below
        with self.timer.phase("param_update"):
            if to_w:  # 0 without Nesterov: the gradient reaches W through v at the next step
                add_rows_(self.weight, grad.indices, grad.values, to_w, True)
            add_rows_(self.velocity, grad.indices, grad.values, to_v, True)

    def state_dict(self) -> dict[str, Any]:
        """The history and the live velocity, not a copy (as torch's optimizers hand out their
        momentum buffers): a checkpoint writes it at once, and a clone held a second table's
        worth of memory while it did."""
        self.settle()
        return {**super().state_dict(), "velocity": self.velocity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        velocity = state.get("velocity")
        if not isinstance(velocity, Tensor) or velocity.shape != self.velocity.shape:
            raise PrivacyError(
                "the checkpoint has no velocity of this table's shape: it was not written by a "
                "LazyDP run with momentum on this model."
            )
        super().load_state_dict(state)
        self.velocity.copy_(velocity)
        self._v_block = None  # caught up from the old values
