"""The privacy report: what was spent, how it was accounted, and every caveat that applies.

Epsilon always comes from the ledger (never from a counter the training loop keeps). A run on
shuffled fixed-size batches reports the honest no-amplification figure as ``epsilon`` and shows the
Poisson figure only as what it would have been. Seeded runs and test noise overrides are named.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

#: Deltas above this (yet below 1/N) get a LARGE DELTA caveat: only tiny data sets need them.
LARGE_DELTA = 1e-3

# lazydp.accounting (dp_accounting, scipy) and lazydp.loader (torch) are imported where they
# are used: json_text serves every command's --json line, `lazydp preprocess` included, which
# needs neither (2 s of imports).
if TYPE_CHECKING:
    from lazydp.ledger import PrivacyLedger
    from lazydp.optim.dp_optimizer import PrivacyParams


def json_text(value: Any, indent: int | None = None) -> str:
    """``value`` as standard JSON, for report files and ``--json`` lines: a NaN or infinite
    number is written as null. Python's ``NaN`` and ``Infinity`` are no JSON: a test split of
    one class (AUC undefined) made report.json unreadable to strict parsers (JavaScript, Go).

    >>> json_text({"auc": float("nan"), "epsilon": 1.5})
    '{"auc": null, "epsilon": 1.5}'
    """
    return json.dumps(_finite(value), indent=indent, default=str, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def steps_text(n: int, adjective: str = "") -> str:
    """A count of steps as a sentence says it: ``"1 step"``, ``"440 charged steps"``."""
    noun = "step" if n == 1 else "steps"
    return f"{n} {adjective} {noun}" if adjective else f"{n} {noun}"


@dataclass
class PrivacyReport:
    """Epsilon at delta by PLD (the guarantee) and RDP (for comparison), plus caveats."""

    delta: float
    epsilon: float
    epsilon_rdp: float
    steps: int
    mode: str
    sampler: str
    noise_multiplier: float | None
    max_grad_norm: float | None
    sample_rate: float | None
    epsilon_if_poisson: float | None = None
    external_epsilon: float = 0.0
    external_delta: float = 0.0
    caveats: list[str] = field(default_factory=list)

    @property
    def private(self) -> bool:
        # An unbounded epsilon comes with its own NOT PRIVATE caveat (build_report).
        return self.mode != "sgd" and not any(c.startswith("NOT PRIVATE") for c in self.caveats)

    def to_dict(self) -> dict[str, Any]:
        # JSON has no infinity: a non-private run's unbounded epsilon is written as null
        # (next to "private": false), not as the non-standard ``Infinity``.
        out = asdict(self) | {"private": self.private}
        for key in ("epsilon", "epsilon_rdp"):
            if not math.isfinite(out[key]):
                out[key] = None
        return out

    def _steps_line(self) -> str:
        if self.mode == "sgd" and self.steps == 0:
            # sgd charges nothing: "0 steps" beside the trained steps would read as a bug.
            return "no steps in the privacy ledger (sgd is not private)"
        return steps_text(self.steps)

    def __str__(self) -> str:
        from lazydp.accounting import pld_label

        lines = [
            f"privacy: epsilon = {self.epsilon:.4g} at delta = {self.delta:.3g} "
            f"({pld_label(self.epsilon, self.epsilon_rdp)}; RDP gives {self.epsilon_rdp:.4g})",
            f"  mode {self.mode}, sampler {self.sampler}, {self._steps_line()}, "
            f"noise multiplier {self.noise_multiplier}, max grad norm {self.max_grad_norm}, "
            f"sample rate {self.sample_rate}",
        ]
        if self.epsilon_if_poisson is not None:
            lines.append(
                f"  Poisson epsilon would be {self.epsilon_if_poisson:.4g}, but it does NOT apply: "
                "batches were shuffled fixed-size, so the figure above has no sampling amplification"
            )
        if self.external_epsilon:
            lines.append(
                f"  includes preprocessing cost epsilon {self.external_epsilon:.4g}, "
                f"delta {self.external_delta:.1e} (basic composition)"
            )
        lines += [f"  ! {c}" for c in self.caveats]
        return "\n".join(lines)


def build_report(
    ledger: PrivacyLedger,
    delta: float,
    privacy: PrivacyParams | None,
    *,
    seeded: bool,
    override: str | None,
    unsampled_steps: int = 0,
    short_steps: int = 0,
) -> PrivacyReport:
    """Assemble the report from the ledger (the only source of truth for what was spent)."""
    from lazydp.accounting import epsilon_report
    from lazydp.loader import SHORT_ROWS

    caveats: list[str] = []
    mode = privacy.mode if privacy else "sgd"
    sampler = privacy.sampler if privacy else "poisson"
    counts = ledger.mechanism_counts()
    ext_eps, ext_delta = ledger.external_cost()
    if mode == "sgd":
        caveats.append(
            "NOT PRIVATE: mode 'sgd' is the non-private reference (no clipping, no noise)"
        )
    if override:
        caveats.append(f"NOT PRIVATE: test noise override {override} was active")
    if seeded:
        caveats.append("reproducible run (explicit seed): for research, not for production")
    if sampler == "shuffle" and mode != "sgd":
        caveats.append(
            "SHUFFLE NEIGHBOURS: with fixed-size shuffled batches the figure holds for data sets "
            "that differ in one example's contribution being zeroed; for neighbours that "
            "replace one example the sensitivity doubles (lazydp epsilon with half the noise "
            "multiplier gives that figure)"
        )
    if unsampled_steps > 0:
        # The accountant assumes each batch was drawn by the engine's sampler; a batch from
        # elsewhere (the original DataLoader, a hand-built tensor) gets no amplification.
        caveats.append(
            f"UNVERIFIED SAMPLING: {unsampled_steps} step(s) trained on more batches than the "
            "private data loader drew; epsilon assumes every batch came from it. Iterate the "
            "loader make_private returned."
        )
    if short_steps > 0:
        caveats.append(f"FEWER ROWS THAN EXAMPLES in {short_steps} step(s): {SHORT_ROWS}")
    if privacy is not None and privacy.sample_rate > 0:
        n = privacy.expected_batch_size / privacy.sample_rate  # the dataset size N
        if ledger.total_delta(delta) * n >= 1:
            # Releasing one random example in full is (0, 1/N)-DP: at such a delta the
            # guarantee allows leaking whole records.
            caveats.append(
                f"WEAK DELTA: delta {ledger.total_delta(delta):.3g} >= 1/N = {1 / n:.3g}; a "
                "mechanism that publishes a random example in full meets it. Use delta well "
                f"below 1/N, e.g. lazydp.accounting.default_delta({round(n)})."
            )
        elif ledger.total_delta(delta) > LARGE_DELTA:
            # Below 1/N, yet large in itself: the data set is tiny (default_delta(N) > 1e-3 for
            # N < 100), and with probability delta the guarantee may fail outright.
            caveats.append(
                f"LARGE DELTA: delta {ledger.total_delta(delta):.3g} > {LARGE_DELTA:g} (N = "
                f"{round(n)}); with that probability the guarantee may not hold at all. A data "
                "set this small cannot have a delta both well below 1/N and small: report the "
                "figure with that in mind, or train on more data."
            )
    if mode == "sgd":
        # Nothing was clipped or noised, so no epsilon bounds the release: infinite, not the
        # 0 an empty ledger would give.
        eps = eps_rdp = math.inf
        eps_poisson = None
    elif counts:
        # Training is accounted at ``delta``; one-off external charges (e.g. a DP vocabulary)
        # add by basic composition, so the stated guarantee is at ledger.total_delta(delta).
        rep = epsilon_report(counts, delta)
        eps, eps_rdp, eps_poisson = rep.pld, rep.rdp, rep.pld_as_if_poisson
    else:
        eps = eps_rdp = 0.0
        eps_poisson = None
    if mode != "sgd" and not math.isfinite(eps):
        caveats.append(
            "NOT PRIVATE: epsilon is unbounded (a step ran with noise multiplier 0, so its "
            "gradient was released without noise)"
        )
    sigmas = sorted({c.noise_multiplier for c in counts})
    rates = sorted({c.sample_rate for c in counts})
    if len(sigmas) > 1 or len(rates) > 1:
        # A resumed run with other settings: the accountant composes every group of steps,
        # while the noise multiplier and sample rate below are the last run's.
        caveats.append(
            f"MIXED SETTINGS: the ledger's steps ran at noise multipliers {sigmas} and sample "
            f"rates {rates}; epsilon composes them all, the settings shown are the last run's"
        )
    return PrivacyReport(
        delta=ledger.total_delta(delta),
        epsilon=eps + ext_eps,
        epsilon_rdp=eps_rdp + ext_eps,
        steps=ledger.steps,
        mode=mode,
        sampler=sampler,
        noise_multiplier=privacy.noise_multiplier if privacy else None,
        max_grad_norm=privacy.max_grad_norm if privacy else None,
        sample_rate=privacy.sample_rate if privacy else None,
        epsilon_if_poisson=eps_poisson,
        external_epsilon=ext_eps,
        external_delta=ext_delta,
        caveats=caveats,
    )
