"""DP vocabulary: which categorical values get their own id, chosen by Laplace partition selection.

Mechanism (Korolova et al. 2009, "Releasing search queries and clicks privately"; Gopi et al.
2020; Desfontaines et al. 2022, "Differentially private partition selection"), per feature:
count the training rows holding each value, add Laplace(b) noise, keep the values whose noisy
count exceeds a threshold tau. Only the *set* of kept values is released (ids 1..V in value
order); the noisy counts are never stored.

Privacy unit and contribution bound: ONE RAW ROW is one privacy unit (if a user owns many rows,
the guarantee is per row, not per user). A row adds 1 to the count of each of at most ``k``
distinct values of a feature (k = 1 for single-valued features, k = MAX_GENRES for genres, whose
list is truncated to its first k values and de-duplicated per row). With b = k / epsilon_f and
tau = 1 + b * ln(k / (2 delta_f)), the selection is (epsilon_f, delta_f)-DP: counts present in
both neighbours move by at most 1 in at most k places (L1 <= k), and each of the at most k values
that only the extra row holds (count 1) survives with probability 0.5 * exp(-(tau - 1) / b) =
delta_f / k. The F features compose (basic composition): the budget given,
(epsilon, delta), is split evenly, epsilon_f = epsilon / F, delta_f = delta / F.

Noise is generated inside SQL (so both engines select the same set) as the inverse CDF of a
uniform drawn from md5(secret seed, feature, value): a keyed pseudo-random function whose 128-bit
key comes from the OS (``secrets``) unless a seed is given for reproducibility (not for
production). Only the keep/drop bit leaves the mechanism, so the floating-point attack on
textbook Laplace noise (Mironov 2012), which reads the low bits of a released noisy value, does
not apply.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

from lazydp.errors import ConfigError


@dataclass(frozen=True)
class PartitionSelection:
    """Laplace partition selection for one feature. ``keep iff count + Laplace(scale) > threshold``."""

    epsilon: float
    delta: float
    max_values: int  # contribution bound k of one row

    @property
    def scale(self) -> float:
        return self.max_values / self.epsilon

    @property
    def threshold(self) -> float:
        return 1.0 + self.scale * math.log(self.max_values / (2.0 * self.delta))

    def keep_probability(self, count: int) -> float:
        """P[count + Laplace(b) > tau]. Example: ``keep_probability(1) == delta / max_values``."""
        t = self.threshold - count
        if t >= 0:
            return 0.5 * math.exp(-t / self.scale)
        return 1.0 - 0.5 * math.exp(t / self.scale)


#: Smallest per-value delta (delta / features / k) the 52-bit noise grid keeps exact enough.
MIN_VALUE_DELTA = 2.0**-40


def split_budget(
    epsilon: float, delta: float, max_values: dict[str, int]
) -> dict[str, PartitionSelection]:
    """Per-feature selections that together cost (epsilon, delta) by basic composition.

    Example::

        sel = split_budget(1.0, 1e-6, {"C1": 1, "C2": 1})
        assert sel["C1"].epsilon == 0.5 and sel["C1"].delta == 5e-7
    """
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ConfigError(f"vocab_epsilon={epsilon!r} must be a finite number > 0")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ConfigError(f"vocab_delta={delta!r} must lie in (0, 1), e.g. 1e-6")
    n = len(max_values)
    out = {}
    for name, k in max_values.items():
        if delta / n / k >= 0.5:
            raise ConfigError(
                f"vocab_delta={delta!r} is too large for {n} features; use a delta below {n * k / 2}"
            )
        if delta / n / k < MIN_VALUE_DELTA:
            # The noise comes from 52-bit uniforms: each keep probability is exact to ~2^-52,
            # so a per-value delta near that would be overstated.
            raise ConfigError(
                f"vocab_delta={delta!r} is too small for {n} features of up to {k} values a "
                "row: the Laplace noise is drawn on a 52-bit grid, exact to about 2e-16 per "
                f"value. Use a delta of at least {n * k * MIN_VALUE_DELTA:.2g}."
            )
        out[name] = PartitionSelection(epsilon / n, delta / n, k)
    return out


def check_seed(seed: str | int | None) -> None:
    """ConfigError for a fixed seed the SQL key literal cannot hold (a backslash, which Spark
    would unescape and DuckDB would not)."""
    if seed is not None and "\\" in str(seed):
        raise ConfigError(f"vocab_seed={seed!r} must not contain a backslash; e.g. --vocab-seed 1")


def new_seed(seed: str | int | None = None) -> str:
    """The noise key: 128 random bits from the OS, or a fixed seed (reproducible, not private)."""
    if seed is None:
        return secrets.token_hex(16)
    check_seed(seed)
    return f"fixed-{seed}"
