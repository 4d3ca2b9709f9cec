"""Accounting: golden values, an exact Gaussian reference, shuffle accounting, calibration."""

from __future__ import annotations

import math

import pytest
from dp_accounting import pld
from scipy.optimize import brentq
from scipy.stats import norm

from lazydp import accounting as acc
from lazydp._validate import check_noise_multiplier
from lazydp.accounting import (
    MechanismCount,
    calibrate_noise_multiplier,
    compute_epsilon,
    compute_epsilon_as_if_poisson,
    default_delta,
    epsilon_report,
)
from lazydp.errors import ConfigError

GOLDEN = [MechanismCount(sample_rate=0.04, noise_multiplier=1.5, steps=2250)]


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a Gaussian mechanism with mu = sensitivity / std (Balle & Wang 2018)."""

    def delta_of(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    return brentq(lambda e: delta_of(e) - delta, 0.0, 500.0, xtol=1e-12)


def test_golden_rdp_and_pld():
    assert round(compute_epsilon(GOLDEN, 1e-5, accountant="rdp"), 4) == 7.3293
    assert compute_epsilon(GOLDEN, 1e-5) == pytest.approx(6.77, abs=0.02)
    report = epsilon_report(GOLDEN, 1e-5)
    assert round(report.rdp, 4) == 7.3293
    assert report.pld == pytest.approx(6.77, abs=0.02)
    assert report.pld_as_if_poisson is None
    assert report.delta == 1e-5


@pytest.mark.parametrize("sigma,epochs", [(1.0, 1), (5.0, 20), (30.0, 90), (200.0, 4)])
def test_shuffle_matches_exact_gaussian_composition(sigma, epochs):
    # k Gaussian releases of sensitivity 1, std sigma == one with mu = sqrt(k) / sigma.
    q = 0.01
    groups = [MechanismCount(q, sigma, steps=epochs * 100, sampler="shuffle")]
    exact = exact_gaussian_epsilon(math.sqrt(epochs) / sigma, 1e-5)
    pld = compute_epsilon(groups, 1e-5)
    # PLD is pessimistic (never below the truth) and its discretisation costs <= 1e-3 relative.
    assert exact <= pld <= exact * (1 + 1e-3) + 1e-6
    assert compute_epsilon(groups, 1e-5, "rdp") >= exact


def test_shuffle_counts_partial_epochs_as_whole():
    assert MechanismCount(0.04, 1.0, 2250, "shuffle").epochs == 90  # not 91 (float rounding)
    assert MechanismCount(0.04, 1.0, 2251, "shuffle").epochs == 91
    one_more = compute_epsilon([MechanismCount(0.04, 3.0, 2251, "shuffle")], 1e-5)
    ninety_one = compute_epsilon([MechanismCount(0.04, 3.0, 91 * 25, "shuffle")], 1e-5)
    assert one_more == ninety_one


def test_shuffle_reports_the_poisson_figure_beside_it():
    shuffled = [MechanismCount(0.04, 1.5, 2250, sampler="shuffle")]
    as_if = compute_epsilon_as_if_poisson(shuffled, 1e-5)
    assert as_if == compute_epsilon(GOLDEN, 1e-5)
    honest = compute_epsilon(shuffled, 1e-5)
    assert honest > 5 * as_if  # no amplification is expensive: ~46 vs ~6.8
    assert epsilon_report(shuffled, 1e-5).pld_as_if_poisson == as_if


def test_groups_compose_and_order_does_not_matter():
    halves = [MechanismCount(0.04, 1.5, 1000), MechanismCount(0.04, 1.5, 1250)]
    assert compute_epsilon(halves, 1e-5) == pytest.approx(compute_epsilon(GOLDEN, 1e-5), rel=1e-3)
    mixed = [MechanismCount(0.04, 1.5, 1000), MechanismCount(0.02, 0.9, 500)]
    assert compute_epsilon(mixed, 1e-5) == compute_epsilon(mixed[::-1], 1e-5)
    # Adding a group never lowers epsilon.
    assert compute_epsilon(mixed, 1e-5) > compute_epsilon(mixed[:1], 1e-5)


def test_no_noise_is_infinite_and_no_steps_is_free():
    assert compute_epsilon([MechanismCount(0.04, 0.0, 1)], 1e-5) == math.inf
    assert compute_epsilon([MechanismCount(0.04, 0.0, 1)], 1e-5, "rdp") == math.inf
    assert compute_epsilon([], 1e-5) == 0.0


def test_monotone_in_noise_steps_and_rate():
    base = compute_epsilon([MechanismCount(0.01, 1.0, 1000)], 1e-5)
    assert compute_epsilon([MechanismCount(0.01, 1.2, 1000)], 1e-5) < base
    assert compute_epsilon([MechanismCount(0.01, 1.0, 2000)], 1e-5) > base
    assert compute_epsilon([MechanismCount(0.02, 1.0, 1000)], 1e-5) > base
    assert compute_epsilon([MechanismCount(0.01, 1.0, 1000)], 1e-6) > base


def test_repeated_calls_hit_the_cache():
    groups = [MechanismCount(0.03, 1.1, 777)]
    first = compute_epsilon(groups, 1e-5)
    hits = acc._epsilon.cache_info().hits
    # numpy scalars and a fresh but equal list are the same key.
    assert compute_epsilon([MechanismCount(0.03, 1.1, 777)], 1e-5) == first
    assert acc._epsilon.cache_info().hits == hits + 1


def test_bad_arguments():
    with pytest.raises(ConfigError, match="accountant"):
        compute_epsilon(GOLDEN, 1e-5, accountant="gdp")
    with pytest.raises(ConfigError, match="delta"):
        compute_epsilon(GOLDEN, 0.0)
    with pytest.raises(ConfigError, match="MechanismCount"):
        compute_epsilon([(0.04, 1.5, 2250)], 1e-5)  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="sampler"):
        MechanismCount(0.04, 1.5, 10, sampler="fixed")
    with pytest.raises(ConfigError, match="steps"):
        MechanismCount(0.04, 1.5, 0)
    with pytest.raises(ConfigError, match="sample_rate"):
        MechanismCount(1.5, 1.5, 10)


@pytest.mark.parametrize(
    "target,q,steps,accountant",
    [(3.0, 0.04, 2250, "pld"), (1.0, 0.01, 500, "rdp"), (8.0, 1.0, 10, "pld")],
)
def test_calibration_never_overshoots_and_is_tight(target, q, steps, accountant):
    sigma = calibrate_noise_multiplier(target, 1e-5, q, steps, accountant=accountant)
    spent = compute_epsilon([MechanismCount(q, sigma, steps)], 1e-5, accountant)
    assert spent <= target
    # 1% less noise would overshoot: the search stopped within its 1e-3 tolerance.
    assert compute_epsilon([MechanismCount(q, 0.99 * sigma, steps)], 1e-5, accountant) > target


def test_calibration_for_shuffle_needs_more_noise():
    poisson = calibrate_noise_multiplier(3.0, 1e-5, 0.04, 2250)
    shuffle = calibrate_noise_multiplier(3.0, 1e-5, 0.04, 2250, sampler="shuffle")
    assert shuffle > 3 * poisson
    spent = compute_epsilon([MechanismCount(0.04, shuffle, 2250, "shuffle")], 1e-5)
    assert spent <= 3.0


@pytest.mark.parametrize(
    "kwargs,names",
    [
        (dict(target_epsilon=0.0), ["target_epsilon", "0.0"]),
        (dict(target_epsilon=-1.0), ["target_epsilon", "-1.0"]),
        (dict(delta=1.0), ["delta", "1.0"]),
        (dict(delta=0.0), ["delta"]),
        (dict(steps=0), ["steps", "0"]),
        (dict(sample_rate=0.0), ["sample_rate"]),
        (dict(sample_rate=1.5), ["sample_rate", "1.5"]),
        # Needs sigma > 1000: one full-batch step at epsilon 1e-4.
        (dict(target_epsilon=1e-4, sample_rate=1.0, steps=100), ["1000", "target_epsilon"]),
    ],
)
def test_calibration_rejects_impossible_targets(kwargs, names):
    args = dict(target_epsilon=3.0, delta=1e-5, sample_rate=0.04, steps=100) | kwargs
    with pytest.raises(ConfigError) as info:
        calibrate_noise_multiplier(**args)
    for name in names:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "n,expected", [(100_000, 1e-6), (80_000, 1e-5), (100_001, 1e-6), (60_000, 1e-5), (10, 0.01)]
)
def test_default_delta(n, expected):
    assert default_delta(n) == expected


def test_default_delta_is_the_largest_power_of_ten_below_one_over_n():
    # Strictly below: delta = 1/N exactly is what the report flags as WEAK DELTA.
    for n in [2, 9, 10, 11, 99, 101, 1000, 999_999, 1_000_000, 1_000_001, 45_840_617]:
        d = default_delta(n)
        assert d < 1 / n <= 10 * d
        assert d * n < 1
    with pytest.raises(ConfigError, match="n must be"):
        default_delta(0)


def test_a_tiny_delta_falls_back_to_rdp_and_a_huge_sigma_is_refused():
    group = [MechanismCount(0.01, 1.0, 1000)]
    tiny = compute_epsilon(group, 1e-16)  # PLD's truncated tails said inf
    assert math.isfinite(tiny) and tiny == compute_epsilon(group, 1e-16, "rdp")
    with pytest.raises(ConfigError, match=r"\[0, 1e6\]"):
        check_noise_multiplier(1e200)  # the accountants overflowed with a traceback


@pytest.mark.parametrize("sigma,steps,delta", [(10.0, 1000, 3e-12), (20.0, 10_000, 1e-13)])
def test_a_tiny_delta_never_under_reports(sigma, steps, delta):
    # q = 1: the steps are one Gaussian with mu = sqrt(steps) / sigma, whose epsilon is known
    # exactly. PLD's FFT composition is float64 noise at these deltas: it said 26.2231 (exact
    # 26.2254) and 47.83 (exact 48.63).
    group = [MechanismCount(1.0, sigma, steps)]
    exact = exact_gaussian_epsilon(math.sqrt(steps) / sigma, delta)
    assert compute_epsilon(group, delta) >= exact
    # Calibrated on that figure, it chose less noise than the target needs.
    assert calibrate_noise_multiplier(exact, delta, 1.0, steps) >= sigma


@pytest.mark.parametrize("steps", [200_000, 1_000_000])
def test_many_steps_are_not_needlessly_loose(steps):
    # The cells' pessimism grows with the steps composed: a width of 1e-4 x epsilon said 2.767
    # (2e5 steps) and 7.79 (1e6 steps, above RDP's 7.14) where 1e-4 cells say 2.713 and 6.698.
    group = [MechanismCount(1e-3, 1.0, steps)]
    reference = pld.PLDAccountant(value_discretization_interval=1e-4)
    reference.compose(acc._dp_event(tuple(group), as_if_poisson=False))
    tight = reference.get_epsilon(1e-6)
    assert compute_epsilon(group, 1e-6) <= tight * (1 + 1e-3)
    assert compute_epsilon(group, 1e-6) < compute_epsilon(group, 1e-6, "rdp")


@pytest.mark.parametrize(
    "groups",
    [
        (MechanismCount(0.045, 1.56, 440),),
        (MechanismCount(0.01, 0.9, 300), MechanismCount(0.02, 1.3, 50)),
        (MechanismCount(1.0, 4.0, 7),),
        (MechanismCount(0.1, 1.2, 30, "shuffle"), MechanismCount(0.05, 2.0, 12)),
    ],
)
def test_cached_pld_builds_give_the_accountants_figure_to_the_bit(groups):
    # _pld_epsilon reuses one Gaussian PLD build per (sigma, rate, interval); it must say what
    # dp_accounting's PLDAccountant says for the same event, whatever the cache already holds.
    groups = acc._normalise(groups)
    for as_if_poisson in (False, True):
        for interval in (1e-2, 3e-4):
            accountant = pld.PLDAccountant(value_discretization_interval=interval)
            accountant.compose(acc._dp_event(groups, as_if_poisson))
            expected = accountant.get_epsilon(1e-5)
            for _ in range(2):  # the second call is served by the cache
                assert acc._pld_epsilon(groups, as_if_poisson, 1e-5, interval) == expected
