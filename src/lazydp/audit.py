"""Empirical privacy audit: train once with canaries, test the released model against the claim.

A DP guarantee is a promise about every possible attacker; this module plays one strong
attacker against the real training path (sampler, per-example clipping, noise, LazyDP's
deferred noise and flush, the ledger's epsilon) and checks that it cannot do better than the
guarantee allows. It catches implementation bugs that unit tests of each stage can miss: noise
too small, a row that never gets its deferred noise, a gradient that escapes clipping, an
accountant that claims too much.

The set-up (white-box gradient canaries, in the spirit of Nasr et al. 2021 and of the one-run
audits of Steinke, Nasr and Jagielski 2023):

* ``m`` canaries, each an example that touches only its own parameter row (its own embedding
  row, or its own weight column behind a one-hot input) and pushes it along a known direction
  v_i with a gradient far larger than the clip bound C (so it is clipped to exactly C). Each
  canary is in the training set with probability 1/2, independently; nothing else is.
* Because rows never share an example and the Poisson sampler and the noise treat rows
  independently, the m released rows are m *independent* trials of the same two-world
  experiment: "canary i in" against "canary i out". The DP claim for one example therefore
  holds for each trial, and the trials' error rates have exact binomial confidence bounds.
* The attacker's score for canary i is the released row's movement along v_i, in units of the
  noise it should carry: s_i = <w_i - w_i(0), v_i> / (lr sigma C / B sqrt(T)) -- N(0, 1) for an
  absent canary, shifted by (times sampled) / (sigma sqrt(T)) for a present one. With weight
  decay or momentum the release is still linear in each step's gradient: a unit gradient at
  step s moves the released row by lr a_s (a_s = 1 for plain SGD; ``response``), so the unit
  is lr sigma C / B sqrt(sum a_s^2) and a present canary shifts by sum_s [sampled] a_s.
* For each of a few thresholds fixed in advance, "in if s > tau" has a false-positive rate
  (absent canaries above tau) and a false-negative rate (present ones at or below it). An
  (epsilon, delta)-DP mechanism forces FNR >= f(FPR) for the trade-off curve
  f(a) = max_j max(0, 1 - delta_j - e^eps_j a, e^-eps_j (1 - delta_j - a)) over every
  (epsilon_j, delta_j) the run claims (its own accountant, on a grid of deltas). With
  Clopper-Pearson upper bounds FPR+ and FNR+ (Bonferroni over all thresholds), a point with
  FNR+ < f(FPR+) refutes the claim at the stated confidence: the audit FAILS.

With full-batch steps (sample rate 1) the released rows are exactly a Gaussian mechanism and the
claimed curve is tight, so the audit resolves small errors: with 20,000 canaries it fails a
run whose noise is 0.8x what the accountant assumed (tests/test_audit.py plants that and
other bugs). With Poisson subsampling the released sum reveals less than the accountant's
per-step view, so the audit is valid but weaker there. A pass is evidence, not a proof: it
shows this attacker learned no more than the claim allows on this run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lazydp import _validate as v
from lazydp.errors import ConfigError

__all__ = [
    "LAYERS",
    "AuditPoint",
    "AuditResult",
    "AuditSpec",
    "audit_points",
    "canary_audit",
    "claimed_tradeoff",
]

LAYERS = ("embedding", "embedding_bag", "linear", "sharded_bag")
#: Thresholds on the score, fixed before any data is seen (a threshold picked after looking
#: would need its own correction). An absent canary's score is N(0, 1): FPR 0.5 ... 0.0013.
THRESHOLDS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
#: The canary's gradient is this many times the clip bound, so it is always clipped to C.
_PUSH = 10.0
#: The deltas at which the run's claim is read: from 1e-9 (where the curve meets FPR ~ 0) to
#: 0.5 (where it meets FNR ~ 0).
_DELTAS = tuple(float(d) for d in np.logspace(-9, math.log10(0.5), 28))


@dataclass(frozen=True)
class AuditPoint:
    """One threshold's test: observed rates, their upper confidence bounds, the claim's floor."""

    threshold: float
    false_positives: int
    absent: int
    false_negatives: int
    present: int
    fpr: float
    fnr: float
    fpr_upper: float
    fnr_upper: float
    claimed_fnr_floor: float  # f(fpr_upper): the least FNR the claim allows at that FPR

    @property
    def violates(self) -> bool:
        return self.fnr_upper < self.claimed_fnr_floor


@dataclass
class AuditResult:
    """What one audit run measured; ``passed`` is False when a point refutes the claim."""

    mode: str
    layer: str
    canaries: int
    present: int
    steps: int
    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    delta: float
    epsilon: float  # the run's own claim at ``delta``
    epsilon_lower: float  # what the attacker proves at ``delta`` (confidence ``confidence``)
    confidence: float
    points: list[AuditPoint] = field(default_factory=list)
    claim: list[tuple[float, float]] = field(default_factory=list)  # (delta_j, epsilon_j)
    score_mean_absent: float = 0.0
    score_std_absent: float = 0.0
    score_mean_present: float = 0.0
    expected_shift: float = 0.0  # the present canaries' mean score if the run is right
    planted: str | None = None  # a bug planted on purpose (lazydp/planted.py): NOT private
    # The scores themselves (absent, present), for plots; not in to_dict().
    scores: tuple[np.ndarray, np.ndarray] = field(default=(np.zeros(0), np.zeros(0)), repr=False)

    @property
    def passed(self) -> bool:
        return not any(p.violates for p in self.points)

    @property
    def margin(self) -> float:
        """min over thresholds of FNR+ - f(FPR+): negative means a violation."""
        return min(p.fnr_upper - p.claimed_fnr_floor for p in self.points)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "scores"}
        out["points"] = [dict(asdict(p), violates=p.violates) for p in self.points]
        out.update(passed=self.passed, margin=self.margin)
        return out


def claimed_tradeoff(claim: Sequence[tuple[float, float]]) -> Callable[[float], float]:
    """The trade-off curve f(FPR) -> least FNR implied by every (delta, epsilon) pair claimed.

    >>> f = claimed_tradeoff([(1e-5, 1.0)])
    >>> round(f(0.0), 6), round(f(0.1), 4), f(1.0)
    (0.99999, 0.7282, 0.0)
    """

    def f(alpha: float) -> float:
        best = 0.0
        for delta, eps in claim:
            if math.isinf(eps):
                continue
            best = max(
                best, 1 - delta - math.exp(eps) * alpha, math.exp(-eps) * (1 - delta - alpha)
            )
        return best

    return f


def _upper(k: int, n: int, alpha: float) -> float:
    """Clopper-Pearson one-sided upper bound on a rate, k events in n trials, level alpha."""
    if n == 0 or k >= n:
        return 1.0
    return float(stats.beta.ppf(1 - alpha, k + 1, n - k))


def _canary_layer(
    layer: str, m: int, dim: int
) -> tuple[nn.Module, Callable[[nn.Module, Tensor], Tensor]]:
    """The layer holding one row per canary, and how a batch of canary ids reads its rows."""
    if layer == "embedding":
        return nn.Embedding(m, dim), lambda mod, ids: mod(ids)
    if layer == "embedding_bag":
        return nn.EmbeddingBag(m, dim, mode="sum"), lambda mod, ids: mod(ids.view(-1, 1))
    if layer == "sharded_bag":  # rows split over the ranks (r % W), one of lazydp.distributed
        from lazydp.distributed import ShardedEmbeddingBag

        return ShardedEmbeddingBag(m, dim, mode="sum"), lambda mod, ids: mod(ids.view(-1, 1))
    lin = nn.Linear(m, dim, bias=False)  # canary i is the one-hot input e_i: column i is its row
    return lin, lambda mod, ids: mod(nn.functional.one_hot(ids, m).to(torch.float32))


def _rows(module: nn.Module, layer: str, engine: Any) -> Tensor:
    """The released rows (every rank: flushing and gathering are collectives)."""
    if layer == "sharded_bag":
        engine.flush()
        weight = module.gather_weight()  # type: ignore[operator]
    else:
        weight = module.state_dict()["weight"]  # state_dict: LazyDP flushes every pending row
    return (weight.t() if layer == "linear" else weight).detach().to(torch.float64)


@dataclass(frozen=True)
class AuditSpec:
    """One audit's settings, checked (see :func:`canary_audit` for their meaning)."""

    mode: str
    canaries: int
    steps: int
    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    lr: float
    lr_gamma: float
    momentum: float
    weight_decay: float
    nesterov: bool
    layer: str
    dim: int
    resume_at: int | None

    @property
    def lrs(self) -> list[float]:
        """Each step's learning rate (ExponentialLR with ``lr_gamma``, stepped after each)."""
        return [self.lr * self.lr_gamma**t for t in range(self.steps)]

    def optimizer(self, module: nn.Module) -> torch.optim.SGD:
        return torch.optim.SGD(
            module.parameters(),
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            nesterov=self.nesterov,
        )


def _check_spec(mode: str, **kw: Any) -> AuditSpec:
    mode = v.check_mode(mode)
    if mode == "sgd":
        raise ConfigError("mode 'sgd' makes no privacy claim to audit; pick a DP mode.")
    v.check_choice("layer", kw["layer"], LAYERS)
    canaries = v.check_positive_int("canaries", kw["canaries"])
    if canaries < 100:
        raise ConfigError(f"canaries={canaries} is too few to bound any error rate; use >= 100.")
    if kw["layer"] == "linear" and canaries > 20_000:
        raise ConfigError(
            f"layer='linear' feeds one-hot inputs of width {canaries} (a batch of B x "
            f"{canaries} floats); use <= 20000 canaries with it."
        )
    steps = v.check_positive_int("steps", kw["steps"])
    sigma = v.check_noise_multiplier(kw["noise_multiplier"])
    if sigma == 0:
        raise ConfigError(
            "noise_multiplier=0 claims no privacy (epsilon is infinite); nothing to audit."
        )
    lr = v.check_real(
        "lr", kw["lr"], "a finite number > 0", lambda x: 0 < x < math.inf, "e.g. lr=1.0."
    )
    resume_at = kw["resume_at"]
    if resume_at is not None and (
        isinstance(resume_at, bool) or not isinstance(resume_at, int) or not 0 < resume_at < steps
    ):
        raise ConfigError(f"resume_at must be an int in [1, steps={steps}); got {resume_at!r}.")
    return AuditSpec(
        mode=mode,
        canaries=canaries,
        steps=steps,
        noise_multiplier=sigma,
        sample_rate=v.check_sample_rate(kw["sample_rate"]),
        max_grad_norm=v.check_max_grad_norm(kw["max_grad_norm"]),
        lr=lr,
        lr_gamma=v.check_real(
            "lr_gamma", kw["lr_gamma"], "a number in (0, 1]", lambda x: 0 < x <= 1, "e.g. 0.9."
        ),
        momentum=v.check_real(
            "momentum", kw["momentum"], "a number in [0, 1)", lambda x: 0 <= x < 1, "e.g. 0.9."
        ),
        weight_decay=v.check_real(
            "weight_decay",
            kw["weight_decay"],
            "a number in [0, 1/lr)",
            lambda x: 0 <= x * lr < 1,
            "Decay of lr * weight_decay >= 1 flips or zeroes the rows every step.",
        ),
        nesterov=bool(kw["nesterov"]),
        layer=kw["layer"],
        dim=v.check_positive_int("dim", kw["dim"]),
        resume_at=resume_at,
    )


def canary_audit(
    mode: str = "lazydp",
    *,
    canaries: int = 20_000,
    steps: int = 4,
    noise_multiplier: float = 2.0,
    sample_rate: float = 1.0,
    max_grad_norm: float = 1.0,
    lr: float = 1.0,
    lr_gamma: float = 1.0,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    layer: str = "embedding",
    dim: int = 4,
    resume_at: int | None = None,
    delta: float = 1e-5,
    confidence: float = 0.999,
    seed: int | None = None,
    noise_seed: int | None = None,
    engine: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> AuditResult:
    """Train ``canaries`` canaries for ``steps`` DP steps in ``mode`` and audit the release.

    SGD with ``lr`` (times ``lr_gamma`` after every step), ``momentum``, ``weight_decay`` and
    ``nesterov``; ``resume_at=k`` checkpoints after step k and finishes in a fresh model,
    optimizer and engine loaded from it (the ledger file carried over), as a restarted job.
    ``seed`` fixes the auditor's choices (which canaries are in, their directions); the
    training's own noise comes from OS entropy unless ``noise_seed`` is given (tests).
    ``confidence`` is the family-wise confidence of every bound together. ``engine``: an
    unused engine to train with (default ``PrivacyEngine(seed=noise_seed)``); pass a
    :class:`~lazydp.distributed.DistributedPrivacyEngine` on every rank of a torchrun job (the
    same ``seed`` everywhere) to audit distributed training -- then every rank returns the
    same result.
    """
    spec = _check_spec(
        mode,
        canaries=canaries,
        steps=steps,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        max_grad_norm=max_grad_norm,
        lr=lr,
        lr_gamma=lr_gamma,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=nesterov,
        layer=layer,
        dim=dim,
        resume_at=resume_at,
    )
    delta = v.check_delta(delta)
    if not 0.5 <= confidence < 1:
        raise ConfigError(f"confidence must be in [0.5, 1); got {confidence!r}.")
    for name, value in (("seed", seed), ("noise_seed", noise_seed)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63
        ):
            raise ConfigError(f"{name} must be an int in [0, 2**63) or None; got {value!r}.")
    if engine is not None and resume_at is not None:
        raise ConfigError("resume_at builds its own engines; leave engine out.")
    if engine is None and layer == "sharded_bag":
        raise ConfigError(
            "layer='sharded_bag' audits distributed training: pass engine=a "
            "DistributedPrivacyEngine on every rank (or use layer='embedding_bag')."
        )

    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    present = torch.rand(spec.canaries, generator=gen) < 0.5
    signs = torch.randint(0, 2, (spec.canaries, spec.dim), generator=gen, dtype=torch.float64)
    directions = (signs * 2 - 1) / math.sqrt(spec.dim)  # unit vectors, weight on every coordinate
    if not bool(present.any()):
        raise ConfigError("no canary was drawn in; use more canaries.")

    rows, engine = _train(spec, present, directions, engine, noise_seed, progress)
    privacy = engine.privacy
    # A unit gradient at step s moves a row by b_s at the end; the noise of step s is
    # sigma C / B times a unit Gaussian gradient, so the row's noise has std sigma C / B |b|.
    b = response(spec.lrs, spec.momentum, spec.weight_decay, spec.nesterov)
    norm_b = float(np.sqrt((b * b).sum()))
    unit = spec.noise_multiplier * spec.max_grad_norm / privacy.expected_batch_size * norm_b
    scores = (rows * directions).sum(1) / unit  # every row started at 0
    absent, here = scores[~present].numpy(), scores[present].numpy()

    claim = [(d, engine.get_epsilon(d)) for d in _DELTAS]
    points = audit_points(absent, here, claim, confidence)
    return AuditResult(
        mode=spec.mode,
        layer=spec.layer,
        canaries=spec.canaries,
        present=len(here),
        steps=spec.steps,
        noise_multiplier=spec.noise_multiplier,
        sample_rate=privacy.sample_rate,
        max_grad_norm=spec.max_grad_norm,
        delta=delta,
        epsilon=engine.get_epsilon(delta),
        epsilon_lower=_epsilon_lower(points, delta),
        confidence=confidence,
        points=points,
        claim=claim,
        score_mean_absent=float(absent.mean()) if len(absent) else math.nan,
        score_std_absent=float(absent.std()) if len(absent) else math.nan,
        score_mean_present=float(here.mean()),
        expected_shift=privacy.sample_rate * float(b.sum()) / (spec.noise_multiplier * norm_b),
        scores=(absent, here),
    )


def _train(
    spec: AuditSpec,
    present: Tensor,
    directions: Tensor,
    engine: Any,
    noise_seed: int | None,
    progress: Callable[[int, int], None] | None,
) -> tuple[Tensor, Any]:
    """Train the present canaries; (released rows as float64, the engine that holds the claim)."""
    import tempfile

    from lazydp.engine import PrivacyEngine  # the engine imports much; the CLI's --help need not

    ids = torch.nonzero(present).view(-1)
    batch_size = max(1, round(spec.sample_rate * len(ids)))
    push = directions.to(torch.float32) * (_PUSH * spec.max_grad_norm)
    with tempfile.TemporaryDirectory(prefix="lazydp-audit-") as tmp:
        ledger = Path(tmp) / "ledger.jsonl" if spec.resume_at is not None else None

        def start(fresh: Any) -> tuple[Any, nn.Module, Any, Any, Callable[..., Tensor]]:
            if fresh is None:
                fresh = PrivacyEngine(seed=noise_seed, ledger_path=ledger)
            elif not isinstance(fresh, PrivacyEngine) or fresh.module is not None:
                raise ConfigError(f"engine must be an unused PrivacyEngine; got {fresh!r}.")
            module, read = _canary_layer(spec.layer, spec.canaries, spec.dim)
            with torch.no_grad():
                for p in module.parameters():
                    p.zero_()
            model, opt, loader = fresh.make_private(
                module=module,
                optimizer=spec.optimizer(module),
                data_loader=DataLoader(TensorDataset(ids), batch_size=batch_size),
                noise_multiplier=spec.noise_multiplier,
                max_grad_norm=spec.max_grad_norm,
                mode=spec.mode,
                loss_reduction="sum",
                steps_per_epoch=spec.steps,
            )
            return fresh, model, opt, loader, read

        engine, model, opt, loader, read = start(engine)
        done, batches = 0, iter(loader)
        while done < spec.steps:
            if done == spec.resume_at:  # a restarted job: everything rebuilt from the file
                engine.save_checkpoint(Path(tmp) / "ckpt.pt")
                engine, model, opt, loader, read = start(None)
                engine.load_checkpoint(Path(tmp) / "ckpt.pt")
                batches = iter(loader)
            (batch,) = next(batches)
            opt.zero_grad()
            # Gradient -push_i on canary i's row alone: SGD moves it along +v_i (clipped to C).
            (-(read(model, batch) * push[batch]).sum()).backward()
            opt.step()
            for group in opt.param_groups:
                group["lr"] *= spec.lr_gamma
            done += 1
            if progress is not None:
                progress(done, spec.steps)
        return _rows(model, spec.layer, engine), engine


def response(
    lrs: Sequence[float], momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False
) -> np.ndarray:
    """b_s: how far a unit gradient at step s moves a row (from 0) by the end of the steps with
    learning rates ``lrs``, under torch's SGD (decay added to the gradient, then momentum, then
    Nesterov). The update is linear, so the released row is sum_s -b_s g_s, noise included.

    >>> response([0.1, 0.1, 0.1]).round(6).tolist()  # plain SGD: each gradient moves lr once
    [0.1, 0.1, 0.1]
    >>> response([1.0, 1.0, 1.0], momentum=0.5).round(6).tolist()  # early ones echo longer
    [1.75, 1.5, 1.0]
    """
    out = np.empty(len(lrs))
    for s in range(len(lrs)):
        w = buf = 0.0
        for t, lr in enumerate(lrs):
            g = (1.0 if t == s else 0.0) + weight_decay * w
            buf = momentum * buf + g
            w -= lr * ((g + momentum * buf) if nesterov else buf) if momentum else lr * g
        out[s] = -w
    return out


def audit_points(
    absent: np.ndarray,
    present: np.ndarray,
    claim: Sequence[tuple[float, float]],
    confidence: float,
    thresholds: Sequence[float] = THRESHOLDS,
) -> list[AuditPoint]:
    """Test "in if score > tau" at every threshold against the claimed trade-off curve.

    ``absent`` / ``present``: the scores of canaries out of / in the training set (each an
    independent trial); ``claim``: (delta, epsilon) pairs the run claims. Every rate gets a
    one-sided Clopper-Pearson bound at (1 - confidence) / (2 * len(thresholds)), so all bounds
    hold together with probability >= ``confidence``.
    """
    floor = claimed_tradeoff(claim)
    alpha = (1 - confidence) / (2 * len(thresholds))  # Bonferroni over every bound
    points = []
    for tau in thresholds:
        fp, fn = int((absent > tau).sum()), int((present <= tau).sum())
        fpr_up, fnr_up = _upper(fp, len(absent), alpha), _upper(fn, len(present), alpha)
        points.append(
            AuditPoint(
                threshold=float(tau),
                false_positives=fp,
                absent=len(absent),
                false_negatives=fn,
                present=len(present),
                fpr=fp / max(1, len(absent)),
                fnr=fn / max(1, len(present)),
                fpr_upper=fpr_up,
                fnr_upper=fnr_up,
                claimed_fnr_floor=floor(fpr_up),
            )
        )
    return points


def _epsilon_lower(points: Sequence[AuditPoint], delta: float) -> float:
    """The largest epsilon the points prove at ``delta``: each (FPR+, FNR+) pair forces
    eps >= log((1 - delta - FNR+) / FPR+) and the same with the two rates swapped."""
    best = 0.0
    for p in points:
        for a, b in ((p.fpr_upper, p.fnr_upper), (p.fnr_upper, p.fpr_upper)):
            if a > 0 and 1 - delta - b > a:
                best = max(best, math.log((1 - delta - b) / a))
    return best
