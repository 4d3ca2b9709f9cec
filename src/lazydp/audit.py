"""Empirical privacy audit: train once with canaries, test the released model against the claim.

A DP guarantee is a promise about every possible attacker; this module plays one strong
attacker against the real training path (sampler, per-example clipping, noise, LazyDP's
deferred noise and flush, the ledger's epsilon) and checks that it does no better than the
guarantee allows, and that the release matches its specification. It finds implementation
bugs that unit tests of each stage can miss: noise too small or reused, a row that never gets
its deferred noise, a gradient clipped to the wrong size or sign, a sampler taking more than q.

The set-up (white-box gradient canaries, in the spirit of Nasr et al. 2021 and of the one-run
audits of Steinke, Nasr and Jagielski 2023):

* ``m`` canaries, each an example that touches only its own parameter row (its own embedding
  row, or its own weight column behind a one-hot input) and pushes it along a known direction
  v_i with a gradient of 2-20 times the clip bound C (so, clipped right, every one moves its
  row by exactly C; a clip factor applied to the wrong example or the whole batch would not).
  A random half of the canaries (exactly m/2, chosen by the auditor's seed) is the training
  set; nothing else is. A fixed size keeps the data set's N, and so the sample rate q = B/N
  and the expected batch B, the same for every draw: a row's release then depends on its own
  canary alone (and the run's claim is the same for every audit of one configuration).
* When the implementation is right, rows never share an example, the Poisson sampler includes
  each example independently and every noise value is drawn once, so the m released rows are
  m independent trials of one two-world experiment, "canary i in" against "canary i out", and
  the DP claim for one example holds for each. That independence is an assumption of the
  privacy test; the specification test checks its visible part (no reused noise).
* The attacker's score for canary i is the released row's movement along v_i, in units of the
  noise it should carry: with b_s the movement a unit gradient at step s causes by the end
  (lr_s for plain SGD; :func:`response`, also for momentum, weight decay and LR schedules),
  s_i = <w_i, v_i> / (sigma C / B |b|) is N(0, 1) for an absent canary and shifted by
  sum_s [sampled at s] b_s / (sigma |b|) for a present one.
* lazydp/audit_stats.py turns the scores into the two tests: error rates at fixed thresholds
  (both tails) against the trade-off curve of every (epsilon, delta) the run claims, and the
  scores and rows against their specification.

With full-batch steps (sample rate 1) the released rows are exactly a Gaussian mechanism and the
claimed curve is tight, so the privacy test resolves errors of some 10-20% (noise 0.9x: 5-6
runs of 10 by the privacy test alone, 10 of 10 with the specification test; see
benchmarks/privacy_audit.py). With Poisson
subsampling it is valid but weaker: its resolution with 20,000 canaries cannot reach the
claimed epsilon there. A pass is evidence, not a proof: it shows this attacker learned no more
than the claim allows on this run, not that no attacker could.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lazydp import _validate as v
from lazydp.audit_stats import AuditPoint, audit_points, epsilon_lower, spec_findings
from lazydp.errors import ConfigError

__all__ = ["LAYERS", "AuditResult", "AuditSpec", "canary_audit", "check_spec", "response"]

LAYERS = ("embedding", "embedding_bag", "linear", "mixed", "sharded_bag")
#: A canary's gradient is between these multiples of the clip bound: always clipped to C.
_PUSH = (2.0, 20.0)
#: The deltas at which the run's claim is read: from 1e-9 (where the curve meets FPR ~ 0) to
#: 0.8 (where it meets FNR ~ 0).
_DELTAS = tuple(float(d) for d in np.logspace(-9, math.log10(0.8), 36))


@dataclass
class AuditResult:
    """What one audit run measured. ``refuted``: a point of the privacy test refutes the claim;
    ``findings``: what in the release does not match its specification; ``passed``: neither."""

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
    findings: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # AuditSpec: enough to re-run it
    seed: int = 0  # the auditor's seed: which canaries were in, their directions and sizes
    noise_seed: int | None = None  # the training noise's seed; None: OS entropy (not re-runnable)
    loss_reduction: str = "sum"
    planted: str | None = None  # a bug planted on purpose (lazydp/planted.py): NOT private
    # The scores themselves (absent, present), for plots; not in to_dict().
    scores: tuple[np.ndarray, np.ndarray] = field(default=(np.zeros(0), np.zeros(0)), repr=False)

    @property
    def refuted(self) -> bool:
        return any(p.violates for p in self.points)

    @property
    def passed(self) -> bool:
        return not self.refuted and not self.findings

    @property
    def margin(self) -> float:
        """min over thresholds of FNR+ - f(FPR+): negative means a violation."""
        return min(p.fnr_upper - p.claimed_fnr_floor for p in self.points)

    def to_dict(self) -> dict[str, Any]:
        # Field by field: asdict() would deep-copy the score arrays only to drop them.
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "scores"}
        out["claim"], out["findings"] = list(self.claim), list(self.findings)
        out["settings"] = dict(self.settings)
        out["points"] = [dict(asdict(p), violates=p.violates) for p in self.points]
        out.update(passed=self.passed, refuted=self.refuted, margin=self.margin)
        return out


class _Mixed(nn.Module):
    """Two layers per canary: its row of an Embedding and its row of an EmbeddingBag, read
    twice in one bag. The per-example norm must combine both layers and count the repeated id
    (a gradient of 2 g on the bag row); clipped right, the whole gradient has norm C."""

    def __init__(self, m: int, dim: int) -> None:
        super().__init__()
        self.emb, self.bag = nn.Embedding(m, dim), nn.EmbeddingBag(m, dim, mode="sum")

    def forward(self, ids: Tensor) -> Tensor:
        return torch.cat([self.emb(ids), self.bag(torch.stack([ids, ids], 1))], 1)


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
    if layer == "mixed":
        return _Mixed(m, dim), lambda mod, ids: mod(ids)
    lin = nn.Linear(m, dim, bias=False)  # canary i is the one-hot input e_i: column i is its row
    return lin, lambda mod, ids: mod(nn.functional.one_hot(ids, m).to(torch.float32))


def _width(layer: str, dim: int) -> int:
    """How many released values belong to one canary (its row, or its rows side by side)."""
    return 2 * dim if layer == "mixed" else dim


def _row_gradient(layer: str, push: Tensor) -> Tensor:
    """The gradient a canary's rows get from an output gradient ``push`` (the bag half of a
    mixed canary reads its row twice: twice the push)."""
    if layer != "mixed":
        return push
    half = push.shape[1] // 2
    return torch.cat([push[:, :half], 2 * push[:, half:]], 1)


def _rows(module: nn.Module, layer: str, engine: Any) -> Tensor:
    """The released rows (every rank: flushing and gathering are collectives)."""
    if layer == "sharded_bag":
        engine.flush()
        weight = module.gather_weight()  # type: ignore[operator]
    elif layer == "mixed":
        state = module.state_dict()  # state_dict: LazyDP flushes every pending row
        weight = torch.cat([state["emb.weight"], state["bag.weight"]], 1)
    else:
        weight = module.state_dict()["weight"]
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
    loss_reduction: str

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


def check_spec(mode: str, **kw: Any) -> AuditSpec:
    """AuditSpec from :func:`canary_audit`'s training settings (all of them, by name), checked:
    ConfigError saying what is wrong."""
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
        loss_reduction=v.check_choice("loss_reduction", kw["loss_reduction"], ("sum", "mean")),
    )


def check_claim(delta: float, confidence: float) -> float:
    """``delta`` checked, and ConfigError unless ``confidence`` is in [0.5, 1)."""
    delta = v.check_delta(delta)
    if not 0.5 <= confidence < 1:
        raise ConfigError(f"confidence must be in [0.5, 1); got {confidence!r}.")
    return delta


def check_seeds(seed: int | None, noise_seed: int | None) -> None:
    """ConfigError unless each seed is None or an int in [0, 2**63)."""
    for name, value in (("seed", seed), ("noise_seed", noise_seed)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63
        ):
            raise ConfigError(f"{name} must be an int in [0, 2**63) or None; got {value!r}.")


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
    loss_reduction: str = "sum",
    delta: float = 1e-5,
    confidence: float = 0.999,
    seed: int | None = None,
    noise_seed: int | None = None,
    engine: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> AuditResult:
    """Train ``canaries`` canaries for ``steps`` DP steps in ``mode`` and audit the release.

    SGD with ``lr`` (times ``lr_gamma`` after every step), ``momentum``, ``weight_decay`` and
    ``nesterov``; ``loss_reduction`` "sum" or "mean" (as in make_private: the loss the
    training loop backpropagates); ``resume_at=k`` checkpoints after step k and finishes in a
    fresh model, optimizer and engine loaded from it (the ledger file carried over), as a
    restarted job. ``seed`` fixes the auditor's choices (which canaries are in, their
    directions and gradient sizes; drawn from OS entropy and recorded when None); the
    training's own noise comes from OS entropy unless ``noise_seed`` is given (a re-run of an
    audit that failed, and tests).
    ``confidence`` is the family-wise confidence of every bound together. ``engine``: an
    unused engine to train with (default ``PrivacyEngine(seed=noise_seed)``); pass a
    :class:`~lazydp.distributed.DistributedPrivacyEngine` on every rank of a torchrun job (the
    same ``seed`` everywhere) to audit distributed training -- then every rank returns the
    same result.
    """
    spec = check_spec(
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
        loss_reduction=loss_reduction,
    )
    delta = check_claim(delta, confidence)
    check_seeds(seed, noise_seed)
    if engine is not None and resume_at is not None:
        raise ConfigError("resume_at builds its own engines; leave engine out.")
    if (
        engine is not None
        and noise_seed is not None
        and getattr(engine, "seed", None) != noise_seed
    ):
        # The given engine draws with its own seed: noise_seed would be recorded, unused.
        raise ConfigError(
            f"noise_seed={noise_seed} seeds the engine canary_audit builds, but the engine given "
            f"draws its noise with its own seed ({getattr(engine, 'seed', None)!r}); pass "
            "engine=PrivacyEngine(seed=noise_seed), or leave noise_seed out."
        )
    if engine is None and layer == "sharded_bag":
        raise ConfigError(
            "layer='sharded_bag' audits distributed training: pass engine=a "
            "DistributedPrivacyEngine on every rank (or use layer='embedding_bag')."
        )

    seed = secrets.randbits(62) if seed is None else seed  # recorded: the audit can be re-run
    gen = torch.Generator().manual_seed(seed)
    present = torch.zeros(spec.canaries, dtype=torch.bool)
    present[torch.randperm(spec.canaries, generator=gen)[: spec.canaries // 2]] = True
    width = _width(spec.layer, spec.dim)
    signs = torch.randint(0, 2, (spec.canaries, width), generator=gen, dtype=torch.float64)
    directions = (signs * 2 - 1) / math.sqrt(width)  # unit vectors, weight on every coordinate
    low, high = _PUSH
    sizes = low + (high - low) * torch.rand(spec.canaries, generator=gen, dtype=torch.float64)
    if not bool(present.any()):
        raise ConfigError("no canary was drawn in; use more canaries.")

    push = (directions * sizes.unsqueeze(1) * spec.max_grad_norm).to(torch.float32)
    rows, engine = _train(spec, present, push, engine, noise_seed, progress)
    # Clipped right, a present canary's rows move by C along its rows' gradient's direction.
    along = _row_gradient(spec.layer, directions)
    along = along / along.norm(dim=1, keepdim=True)
    privacy = engine.privacy
    # A unit gradient at step s moves a row by b_s at the end; the noise of step s is
    # sigma C / B times a unit Gaussian gradient, so the row's noise has std sigma C / B |b|.
    b = response(spec.lrs, spec.momentum, spec.weight_decay, spec.nesterov)
    norm_b = float(np.sqrt((b * b).sum()))
    unit = spec.noise_multiplier * spec.max_grad_norm / privacy.expected_batch_size * norm_b
    scores = (rows * along).sum(1) / unit  # every row started at 0
    absent, here = scores[~present].numpy(), scores[present].numpy()
    shift = privacy.sample_rate * float(b.sum()) / (spec.noise_multiplier * norm_b)

    claim = [(d, engine.get_epsilon(d)) for d in _DELTAS]
    points = audit_points(absent, here, claim, confidence)
    findings = spec_findings(absent, here, shift, (rows[~present] / unit).numpy(), confidence)
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
        epsilon_lower=epsilon_lower(points, delta),
        confidence=confidence,
        points=points,
        claim=claim,
        score_mean_absent=float(absent.mean()) if len(absent) else math.nan,
        score_std_absent=float(absent.std()) if len(absent) else math.nan,
        score_mean_present=float(here.mean()),
        expected_shift=shift,
        findings=findings,
        settings=asdict(spec),
        seed=seed,
        noise_seed=engine.seed,  # the seed the training drew with (a given engine's own)
        loss_reduction=spec.loss_reduction,
        scores=(absent, here),
    )


def _train(
    spec: AuditSpec,
    present: Tensor,
    push: Tensor,
    engine: Any,
    noise_seed: int | None,
    progress: Callable[[int, int], None] | None,
) -> tuple[Tensor, Any]:
    """Train the present canaries; (released rows as float64, the engine that holds the claim)."""
    import tempfile

    from lazydp.engine import PrivacyEngine  # the engine imports much; the CLI's --help need not

    ids = torch.nonzero(present).view(-1)
    batch_size = max(1, round(spec.sample_rate * len(ids)))
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
                loss_reduction=spec.loss_reduction,
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
            loss = -(read(model, batch) * push[batch]).sum()
            (loss / max(1, len(batch)) if spec.loss_reduction == "mean" else loss).backward()
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
