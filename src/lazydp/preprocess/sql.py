"""The one logical pipeline, as SQL statements generated from a FormatSpec and a Dialect.

Relations (each engine registers ``lines(file_idx INT, line_no BIGINT, line STRING)`` first,
line numbers 1-based, one row per physical line, and ``lines_<i>``, file i's rows of it):

``parsed_<i>``  file i split into raw string columns ``r_<col>`` (+ ``n_fields``, ``quotes_ok``)
``checked``     all files, with ``bad_reason`` (NULL for a good row)
``prepared``    good rows the task keeps: identity, ``is_test``, label, dense, canonical values
``vocab_<f>``   (DP vocabulary only) kept values of feature f with ids 1..V
``output``      the final columns; written ordered by (file_idx, line_no)

Blank lines are not rows; in csv formats line 1 is the header. The train/test split is a hash of
the line's content (not of random numbers): ``pmod(md5-hash, 10^6) < round(test_fraction * 10^6)``.
Hashed ids: ``0`` for an empty value, else ``1 + pmod(md5-hash(feature || 0x1f || value), B - 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lazydp.preprocess.dialect import Dialect, dbl, quote
from lazydp.preprocess.spec import Categorical, FormatSpec, raw

SPLIT_RESOLUTION = 1_000_000
# Unrolled ("[^"]*(?:""[^"]*)*" rather than "(?:[^"]|"")*"): Java's regex engine recurses once per
# repetition of a group, so the plain form overflowed Spark's stack on a ~3,000-character field.
CSV_FIELD = '("[^"]*(?:""[^"]*)*"|[^,"]*)'
CSV_LINE = f"{CSV_FIELD}(?:,{CSV_FIELD})*"
IDENTITY = ["file_idx", "line_no"]
TWO_POW_52 = 2**52


def sep() -> str:
    """The separator between a hash's namespace and its value (ASCII unit separator)."""
    return "chr(31)"


def bucket_sql(d: Dialect, feature: str, value: str, buckets: int) -> str:
    """Hashed id of ``value`` (an SQL string expression) for ``feature``."""
    h = d.hash60(f"{quote(feature)} || {sep()} || {value}")
    return f"CASE WHEN {value} = '' THEN CAST(0 AS BIGINT) ELSE 1 + {d.pmod(h, buckets - 1)} END"


def split_sql(d: Dialect, test_fraction: float) -> str:
    threshold = round(test_fraction * SPLIT_RESOLUTION)
    h = d.hash60(f"{quote('split')} || {sep()} || line")
    return f"({d.pmod(h, SPLIT_RESOLUTION)} < {threshold})"


def _unquote(expr: str) -> str:
    return (
        f"CASE WHEN substr({expr}, 1, 1) = '\"' "
        f"THEN replace(substr({expr}, 2, length({expr}) - 2), '\"\"', '\"') ELSE {expr} END"
    )


def parse_file_sql(
    d: Dialect, spec: FormatSpec, file_idx: int, positions: dict[str, int], n_expected: int
) -> str:
    """Raw columns of file ``file_idx``; ``positions`` maps column -> 1-based field index."""
    if spec.has_header:
        fields = d.extract_all("',' || line", "," + CSV_FIELD)
        quotes_ok = d.matches("line", CSV_LINE)
        first_line = 2
    else:
        fields = d.split("line", spec.separator)
        quotes_ok = "TRUE"
        first_line = 1
    cols = []
    for name in [*spec.columns, *spec.optional_columns]:
        if name not in positions:
            cols.append(f"'' AS {raw(name)}")
            continue
        value = f"COALESCE({d.field('f', positions[name])}, '')"
        cols.append(f"{_unquote(value) if spec.has_header else value} AS {raw(name)}")
    return (
        f"SELECT file_idx, line_no, line, {d.size('f')} AS n_fields, "
        f"CAST({n_expected} AS BIGINT) AS n_expected, {quotes_ok} AS quotes_ok, "
        f"{', '.join(cols)} FROM (SELECT file_idx, line_no, line, {fields} AS f "
        f"FROM lines_{file_idx} WHERE line_no >= {first_line} AND line <> '') t"
    )


def checked_sql(d: Dialect, spec: FormatSpec, n_files: int) -> str:
    union = " UNION ALL ".join(f"SELECT * FROM parsed_{i}" for i in range(n_files))
    whens = [
        "WHEN NOT quotes_ok THEN 'malformed quoting'",
        "WHEN n_fields <> n_expected THEN 'expected ' || CAST(n_expected AS STRING) "
        "|| ' fields, got ' || CAST(n_fields AS STRING)",
    ]
    whens += [f"WHEN {cond(d)} THEN {quote(reason)}" for cond, reason in spec.checks]
    return f"SELECT *, CASE {' '.join(whens)} END AS bad_reason FROM ({union}) u"


def prepared_sql(d: Dialect, spec: FormatSpec, test_fraction: float) -> str:
    cols = [
        "CAST(file_idx AS INT) AS file_idx",
        "CAST(line_no AS BIGINT) AS line_no",
        f"{split_sql(d, test_fraction)} AS is_test",
        f"{spec.label(d)} AS label",
    ]
    cols += [f"{expr(d)} AS {name}" for name, expr in spec.dense]
    cols += [f"{c.value(d)} AS v_{c.name}" for c in spec.categorical]
    where = "bad_reason IS NULL" + (f" AND ({spec.filter(d)})" if spec.filter else "")
    return f"SELECT {', '.join(cols)} FROM checked WHERE {where}"


def first_bad_sql() -> str:
    return (
        "SELECT file_idx, line_no, bad_reason FROM checked WHERE bad_reason IS NOT NULL "
        "ORDER BY file_idx, line_no LIMIT 5"
    )


def count_bad_sql() -> str:
    return "SELECT COUNT(*) FROM checked WHERE bad_reason IS NOT NULL"


@dataclass(frozen=True)
class LaplaceSelection:
    """Parameters of one feature's partition selection (see lazydp.preprocess.vocabulary)."""

    scale: float  # Laplace scale b
    threshold: float  # keep a value when count + Laplace(b) > threshold
    seed: str  # secret key of the md5-based noise stream (hex)


def _values_sql(d: Dialect, c: Categorical, source: str) -> str:
    """(file_idx, line_no, value) with one row per distinct value a row holds (train rows)."""
    if not c.multi_valued:
        return f"SELECT file_idx, line_no, v_{c.name} AS value FROM {source}"
    exploded = d.explode_positions(source, f"v_{c.name}", IDENTITY)
    return f"SELECT DISTINCT file_idx, line_no, val AS value FROM ({exploded}) e"


def laplace_noise_sql(d: Dialect, namespace: str, value: str, scale: float) -> str:
    """Laplace(scale) noise by inverse CDF of a keyed md5 uniform in (0, 1)."""
    h = d.hash52(f"{namespace} || {sep()} || {value}")
    u = f"((CAST({h} AS DOUBLE) + {dbl(0.5)}) / {dbl(TWO_POW_52)})"
    b, half, two = dbl(scale), dbl(0.5), dbl(2)
    return f"(CASE WHEN {u} < {half} THEN {b} * ln({two} * {u}) ELSE -{b} * ln({two} - {two} * {u}) END)"


def vocab_sql(d: Dialect, c: Categorical, sel: LaplaceSelection) -> str:
    """Kept values of ``c`` among the train rows, with ids 1..V in value order."""
    namespace = f"{quote(sel.seed)} || {sep()} || {quote(c.name)}"
    noise = laplace_noise_sql(d, namespace, "value", sel.scale)
    train = "(SELECT * FROM prepared WHERE NOT is_test) p"
    counts = (
        f"SELECT value, COUNT(*) AS c FROM ({_values_sql(d, c, train)}) v "
        f"WHERE value <> '' GROUP BY value"
    )
    return (
        f"SELECT value, CAST(row_number() OVER (ORDER BY value) AS BIGINT) AS id FROM ({counts}) k "
        f"WHERE CAST(c AS DOUBLE) + {noise} > {dbl(sel.threshold)}"
    )


def mapped_multi_sql(d: Dialect, c: Categorical, other_id: int) -> str:
    """Per row, the vocabulary ids of a multi-valued feature, in the row's value order."""
    exploded = d.explode_positions("prepared", f"v_{c.name}", IDENTITY)
    ids = (
        f"SELECT e.file_idx, e.line_no, e.pos, CASE WHEN e.val = '' THEN CAST(0 AS BIGINT) "
        f"ELSE COALESCE(vc.id, CAST({other_id} AS BIGINT)) END AS id "
        f"FROM ({exploded}) e LEFT JOIN vocab_{c.name} vc ON e.val = vc.value"
    )
    return (
        f"SELECT file_idx, line_no, {d.ordered_list('id', 'pos')} AS ids FROM ({ids}) x "
        f"GROUP BY file_idx, line_no"
    )


def output_sql(
    d: Dialect, spec: FormatSpec, table_sizes: dict[str, int], dp_vocabulary: bool
) -> str:
    """Final columns (without the split filter): identity, is_test, label, dense, ids."""
    cols = ["p.file_idx", "p.line_no", "p.is_test", "p.label"]
    cols += [f"p.{name}" for name, _ in spec.dense]
    joins = []
    for c in spec.categorical:
        v = f"p.v_{c.name}"
        if not dp_vocabulary:
            b = table_sizes[c.name]
            if c.multi_valued:
                cols.append(f"{d.transform(v, 'g', bucket_sql(d, c.name, 'g', b))} AS {c.name}")
            else:
                cols.append(f"{bucket_sql(d, c.name, v, b)} AS {c.name}")
            continue
        other = table_sizes[c.name] - 1
        if c.multi_valued:
            m = f"m_{c.name}"
            on = f"p.file_idx = {m}.file_idx AND p.line_no = {m}.line_no"
            joins.append(f"LEFT JOIN mapped_{c.name} {m} ON {on}")
            cols.append(f"m_{c.name}.ids AS {c.name}")
        else:
            joins.append(f"LEFT JOIN vocab_{c.name} j_{c.name} ON {v} = j_{c.name}.value")
            cols.append(
                f"CASE WHEN {v} = '' THEN CAST(0 AS BIGINT) "
                f"ELSE COALESCE(j_{c.name}.id, CAST({other} AS BIGINT)) END AS {c.name}"
            )
    return f"SELECT {', '.join(cols)} FROM prepared p {' '.join(joins)}"


def output_columns(spec: FormatSpec) -> list[tuple[str, str]]:
    """(name, SQL type) of the written columns; ``LIST`` is LIST<BIGINT>."""
    cols = [("file_idx", "INT"), ("line_no", "BIGINT"), ("label", "FLOAT")]
    cols += [(name, "FLOAT") for name, _ in spec.dense]
    cols += [(c.name, "LIST" if c.multi_valued else "BIGINT") for c in spec.categorical]
    return cols


def required(d: Dialect, name: str, sql_type: str) -> str:
    """Column ``name`` typed as the Parquet schema says: every column REQUIRED (never NULL by
    construction; COALESCE tells Spark so), list elements OPTIONAL."""
    if sql_type == "LIST":
        empty = "CAST(array() AS ARRAY<BIGINT>)" if d.name == "spark" else "CAST([] AS BIGINT[])"
        return f"COALESCE({d.nullable_elements(name)}, {empty}) AS {name}"
    default = "''" if sql_type == "STRING" else f"CAST(0 AS {sql_type})"
    return f"COALESCE({name}, {default}) AS {name}"


def split_output_sql(d: Dialect, spec: FormatSpec, test: bool) -> str:
    keep = ", ".join(required(d, n, t) for n, t in output_columns(spec))
    return f"SELECT {keep} FROM output WHERE {'' if test else 'NOT '}is_test ORDER BY file_idx, line_no"


def vocab_output_sql(d: Dialect, feature: str) -> str:
    cols = f"{required(d, 'value', 'STRING')}, {required(d, 'id', 'BIGINT')}"
    return f"SELECT {cols} FROM vocab_{feature} ORDER BY id"
