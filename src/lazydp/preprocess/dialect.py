"""SQL spelling differences between the two engines (DuckDB and Spark SQL).

Contract: every method returns an SQL expression string that computes the *same value* in both
dialects for every input (same bytes hashed, same integer arithmetic, same IEEE double operations).
The pipeline (lazydp.preprocess.sql) is written once against this interface; only spelling
differs here. Everything is plain SQL (no UDFs), so Spark runs it in the JVM and DuckDB natively.

Notes on sameness:
* hashes use ``md5`` of the UTF-8 bytes in both engines, read as a 60- or 52-bit unsigned integer;
* regular expressions are matched against the whole string (DuckDB ``regexp_full_match``;
  Spark ``rlike`` anchored, with Java's UNIX_LINES flag so ``$`` means end of input);
* casts are ``TRY_CAST`` so that Spark's ANSI mode never aborts the job on a bad row (bad rows are
  detected by explicit checks first and reported with their line number).
"""

from __future__ import annotations


def dbl(x: float | int) -> str:
    """A DOUBLE literal. A bare ``23.0`` is a DECIMAL in both engines, and Spark divides
    decimals with a rounded scale, so every non-integer constant goes through this. The value is
    parsed from its shortest round-trip string (both engines parse strings correctly rounded)."""
    return f"CAST('{float(x)!r}' AS DOUBLE)"


class Dialect:
    """Base dialect: the spellings both engines share."""

    name = "base"

    def field(self, arr: str, index: int) -> str:
        """1-based element of a list, NULL when out of range."""
        raise NotImplementedError

    def size(self, arr: str) -> str:
        raise NotImplementedError

    def split(self, expr: str, sep_char: str) -> str:
        """Split on a single literal character, keeping empty fields (also trailing ones)."""
        raise NotImplementedError

    def matches(self, expr: str, pattern: str) -> str:
        """TRUE when the whole of ``expr`` matches ``pattern`` (RE2/Java common subset)."""
        raise NotImplementedError

    def hex_to_bigint(self, hex_expr: str) -> str:
        """Unsigned value of a hex string of at most 15 digits, as BIGINT."""
        raise NotImplementedError

    def transform(self, arr: str, var: str, body: str) -> str:
        raise NotImplementedError

    def slice(self, arr: str, length: int) -> str:
        """The first ``length`` elements of a list."""
        raise NotImplementedError

    def pmod(self, a: str, n: str | int) -> str:
        """Non-negative remainder of integer ``a`` modulo ``n`` > 0."""
        return f"pmod({a}, {n})"

    def nullable_elements(self, arr: str) -> str:
        """The same list, typed with nullable elements (the Parquet schema both engines write)."""
        return arr

    def extract_all(self, expr: str, pattern: str) -> str:
        """All matches of capture group 1 of ``pattern`` in ``expr``."""
        return f"regexp_extract_all({expr}, {quote(pattern)}, 1)"

    def hash60(self, expr: str) -> str:
        """A 60-bit non-negative integer from md5 of the string ``expr``."""
        return self.hex_to_bigint(f"substr(md5({expr}), 1, 15)")

    def hash52(self, expr: str) -> str:
        """A 52-bit non-negative integer (exact in a double) from md5 of ``expr``."""
        return self.hex_to_bigint(f"substr(md5({expr}), 1, 13)")

    def explode_positions(self, source: str, arr: str, keys: list[str]) -> str:
        """SELECT keys..., pos (1-based), val FROM source, one row per list element."""
        raise NotImplementedError

    def ordered_list(self, value: str, pos: str) -> str:
        """Aggregate ``value`` into a list ordered by ``pos`` (inside GROUP BY)."""
        raise NotImplementedError


def quote(text: str) -> str:
    """An SQL string literal both engines read identically (no backslashes allowed)."""
    if "\\" in text:
        # Spark unescapes backslashes in literals and DuckDB does not: keep patterns free of them.
        raise ValueError(f"SQL literal {text!r} must not contain backslashes")
    return "'" + text.replace("'", "''") + "'"


class DuckDBDialect(Dialect):
    name = "duckdb"

    def field(self, arr: str, index: int) -> str:
        return f"{arr}[{index}]"

    def size(self, arr: str) -> str:
        return f"len({arr})"

    def split(self, expr: str, sep_char: str) -> str:
        return f"string_split({expr}, chr({ord(sep_char)}))"

    def matches(self, expr: str, pattern: str) -> str:
        return f"regexp_full_match({expr}, {quote(pattern)})"

    def hex_to_bigint(self, hex_expr: str) -> str:
        return f"CAST('0x' || {hex_expr} AS BIGINT)"

    def pmod(self, a: str, n: str | int) -> str:
        return f"((({a}) % {n} + {n}) % {n})"

    def transform(self, arr: str, var: str, body: str) -> str:
        return f"list_transform({arr}, lambda {var}: {body})"

    def slice(self, arr: str, length: int) -> str:
        return f"list_slice({arr}, 1, {length})"

    def explode_positions(self, source: str, arr: str, keys: list[str]) -> str:
        cols = ", ".join(keys)
        return (
            f"SELECT {cols}, generate_subscripts({arr}, 1) AS pos, unnest({arr}) AS val "
            f"FROM {source}"
        )

    def ordered_list(self, value: str, pos: str) -> str:
        return f"list({value} ORDER BY {pos})"


class SparkDialect(Dialect):
    name = "spark"

    def field(self, arr: str, index: int) -> str:
        return f"try_element_at({arr}, {index})"

    def size(self, arr: str) -> str:
        return f"size({arr})"

    def split(self, expr: str, sep_char: str) -> str:
        # Spark's split takes a Java regex; a one-character class is a literal.
        return (
            f"split({expr}, chr({ord(sep_char)}), -1)"
            if sep_char == "\t"
            else (f"split({expr}, {quote('[' + sep_char + ']')}, -1)")
        )

    def matches(self, expr: str, pattern: str) -> str:
        return f"({expr} rlike {quote('(?d)^(?:' + pattern + ')$')})"

    def hex_to_bigint(self, hex_expr: str) -> str:
        return f"CAST(conv({hex_expr}, 16, 10) AS BIGINT)"

    def nullable_elements(self, arr: str) -> str:
        # Spark derives nullability from expressions, DuckDB writes list elements as optional
        return f"transform({arr}, x -> nullif(x, -1))"

    def transform(self, arr: str, var: str, body: str) -> str:
        return f"transform({arr}, {var} -> {body})"

    def slice(self, arr: str, length: int) -> str:
        return f"slice({arr}, 1, {length})"

    def explode_positions(self, source: str, arr: str, keys: list[str]) -> str:
        cols = ", ".join(keys)
        return f"SELECT {cols}, pos + 1 AS pos, val FROM {source} LATERAL VIEW posexplode({arr}) p AS pos, val"

    def ordered_list(self, value: str, pos: str) -> str:
        return f"transform(array_sort(collect_list(struct({pos}, {value}))), s -> s.{value})"
