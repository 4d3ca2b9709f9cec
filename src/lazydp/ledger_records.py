"""The privacy ledger's records: one charged DP-SGD step (``StepEvent``) or one-off release
(``ExternalCharge``), and the checks every record passes both when it is charged and when a
ledger file is read back (a line written any other way proves nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from lazydp._validate import (
    check_choice,
    check_count,
    check_delta,
    check_epsilon,
    check_max_grad_norm,
    check_mode,
    check_noise_multiplier,
    check_sample_rate,
)
from lazydp.accounting import SAMPLERS
from lazydp.errors import ConfigError, PrivacyError

_INT64_LIMIT = 2**63  # step numbers and positions are kept in int64 arrays (ledger.py)


@dataclass(frozen=True)
class StepEvent:
    """One DP-SGD step as charged to the ledger.

    >>> StepEvent(0, sample_rate=0.01, noise_multiplier=1.1, max_grad_norm=1.0,
    ...           mode="lazydp", sampler="poisson").rank
    0
    """

    step: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    mode: str
    sampler: str
    rank: int = 0
    # Shuffled steps: the position of the newest batch the loop had received, and the
    # permutation's lineage (shuffle_epochs.py). Absent (None) for Poisson steps and in older
    # ledgers.
    position: int | None = None
    lineage: str | None = None


@dataclass(frozen=True)
class ExternalCharge:
    """A one-off (epsilon, delta)-DP release outside training, e.g. a DP vocabulary."""

    name: str
    epsilon: float
    delta: float


OPTIONAL = {"position", "lineage"}  # fields a step line may lack (written only when set)


def from_record(record: dict[str, Any], where: str) -> StepEvent | ExternalCharge:
    kind = record.get("kind")
    cls: type[StepEvent] | type[ExternalCharge]
    if kind == "step":
        cls = StepEvent
    elif kind == "external":
        cls = ExternalCharge
    else:
        raise PrivacyError(f"{where}: unknown record kind {kind!r} (expected 'step' or 'external')")
    names = {f.name for f in fields(cls)}
    missing = names - record.keys() - OPTIONAL
    if missing:
        raise PrivacyError(f"{where}: {kind} record lacks {sorted(missing)}")
    # Dropped, a field this version does not know could hold what another version's accounting
    # charges: lazydp before 2026-12-07 read the shuffled steps' position and lineage of
    # today's ledgers that way, and reported fewer epochs than were spent.
    unknown = record.keys() - names - {"kind"}
    if unknown:
        raise PrivacyError(
            f"{where}: {kind} record has {sorted(unknown)}, which this lazydp does not read: "
            "another lazydp version wrote it, and reading the line without them could "
            "under-report the privacy spent. Read the ledger with the lazydp version that "
            "wrote it."
        )
    item = cls(**{k: record[k] for k in names if k in record})
    try:  # the checks charging made: a line written any other way proves nothing
        check_item(item)
    except (ValueError, TypeError) as exc:
        raise PrivacyError(f"{where}: {exc}") from None
    return item


def check_item(item: StepEvent | ExternalCharge) -> None:
    """ConfigError unless ``item`` is a charge lazydp itself would write."""
    if isinstance(item, ExternalCharge):
        if not isinstance(item.name, str) or not item.name:
            raise ConfigError(f"name={item.name!r} must be a non-empty string")
        check_epsilon(item.epsilon)
        check_delta(item.delta)
        return
    for name in ("step", "rank"):
        check_count(name, getattr(item, name))
    check_sample_rate(item.sample_rate)
    check_noise_multiplier(item.noise_multiplier)
    check_max_grad_norm(item.max_grad_norm, allow_inf=item.noise_multiplier == 0)
    check_mode(item.mode)
    check_choice("sampler", item.sampler, SAMPLERS)
    position, lineage = item.position, item.lineage
    if (position is None) != (lineage is None) or (lineage and item.sampler != "shuffle"):
        raise ConfigError(
            f"position={position!r} and lineage={lineage!r} come together, on shuffled steps only"
        )
    if position is not None:
        check_count("position", position)
    # After the type checks: a str position raised TypeError ('>=' not supported) here.
    for name in ("step", "position"):  # kept in int64 arrays (PrivacyLedger._record)
        if (getattr(item, name) or 0) >= _INT64_LIMIT:
            raise ConfigError(f"{name}={getattr(item, name)!r} must be below 2**63")
    if lineage is not None and not (isinstance(lineage, str) and 0 < len(lineage) <= 64):
        raise ConfigError(f"lineage={lineage!r} must be a short non-empty string")
