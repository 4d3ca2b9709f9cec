"""The statistics of the canary audit (lazydp/audit.py): error-rate bounds against the claimed
trade-off curve, and checks that the released rows match their specification.

Two families of tests, each at the stated confidence (so a correct run passes both with
probability >= 1 - 2 (1 - confidence)):

* **The privacy test** (:func:`audit_points`). At each threshold fixed in advance, "in if
  s > tau" (upper tail) and "in if s < -tau" (lower tail: a sign error pushes present canaries
  the other way) has a false-positive rate (absent canaries guessed in) and a false-negative
  rate. Any (epsilon, delta)-DP mechanism forces FNR >= f(FPR) with
  f(a) = max_j max(0, 1 - delta_j - e^eps_j a, e^-eps_j (1 - delta_j - a)) over every pair the
  run claims. f is non-increasing, so with one-sided Clopper-Pearson upper bounds FPR+ >= FPR
  and FNR+ >= FNR (Bonferroni over all of them) a point with FNR+ < f(FPR+) refutes "the claim
  holds and the trials are independent" at the stated confidence.
* **The specification test** (:func:`spec_findings`). An absent canary's score is exactly
  N(0, 1) and a present one's mean is known, so the noise's size (a 0.95x noise is ~7 standard
  errors off with 10,000 absent canaries), the shift, and the independence of neighbouring rows
  (noise reused across rows, tables or ranks: exact twins, correlation) are checked directly.
  A mismatch is a bug, though not by itself a refutation of the privacy claim.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "THRESHOLDS",
    "AuditPoint",
    "audit_points",
    "binding_pair",
    "claimed_tradeoff",
    "epsilon_lower",
    "spec_findings",
]

#: Thresholds on |score|, fixed before any data is seen (a threshold picked after looking would
#: need its own correction), each tested in both tails. An absent canary's score is N(0, 1):
#: FPR 0.5 ... 0.0013 per tail.
THRESHOLDS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)


@dataclass(frozen=True)
class AuditPoint:
    """One test: observed rates, their upper confidence bounds, the claim's floor there."""

    tail: str  # "upper": in if score > threshold; "lower": in if score < -threshold
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
    claimed_delta: float  # the claimed (delta, epsilon) pair that sets that floor
    claimed_epsilon: float

    @property
    def violates(self) -> bool:
        return self.fnr_upper < self.claimed_fnr_floor


def binding_pair(
    claim: Sequence[tuple[float, float]], alpha: float
) -> tuple[float, tuple[float, float]]:
    """(f(alpha), the (delta, epsilon) pair of ``claim`` that sets it)."""
    best, pair = 0.0, (1.0, math.inf)
    for delta, eps in claim:
        if math.isinf(eps):
            continue
        value = max(1 - delta - math.exp(eps) * alpha, math.exp(-eps) * (1 - delta - alpha))
        if value > best:
            best, pair = value, (delta, eps)
    return best, pair


def claimed_tradeoff(claim: Sequence[tuple[float, float]]) -> Callable[[float], float]:
    """The trade-off curve f(FPR) -> least FNR implied by every (delta, epsilon) pair claimed.

    >>> f = claimed_tradeoff([(1e-5, 1.0)])
    >>> round(f(0.0), 6), round(f(0.1), 4), f(1.0)
    (0.99999, 0.7282, 0.0)
    """
    return lambda alpha: binding_pair(claim, alpha)[0]


def _upper(k: int, n: int, alpha: float) -> float:
    """Clopper-Pearson one-sided upper bound on a rate, k events in n trials, level alpha."""
    if n == 0 or k >= n:
        return 1.0
    return float(stats.beta.ppf(1 - alpha, k + 1, n - k))


def audit_points(
    absent: np.ndarray,
    present: np.ndarray,
    claim: Sequence[tuple[float, float]],
    confidence: float,
    thresholds: Sequence[float] = THRESHOLDS,
) -> list[AuditPoint]:
    """Test "in if score > tau" and "in if score < -tau" at every threshold against the claim.

    ``absent`` / ``present``: the scores of canaries out of / in the training set (each an
    independent trial); ``claim``: (delta, epsilon) pairs the run claims. Every rate gets a
    one-sided Clopper-Pearson bound at (1 - confidence) / (4 * len(thresholds)), so all bounds
    hold together with probability >= ``confidence``.
    """
    alpha = (1 - confidence) / (4 * len(thresholds))  # Bonferroni over every bound
    points = []
    for tail, sign in (("upper", 1.0), ("lower", -1.0)):
        a, p = sign * np.asarray(absent), sign * np.asarray(present)
        for tau in thresholds:
            fp, fn = int((a > tau).sum()), int((p <= tau).sum())
            fpr_up, fnr_up = _upper(fp, len(a), alpha), _upper(fn, len(p), alpha)
            floor, (delta, eps) = binding_pair(claim, fpr_up)
            points.append(
                AuditPoint(
                    tail=tail,
                    threshold=float(tau),
                    false_positives=fp,
                    absent=len(a),
                    false_negatives=fn,
                    present=len(p),
                    fpr=fp / max(1, len(a)),
                    fnr=fn / max(1, len(p)),
                    fpr_upper=fpr_up,
                    fnr_upper=fnr_up,
                    claimed_fnr_floor=floor,
                    claimed_delta=delta,
                    claimed_epsilon=eps,
                )
            )
    return points


def epsilon_lower(points: Sequence[AuditPoint], delta: float) -> float:
    """The largest epsilon the points prove at ``delta``: each (FPR+, FNR+) pair forces
    eps >= log((1 - delta - FNR+) / FPR+) and the same with the two rates swapped."""
    best = 0.0
    for p in points:
        for a, b in ((p.fpr_upper, p.fnr_upper), (p.fnr_upper, p.fpr_upper)):
            if a > 0 and 1 - delta - b > a:
                best = max(best, math.log((1 - delta - b) / a))
    return best


def _scaled_twins(rows: np.ndarray) -> int:
    """How many rows point exactly (to 1e-6) where another row points, up to scale and sign:
    practically impossible for independent continuous noise of d >= 3 values (~1e-8 expected
    among 10,000 rows), certain when a draw is reused for two rows, even with different
    pending-step scales."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    unit = rows / np.where(norms > 0, norms, 1.0)
    sign = np.sign(unit[np.arange(len(unit)), np.argmax(np.abs(unit) > 0, axis=1)])
    canonical = np.round(unit * sign[:, None], 6)
    return len(canonical) - len(np.unique(canonical, axis=0))


def spec_findings(
    absent: np.ndarray,
    present: np.ndarray,
    expected_shift: float,
    absent_rows: np.ndarray,
    confidence: float,
) -> list[str]:
    """What in the release does not match its specification (empty when all is as stated).

    ``absent_rows``: the released rows of the absent canaries in id order, in units of the
    noise std (pure noise: i.i.d. N(0, 1) in every coordinate when the run is right). Five
    two-sided z-tests share 1 - ``confidence`` (Bonferroni); exact twin rows are impossible
    for continuous noise and counted directly.
    """
    z = float(stats.norm.ppf(1 - (1 - confidence) / 10))
    found = []
    n_a, n_p = len(absent), len(present)
    if n_a > 1:
        std = float(np.std(absent, ddof=1))
        if abs(std - 1) > z / math.sqrt(2 * (n_a - 1)):
            found.append(
                f"absent canaries' noise is {std:.4f} of the stated std (1 expected, "
                f"+-{z / math.sqrt(2 * (n_a - 1)):.4f})"
            )
        mean = float(np.mean(absent))
        if abs(mean) > z / math.sqrt(n_a):
            found.append(f"absent canaries moved: mean score {mean:+.4f} (0 expected)")
    if n_p > 1:
        mean, se = float(np.mean(present)), float(np.std(present, ddof=1)) / math.sqrt(n_p)
        if abs(mean - expected_shift) > z * se:
            found.append(
                f"present canaries moved {mean:.4f} noise stds ({expected_shift:.4f} expected, "
                f"+-{z * se:.4f}): their clipped gradients are not the stated size"
            )
    rows = np.asarray(absent_rows, dtype=np.float64)
    if len(rows) > 2 and not bool((rows.std(axis=0) > 0).all()):
        found.append("absent rows carry no noise in some coordinate")
    elif len(rows) > 2:
        # Below 3 values a row, float32 noise repeats by chance (a birthday count): no check.
        twins = _scaled_twins(rows) if rows.shape[1] >= 3 else 0
        if twins:
            found.append(f"{twins} absent rows are scaled copies of others: noise reused")
        a, b = rows[:-1].ravel(), rows[1:].ravel()
        r = float(np.corrcoef(a, b)[0, 1])
        if abs(r) > z / math.sqrt(a.size):
            found.append(f"neighbouring rows' noise is correlated (r = {r:+.4f}, 0 expected)")
        if rows.shape[1] > 1:  # coordinates of one row: every pair (d (d - 1) / 2 of them)
            cc = np.atleast_2d(np.corrcoef(rows, rowvar=False))
            worst = float(np.abs(cc[np.triu_indices(rows.shape[1], 1)]).max())
            pairs = rows.shape[1] * (rows.shape[1] - 1) / 2
            if worst > float(stats.norm.ppf(1 - (1 - confidence) / (10 * pairs))) / math.sqrt(
                len(rows)
            ):
                found.append(f"a row's coordinates' noise is correlated (|r| = {worst:.4f})")
    return found
