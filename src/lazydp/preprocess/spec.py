"""The three raw formats, described once and turned into SQL for either engine.

Contract (what the output of every format is made of):
* ``label``: FLOAT 0/1. ``dense``: FLOAT columns. ``categorical``: BIGINT ids (single-valued) or
  LIST<BIGINT> (multi-valued), id 0 reserved for a missing (empty) value.
* Each feature is an SQL expression over the raw string columns ``r_<name>``; raw columns come
  from a tab split (criteo, by position) or an RFC 4180 comma split (csv formats, by header name).
* ``checks`` are (condition that makes a row bad, reason) pairs, evaluated in order; the first one
  that holds names the row's problem. ``filter`` drops good rows the task excludes (not bad rows).

Formats:
* ``criteo``: label, I1..I13 (integers, dense: log(max(x, 0) + 1), empty -> 0), C1..C26 (hex
  strings, lower-cased before hashing). Default 2^20 hash buckets per categorical feature.
* ``acs``: folktables ACSEmployment: 16 categorical codes (blank = missing id 0, codes compared as
  integers so "01" == "1"), label ESR == 1; dense AGEP / 100. Keeps 16 < AGEP < 90 and, when a
  PWGTP column exists, PWGTP >= 1 (folktables' ``employment_filter``, which its
  ACSEmploymentFiltered problem applies). Default 2^12 buckets.
* ``movielens``: label rating >= 4; userId, movieId categorical (2^16 buckets), genres split on
  ``|``, at most MAX_GENRES per row (2^10 buckets); dense: hour of day / 23, day of week / 6
  (Monday = 0, UTC) and years since 1995 / 25, all from the unix timestamp with integer arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from lazydp.preprocess.dialect import Dialect, dbl

INT_PATTERN = "-?[0-9]{1,18}"
HEX_PATTERN = "[0-9a-fA-F]{1,16}"
RATING_PATTERN = "[0-9]{1,3}([.][0-9]{1,6})?"
MAX_GENRES = 10  # contribution bound per row for the pooled genres feature

Expr = Callable[[Dialect], str]


@dataclass(frozen=True)
class Categorical:
    name: str
    value: Expr  # canonical string ('' = missing); for multi-valued: a list of strings
    multi_valued: bool = False
    max_values: int = 1  # contribution bound per row (number of values)


@dataclass(frozen=True)
class FormatSpec:
    name: str
    separator: str  # "\t" (split by position) or "," (RFC 4180, by header name)
    columns: list[str]  # raw columns, in file order for headerless formats
    checks: list[tuple[Expr, str]]
    label: Expr
    dense: list[tuple[str, Expr]]
    categorical: list[Categorical]
    default_buckets: dict[str, int]
    optional_columns: list[str] = field(default_factory=list)
    filter: Expr | None = None

    @property
    def has_header(self) -> bool:
        return self.separator == ","


def raw(name: str) -> str:
    return f"r_{name}"


def _is_int(d: Dialect, col: str) -> str:
    return d.matches(raw(col), INT_PATTERN)


def _int(col: str) -> str:
    return f"TRY_CAST({raw(col)} AS BIGINT)"


def _bad_optional(col: str, pattern: str, what: str) -> tuple[Expr, str]:
    """A check: non-empty value that does not match ``pattern``."""
    return (lambda d: f"({raw(col)} <> '' AND NOT {d.matches(raw(col), pattern)})", f"{col} {what}")


def _bad_required(col: str, pattern: str, what: str) -> tuple[Expr, str]:
    return (lambda d: f"(NOT {d.matches(raw(col), pattern)})", f"{col} {what}")


def _log1p_int(col: str) -> Expr:
    return lambda d: (
        f"CAST(CASE WHEN {raw(col)} = '' THEN {dbl(0)} "
        f"ELSE ln(CAST(greatest({_int(col)}, 0) AS DOUBLE) + {dbl(1)}) END AS FLOAT)"
    )


def _lower(col: str) -> Expr:
    # hex strings are case-insensitive: "0A1B" and "0a1b" are one value
    return lambda d: f"lower({raw(col)})"


def _code(col: str) -> Expr:
    # integer codes compared as integers so that "01" and "1" are the same value
    return lambda d: f"CASE WHEN {raw(col)} = '' THEN '' ELSE CAST({_int(col)} AS STRING) END"


def _criteo() -> FormatSpec:
    ints = [f"I{i}" for i in range(1, 14)]
    cats = [f"C{i}" for i in range(1, 27)]
    checks: list[tuple[Expr, str]] = [
        (lambda d: f"(NOT {d.matches(raw('label'), '[01]')})", "label is not 0 or 1")
    ]
    checks += [_bad_optional(c, INT_PATTERN, "is not an integer") for c in ints]
    checks += [_bad_optional(c, HEX_PATTERN, "is not a hex string") for c in cats]
    return FormatSpec(
        name="criteo",
        separator="\t",
        columns=["label", *ints, *cats],
        checks=checks,
        label=lambda d: f"CAST({_int('label')} AS FLOAT)",
        dense=[(c, _log1p_int(c)) for c in ints],
        categorical=[Categorical(c, _lower(c)) for c in cats],
        default_buckets={c: 1 << 20 for c in cats},
    )


ACS_FEATURES = [
    "AGEP", "SCHL", "MAR", "RELP", "DIS", "ESP", "CIT", "MIG",
    "MIL", "ANC", "NATIVITY", "DEAR", "DEYE", "DREM", "SEX", "RAC1P",
]  # fmt: skip


def _acs() -> FormatSpec:
    checks = [_bad_required("AGEP", INT_PATTERN, "is not an integer")]
    checks += [_bad_optional(c, INT_PATTERN, "is not an integer code") for c in ACS_FEATURES[1:]]
    checks += [_bad_optional(c, INT_PATTERN, "is not an integer code") for c in ["ESR", "PWGTP"]]
    return FormatSpec(
        name="acs",
        separator=",",
        columns=[*ACS_FEATURES, "ESR"],
        optional_columns=["PWGTP"],
        checks=checks,
        label=lambda d: (
            f"CAST(CASE WHEN {raw('ESR')} <> '' AND {_int('ESR')} = 1 THEN 1 ELSE 0 END AS FLOAT)"
        ),
        dense=[("AGEP_NUM", lambda d: f"CAST({_int('AGEP')} / {dbl(100)} AS FLOAT)")],
        categorical=[Categorical(c, _code(c)) for c in ACS_FEATURES],
        default_buckets={c: 1 << 12 for c in ACS_FEATURES},
        filter=lambda d: (
            f"{_int('AGEP')} > 16 AND {_int('AGEP')} < 90 "
            f"AND ({raw('PWGTP')} = '' OR {_int('PWGTP')} >= 1)"
        ),
    )


def _movielens() -> FormatSpec:
    ts = _int("timestamp")

    def sec_of_day(d: Dialect) -> str:
        return d.pmod(ts, 86400)

    def days(d: Dialect) -> str:
        return f"CAST(({ts} - {sec_of_day(d)}) / {dbl(86400)} AS BIGINT)"

    return FormatSpec(
        name="movielens",
        separator=",",
        columns=["userId", "movieId", "rating", "timestamp", "genres"],
        checks=[
            _bad_required("userId", INT_PATTERN, "is not an integer"),
            _bad_required("movieId", INT_PATTERN, "is not an integer"),
            _bad_required("rating", RATING_PATTERN, "is not a rating"),
            _bad_required("timestamp", INT_PATTERN, "is not an integer"),
        ],
        label=lambda d: (
            f"CAST(CASE WHEN TRY_CAST({raw('rating')} AS DOUBLE) >= {dbl(4)} THEN 1 ELSE 0 END AS FLOAT)"
        ),
        dense=[
            (
                "hour_of_day",
                lambda d: f"CAST(floor({sec_of_day(d)} / {dbl(3600)}) / {dbl(23)} AS FLOAT)",
            ),
            # 1970-01-01 was a Thursday (3 with Monday = 0)
            ("day_of_week", lambda d: f"CAST({d.pmod(days(d) + ' + 3', 7)} / {dbl(6)} AS FLOAT)"),
            ("years_since_1995", lambda d: f"CAST(({ts} - 788918400) / {dbl(788940000)} AS FLOAT)"),
        ],
        categorical=[
            Categorical("userId", _code("userId")),
            Categorical("movieId", _code("movieId")),
            Categorical(
                "genres",
                lambda d: d.slice(d.split(raw("genres"), "|"), MAX_GENRES),
                multi_valued=True,
                max_values=MAX_GENRES,
            ),
        ],
        default_buckets={"userId": 1 << 16, "movieId": 1 << 16, "genres": 1 << 10},
    )


FORMATS: dict[str, Callable[[], FormatSpec]] = {
    "criteo": _criteo,
    "acs": _acs,
    "movielens": _movielens,
}


def get_format(name: str) -> FormatSpec:
    """The spec of a raw format. Example: ``get_format("criteo").columns[0] == "label"``."""
    from lazydp.errors import ConfigError

    if name not in FORMATS:
        raise ConfigError(f"format={name!r} is unknown; use one of {sorted(FORMATS)}")
    return FORMATS[name]()
