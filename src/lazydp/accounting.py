"""Privacy accounting for DP-SGD on Google's ``dp_accounting``: epsilon and noise calibration.

Contract:
* A training run is a sequence of :class:`MechanismCount` groups (``steps`` steps with the same
  sample rate, noise multiplier and sampler). Groups compose; their order does not matter.
* ``sampler="poisson"``: one step is ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``
  (add/remove-one adjacency), i.e. amplification by Poisson subsampling.
* ``sampler="shuffle"`` (fixed-size batches from a shuffled epoch) gets *no* amplification: each
  example is used once per epoch, so a group costs ``ceil(steps / floor(1/q))`` compositions of
  ``GaussianDpEvent(sigma)``, or more where the ledger recorded that its steps drew from more
  epochs (``releases``: batches a loop received and never stepped on; shuffle_epochs.py).
  :func:`compute_epsilon_as_if_poisson` gives the (commonly reported, unjustified) Poisson
  figure beside it, so a report can show both.
* ``noise_multiplier == 0`` with ``steps > 0`` costs ``inf``.
* PLD (the default) is a pessimistic estimate: never below the true epsilon of the mechanism.
  Its discretisation interval starts per call at ``1e-4 * (a coarse first estimate)``,
  clamped to [1e-4, 1e-2] (and to 1e-6 of one step's loss span for tiny sigma), and is
  for runs of more than ``HALVE_ABOVE_STEPS`` steps halved while that lowers epsilon by more
  than 1e-4 relative (the pessimism grows with the steps composed), at 10-100 ms per call for
  thousands of steps. A finer floor took minutes
  at epsilon ~0 (a large delta).
* Where PLD is out of reach -- more than ``PLD_MAX_STEPS`` steps (1e7 took 164 s), a grid
  that overflows (sigma ~ 1e-6), or a delta below ``PLD_MIN_DELTA`` -- the "pld" figure is
  RDP's, a valid but looser bound.
* RDP is reported beside PLD; it uses dp_accounting's default orders (1.1..63, so the widely
  quoted figures are reproduced exactly) extended below 1.1 and above 63.
* :func:`calibrate_noise_multiplier` never overshoots: the returned sigma has epsilon <= target
  under the same accountant.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import dp_accounting
from dp_accounting import pld, rdp

from lazydp._validate import (
    check_choice,
    check_count,
    check_delta,
    check_epsilon,
    check_noise_multiplier,
    check_positive_int,
    check_sample_rate,
)
from lazydp.errors import ConfigError

ACCOUNTANTS = ("pld", "rdp")
SAMPLERS = ("poisson", "shuffle")
MAX_NOISE_MULTIPLIER = 1000.0
PLD_MAX_STEPS = 2_000_000
# Below this delta PLD's answer is float64 rounding noise of its FFT composition (dp_accounting
# also truncates 1e-15 of tail mass), not a bound: with q=1, sigma=20, 10000 steps it said 47.83
# at delta 1e-13 where the exact figure is 48.63, and under-reported from 3e-12 down. RDP's
# bound is analytic and holds at any delta.
PLD_MIN_DELTA = 1e-10
# Runs longer than this get their PLD cells halved while epsilon still drops (see _epsilon).
HALVE_ABOVE_STEPS = 50_000
CALIBRATION_RTOL = 1e-3

RDP_ORDERS: tuple[float, ...] = tuple(
    sorted(
        {1.01, 1.02, 1.03, 1.05, 1.07}
        | {float(a) for a in rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS}
        | {80.0, 96.0, 112.0, 160.0, 192.0, 384.0, 768.0, 2048.0, 4096.0}
    )
)


@dataclass(frozen=True)
class MechanismCount:
    """``steps`` DP-SGD steps sharing one sample rate, noise multiplier and sampler.

    >>> MechanismCount(sample_rate=0.04, noise_multiplier=1.5, steps=2250).sampler
    'poisson'
    """

    sample_rate: float
    noise_multiplier: float
    steps: int
    sampler: str = "poisson"
    # Shuffled epochs the steps were recorded drawing from (shuffle_epochs.py); 0: none recorded.
    releases: int = 0

    def __post_init__(self) -> None:
        # Normalise (numpy scalars -> float) so equal groups hash equally in the cache.
        object.__setattr__(self, "sample_rate", check_sample_rate(self.sample_rate))
        object.__setattr__(self, "noise_multiplier", check_noise_multiplier(self.noise_multiplier))
        object.__setattr__(self, "steps", check_positive_int("steps", self.steps))
        check_choice("sampler", self.sampler, SAMPLERS)
        check_count("releases", self.releases)

    @property
    def epochs(self) -> int:
        """Passes over the data (rounded up): how often a shuffled epoch uses each example.

        A shuffled epoch is floor(N/B) = floor(1/q) steps (the partial batch is dropped), not
        1/q: with N=10, B=3 ten epochs are 30 steps, and ceil(30 * 0.3) = 9 would under-count.

        At least ``releases``: the epochs the ledger recorded the steps drawing from, more
        than the steps fill when a loop received batches it never stepped on.

        >>> MechanismCount(0.3, 1.0, 30, "shuffle").epochs
        10
        >>> MechanismCount(0.3, 1.0, 30, "shuffle", releases=11).epochs
        11
        """
        per_epoch = epoch_steps("shuffle", self.sample_rate)
        return max(self.releases, math.ceil(self.steps / per_epoch))


@dataclass(frozen=True)
class EpsilonReport:
    """Epsilon at ``delta`` by both accountants; ``pld_as_if_poisson`` only for shuffle runs."""

    delta: float
    pld: float
    rdp: float
    pld_as_if_poisson: float | None = None


def _dp_event(groups: tuple[MechanismCount, ...], as_if_poisson: bool) -> dp_accounting.DpEvent:
    events: list[dp_accounting.DpEvent] = []
    for g in groups:
        gaussian = dp_accounting.GaussianDpEvent(g.noise_multiplier)
        if g.sampler == "shuffle" and not as_if_poisson:
            events.append(dp_accounting.SelfComposedDpEvent(gaussian, g.epochs))
        else:
            step = dp_accounting.PoissonSampledDpEvent(g.sample_rate, gaussian)
            events.append(dp_accounting.SelfComposedDpEvent(step, g.steps))
    return dp_accounting.ComposedDpEvent(events)


@contextmanager
def _quiet_absl() -> Iterator[None]:
    # RDP drops orders whose series fails to converge (small sigma, fractional orders) and says so
    # through absl at WARNING level once per order: harmless, and it floods CLI output.
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@functools.lru_cache(maxsize=8)
def _gaussian_pld(
    sigma: float, sample_rate: float, interval: float
) -> pld.privacy_loss_distribution.PrivacyLossDistribution:
    """One Gaussian release's PLD (Poisson-subsampled at ``sample_rate``; 1: not subsampled),
    kept for the next call with the same three figures.

    Building it is dp_accounting's Python loop over its grid (0.1 s at the default run's
    sigma and interval); composing it after is an FFT. A run's progress bar asks for epsilon
    again at a new step count with the same sigma and sample rate: the coarse pass reuses its
    build. Eight entries hold at most a few tens of MB (each is one or two pmf arrays).
    """
    return pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma,
        value_discretization_interval=interval,
        sampling_prob=sample_rate,
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )


def _pld_epsilon(
    groups: tuple[MechanismCount, ...], as_if_poisson: bool, delta: float, interval: float
) -> float:
    """PLDAccountant's figure for the event _dp_event(groups) at ``interval``, from the very
    calls it makes (identity, then compose each group's build self-composed), only with the
    builds cached: the same number to the bit (tests/test_accounting.py checks it)."""
    total = pld.privacy_loss_distribution.identity(value_discretization_interval=interval)
    for g in groups:
        if g.sampler == "shuffle" and not as_if_poisson:
            # SelfComposedDpEvent(GaussianDpEvent(sigma), epochs): one Gaussian of
            # std sigma / sqrt(epochs), as PLDAccountant composes it
            part = _gaussian_pld(g.noise_multiplier / math.sqrt(g.epochs), 1.0, interval)
        else:
            part = _gaussian_pld(g.noise_multiplier, g.sample_rate, interval)
            part = part.self_compose(g.steps)
        total = total.compose(part)
    return float(total.get_epsilon_for_delta(delta))


@functools.lru_cache(maxsize=4096)
def _epsilon(
    groups: tuple[MechanismCount, ...], delta: float, accountant: str, as_if_poisson: bool
) -> float:
    if not groups:
        return 0.0
    if any(g.noise_multiplier == 0 for g in groups):
        return math.inf
    if accountant == "rdp":
        rdp_accountant = rdp.RdpAccountant(list(RDP_ORDERS))
        with _quiet_absl():
            rdp_accountant.compose(_dp_event(groups, as_if_poisson))
            return float(rdp_accountant.get_epsilon(delta))
    # One step's privacy loss spans about 1/(2 sigma^2) + 40/sigma; cells are kept at least
    # 1e-4 of that wide (finer costs memory and time, not accuracy that matters: sigma = 1e-6
    # otherwise asked for 364 TiB). The discretisation is pessimistic, so wider cells can only
    # raise epsilon. Absolute floor 1e-4: at eps ~ 0 (a large delta) 1e-6 took minutes.
    # Past PLD_MAX_STEPS PLD composition took minutes; below PLD_MIN_DELTA it under-reports.
    if delta < PLD_MIN_DELTA or sum(g.steps for g in groups) > PLD_MAX_STEPS:
        return _epsilon(groups, delta, "rdp", as_if_poisson)
    steps = sum(g.steps for g in groups)
    sigma = min(g.noise_multiplier for g in groups)
    span = 1 / (2 * sigma * sigma) + 40 / sigma
    try:
        coarse = _pld_epsilon(groups, as_if_poisson, delta, max(1e-2, span * 1e-4))
        if not math.isfinite(coarse):
            # PLD truncates its tails near 1e-15: at a delta that small it answers inf where
            # RDP still gives a valid (finite) upper bound.
            return _epsilon(groups, delta, "rdp", as_if_poisson)
        floor = max(1e-4, span * 1e-6)
        interval = max(floor, min(1e-2, 1e-4 * coarse))
        best = _pld_epsilon(groups, as_if_poisson, delta, interval)
        # The pessimism of a cell width grows with the steps composed, not with epsilon: at
        # q=1e-3, sigma=1, 1e6 steps the width above (1.7e-3) said 7.79 where 1e-4 says 6.70
        # (RDP: 7.14). Halve the cells while that still lowers epsilon noticeably; every
        # width gives an upper bound, so the smallest answer is one too. Only for long runs:
        # at 440-20000 steps the gain measured 0-4e-5 relative while calibration took 2.7-3x
        # as long (the default `lazydp train`'s: 1.2 -> 3.1 s).
        while steps > HALVE_ABOVE_STEPS and interval / 2 >= floor:
            interval /= 2
            finer = _pld_epsilon(groups, as_if_poisson, delta, interval)
            gain, best = best - finer, min(best, finer)
            if not gain > 1e-4 * max(best, 1.0):
                break
        return best
    except (OverflowError, MemoryError, ValueError):
        # Far outside any useful regime (sigma ~ 0, a billion steps): PLD's grid overflows.
        # RDP is a valid upper bound there, and as conservative as it needs to be.
        return _epsilon(groups, delta, "rdp", as_if_poisson)


def pld_label(epsilon_pld: float, epsilon_rdp: float) -> str:
    """How to name the "pld" figure: "PLD", or, where PLD was out of reach (see the module
    contract) and the figure is RDP's, a label that says so. A true PLD figure never equals
    RDP's to the last bit.

    >>> pld_label(6.769, 7.329), pld_label(11.65, 11.65)
    ('PLD', 'RDP, PLD out of range')
    """
    # 0 is exact from either (no steps yet, or a delta that large): both say 0.0, and a
    # report of a run before its first step said "RDP, PLD out of range".
    if epsilon_pld == epsilon_rdp and math.isfinite(epsilon_pld) and epsilon_pld > 0:
        return "RDP, PLD out of range"
    return "PLD"


def _normalise(events: Sequence[MechanismCount]) -> tuple[MechanismCount, ...]:
    for e in events:
        if not isinstance(e, MechanismCount):
            raise ConfigError(
                f"events must be MechanismCount objects; got {e!r}. "
                "Build them as MechanismCount(sample_rate, noise_multiplier, steps)."
            )
    # Sorting makes the cache key independent of group order (composition commutes).
    return tuple(
        sorted(events, key=lambda g: (g.sampler, g.sample_rate, g.noise_multiplier, g.steps))
    )


def compute_epsilon(
    events: Sequence[MechanismCount], delta: float, accountant: str = "pld"
) -> float:
    """Epsilon at ``delta`` spent by all ``events`` together (cached: repeated calls are free).

    >>> round(compute_epsilon([MechanismCount(0.04, 1.5, 2250)], 1e-5, "rdp"), 4)
    7.3293
    """
    check_choice("accountant", accountant, ACCOUNTANTS)
    return _epsilon(_normalise(events), check_delta(delta), accountant, False)


def compute_epsilon_as_if_poisson(
    events: Sequence[MechanismCount], delta: float, accountant: str = "pld"
) -> float:
    """Epsilon if every group, shuffled ones included, had been Poisson sampled.

    Not a valid guarantee for shuffled fixed-size batches; reports show it beside the honest
    :func:`compute_epsilon` figure so the cost of not using Poisson sampling is visible.

    >>> shuffled = [MechanismCount(0.04, 1.5, 2250, sampler="shuffle")]
    >>> compute_epsilon_as_if_poisson(shuffled, 1e-5) < compute_epsilon(shuffled, 1e-5)
    True
    """
    check_choice("accountant", accountant, ACCOUNTANTS)
    return _epsilon(_normalise(events), check_delta(delta), accountant, True)


def epsilon_report(events: Sequence[MechanismCount], delta: float) -> EpsilonReport:
    """PLD and RDP epsilon at ``delta`` (plus the as-if-Poisson PLD figure for shuffle runs).

    >>> r = epsilon_report([MechanismCount(0.04, 1.5, 2250)], 1e-5)
    >>> round(r.rdp, 4), abs(r.pld - 6.77) < 0.02, r.pld_as_if_poisson
    (7.3293, True, None)
    """
    shuffled = any(e.sampler == "shuffle" for e in _normalise(events))
    return EpsilonReport(
        delta=check_delta(delta),
        pld=compute_epsilon(events, delta, "pld"),
        rdp=compute_epsilon(events, delta, "rdp"),
        pld_as_if_poisson=compute_epsilon_as_if_poisson(events, delta) if shuffled else None,
    )


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "pld",
    sampler: str = "poisson",
) -> float:
    """Smallest noise multiplier (to relative tolerance 1e-3) whose epsilon is <= the target.

    Never overshoots: ``compute_epsilon`` of the result is at most ``target_epsilon``.

    >>> sigma = calibrate_noise_multiplier(3.0, 1e-5, sample_rate=0.01, steps=1000)
    >>> compute_epsilon([MechanismCount(0.01, sigma, 1000)], 1e-5) <= 3.0
    True
    """
    target = check_epsilon(target_epsilon, "target_epsilon")
    delta = check_delta(delta)
    q = check_sample_rate(sample_rate)
    steps = check_positive_int("steps", steps)
    check_choice("accountant", accountant, ACCOUNTANTS)
    check_choice("sampler", sampler, SAMPLERS)

    def eps(sigma: float) -> float:
        return _epsilon((MechanismCount(q, sigma, steps, sampler),), delta, accountant, False)

    # Bracket [lo, hi] with eps(lo) > target >= eps(hi), growing geometrically from sigma = 1.
    hi = 1.0
    while eps(hi) > target:
        if hi >= MAX_NOISE_MULTIPLIER:
            raise ConfigError(
                f"target_epsilon={target_epsilon!r} at delta={delta!r} needs "
                f"noise_multiplier > {MAX_NOISE_MULTIPLIER:g} for sample_rate={q!r}, "
                f"steps={steps}: raise target_epsilon, or use fewer steps or a smaller "
                "sample_rate."
            )
        hi = min(2 * hi, MAX_NOISE_MULTIPLIER)
    lo = hi / 2
    while lo > 1e-3 and eps(lo) <= target:
        hi, lo = lo, lo / 2
    while (hi - lo) > CALIBRATION_RTOL * hi:
        mid = (lo + hi) / 2
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def epoch_steps(sampler: str, q: float, n: int | None = None, batch_size: int | None = None) -> int:
    """Steps in one epoch as lazydp's loaders run it: round(1/q) Poisson steps, or floor(N/B)
    shuffled fixed-size batches (the partial batch is dropped; floor(1/q) without N and B).

    >>> epoch_steps("poisson", 0.03), epoch_steps("shuffle", 0.3, n=10, batch_size=3)
    (33, 3)
    """
    if sampler == "shuffle":
        if n is not None and batch_size:
            return max(1, n // batch_size)
        # round() first: 1 / 0.04 is 25.000000000000004 (or 24.99...) in floating point.
        return max(1, math.floor(round(1 / q, 9)))
    return max(1, round(1 / q))


def steps_for_epochs(epochs: float, per_epoch: int) -> int:
    """ceil(epochs x steps per epoch), rounded first so that 90 x 25 is 2250, not 2251."""
    return max(1, math.ceil(round(epochs * per_epoch, 9)))


def default_delta(n: int) -> float:
    """The largest power of ten strictly below 1/N: the customary delta for N examples (a delta
    of exactly 1/N is the weak guarantee the report warns about).

    >>> default_delta(100_000), default_delta(80_000), default_delta(1_000_001)
    (1e-06, 1e-05, 1e-07)
    """
    n = check_positive_int("n", n)
    # Exact integer arithmetic: 10**k > n gives 10**-k < 1/n (float log10 misrounds 10**k).
    k = len(str(n))
    return float(f"1e-{k}")
