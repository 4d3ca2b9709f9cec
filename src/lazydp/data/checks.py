"""Validation of a preprocessed split, done when ``ParquetDataset`` opens it (and as it reads).

Contract: every problem raises DataError naming the file, the column (and the row or row group
when known), what was found and what to do. The checks are cheap, never a Python loop per row:

* ``check_schema``: the Arrow schema of each file (the footer): every column metadata.json
  names is present once, with a usable type: label and dense numeric, single-valued ids integer
  (float ids are refused, never truncated), multi-valued ids a list of integers.
* ``check_statistics``: the footer's per-row-group statistics: no nulls (label, dense,
  single-valued ids), labels within [0, 1], no infinite dense value, ids within
  [0, table_size). Used when the split stays on disk, so that such problems surface at open.
* ``check_table``: vectorised Arrow compute over data that is read anyway (the whole split when
  it is loaded into memory, else each row group the first time it is read). It also catches what
  statistics cannot: NaN, labels such as 0.5, null lists or list elements, files without
  statistics.

Labels must be exactly 0 or 1: training uses binary cross-entropy, accuracy and ROC AUC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lazydp.errors import DataError

REBUILD = "rebuild the directory with `lazydp preprocess`"


@dataclass(frozen=True)
class Column:
    """A column the reader needs, as metadata.json describes it."""

    name: str
    role: str  # "label", "dense" or "categorical"
    table_size: int = 0  # categorical only: ids lie in [0, table_size)
    multi_valued: bool = False

    @property
    def what(self) -> str:
        if self.role == "label":
            return "the label"
        if self.role == "dense":
            return "a dense feature"
        kind = "multi-valued" if self.multi_valued else "single-valued"
        return f"a {kind} categorical feature with table_size {self.table_size}"

    @property
    def target_type(self) -> pa.DataType:
        """The type the reader works with (columns of another usable type are cast to it)."""
        if self.role != "categorical":
            return pa.float32()
        return pa.list_(pa.int64()) if self.multi_valued else pa.int64()


def _numeric(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t))


def _is_list(t: pa.DataType) -> bool:
    return bool(pa.types.is_list(t) or pa.types.is_large_list(t))


def check_schema(path: Path, schema: pa.Schema, columns: list[Column]) -> None:
    """Every needed column is present once and has a usable type (see the module contract)."""
    for c in columns:
        found = schema.get_all_field_indices(c.name)
        if not found:
            raise DataError(
                f"{path}: column {c.name!r} is missing; metadata.json lists it as {c.what}, so "
                f"the file does not belong to this directory or is damaged: {REBUILD}"
            )
        if len(found) > 1:
            raise DataError(f"{path}: column {c.name!r} appears {len(found)} times; {REBUILD}")
        t = schema.field(found[0]).type
        problem = _type_problem(c, t)
        if problem:
            raise DataError(f"{path}: column {c.name!r} ({c.what}) has type {t}; {problem}")


def _type_problem(c: Column, t: pa.DataType) -> str | None:
    if c.role == "label":
        if _numeric(t):
            return None
        return f"labels must be numbers 0 or 1 (float or integer): {REBUILD}"
    if c.role == "dense":
        if _numeric(t):
            return None
        return f"dense features must be numbers (float or integer): {REBUILD}"
    if c.multi_valued:
        if not _is_list(t):
            return (
                "metadata.json says multi-valued, which needs a list of integer ids per row: "
                f"{REBUILD}"
            )
        t = t.value_type
    elif _is_list(t):
        return f"metadata.json says single-valued, which needs one integer id per row: {REBUILD}"
    if pa.types.is_integer(t):
        return None
    if pa.types.is_floating(t):
        return (
            "category ids must be integers (a float id such as 12.5 is not an embedding row and "
            f"is never rounded or truncated): {REBUILD}"
        )
    return f"category ids must be integers: {REBUILD}"


def leaf_indices(pf: pq.ParquetFile, columns: list[Column]) -> dict[str, int]:
    """Parquet leaf column index of each needed column (the list element for list columns)."""
    paths = {pf.schema.column(i).path: i for i in range(len(pf.schema))}
    out = {}
    for c in columns:
        if c.name in paths:
            out[c.name] = paths[c.name]
            continue
        leaves = [i for p, i in paths.items() if p.startswith(c.name + ".")]
        if len(leaves) == 1:
            out[c.name] = leaves[0]
    return out


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x))


def check_statistics(path: Path, pf: pq.ParquetFile, columns: list[Column]) -> None:
    """Nulls and value ranges from the footer's row-group statistics, where the writer kept them.

    For list columns the statistics describe the elements; their null count also counts empty
    lists, so only the element range is checked here (nulls are left to ``check_table``).
    """
    meta = pf.metadata
    leaves = leaf_indices(pf, columns)
    first = 0
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        where = f"row group {g} (rows {first}-{first + rg.num_rows - 1} of the file)"
        first += rg.num_rows
        if rg.num_rows == 0:
            continue
        for c in columns:
            if c.name not in leaves:
                continue
            stats = rg.column(leaves[c.name]).statistics
            if stats is None:
                continue
            if not c.multi_valued and stats.has_null_count and stats.null_count > 0:
                raise DataError(
                    f"{path}, {where}: column {c.name!r} ({c.what}) has {stats.null_count} null "
                    f"value(s); {_null_fix(c)}"
                )
            if not stats.has_min_max:
                continue
            lo, hi = stats.min, stats.max
            if not (_finite_number(lo) or isinstance(lo, bool)) or not (
                _finite_number(hi) or isinstance(hi, bool)
            ):
                continue  # NaN or an odd logical type: left to check_table
            if isinstance(lo, float):
                lo, hi = lo + 0.0, hi + 0.0  # writers store a zero minimum as -0.0
            problem = _range_problem(c, lo, hi)
            if problem:
                raise DataError(f"{path}, {where}: column {c.name!r} {problem}; {_fix(c)}")


def _range_problem(c: Column, lo: Any, hi: Any) -> str | None:
    if c.role == "label":
        if lo < 0 or hi > 1:
            return f"holds labels from {lo} to {hi}; labels must be 0 or 1"
        return None
    if c.role == "dense":
        if math.isinf(lo) or math.isinf(hi):
            return f"holds an infinite value (range {lo} to {hi}); dense features must be finite"
        if max(abs(lo), abs(hi)) > _FLOAT32_MAX:
            return (
                f"holds values from {lo} to {hi}, past float32's range (|x| <= 3.4e38: the "
                "model reads dense features as float32, where they would become infinite)"
            )
        return None
    if lo < 0 or hi >= c.table_size:
        return (
            f"holds ids from {lo} to {hi}, but metadata.json gives table_size {c.table_size} "
            f"(ids must lie in [0, {c.table_size - 1}])"
        )
    return None


def _fix(c: Column) -> str:
    if c.role == "categorical":
        return f"the Parquet files and metadata.json do not match: {REBUILD}"
    return f"fix the data or {REBUILD}"


def _null_fix(c: Column) -> str:
    if c.role == "categorical":
        return f"ids must not be null (0 is the reserved id of a missing value): {REBUILD}"
    return f"{c.role} values must not be null: {REBUILD}"


def check_table(path: Path, table: pa.Table, columns: list[Column], first_row: int) -> None:
    """Vectorised check of rows read from ``path``; ``first_row`` is the file row of row 0."""
    for c in columns:
        col = table.column(c.name)
        if c.multi_valued:
            _check_list(path, c, col, first_row)
            continue
        if col.null_count:
            _bad_row(path, c, col, pc.is_null(col), first_row, _null_fix(c))
        if c.role == "label":
            # Arrow has no is_in for float16; float32 holds every float16 exactly
            values = col.cast(pa.float32()) if pa.types.is_float16(col.type) else col
            ok = pc.is_in(values, value_set=pa.array([0, 1]).cast(values.type))
            bad = pc.invert(ok)
            if pc.any(bad).as_py():
                _bad_row(path, c, col, bad, first_row, f"labels must be 0 or 1; {_fix(c)}")
        elif c.role == "dense":
            if pa.types.is_floating(col.type):
                bad = pc.invert(pc.is_finite(col))
                if col.type.bit_width > 32:  # read as float32: larger values would become inf
                    bad = pc.or_(bad, pc.greater(pc.abs(col), _FLOAT32_MAX))
                if pc.any(bad).as_py():
                    msg = (
                        "dense features must be finite (no NaN or infinity) and within float32's "
                        f"range (|x| <= 3.4e38: the model reads them as float32); {_fix(c)}"
                    )
                    _bad_row(path, c, col, bad, first_row, msg)
        else:
            _check_ids(path, c, col, col, None, first_row)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_list(path: Path, c: Column, col: pa.ChunkedArray, first_row: int) -> None:
    if col.null_count:
        msg = f"a row without values holds [0] (the missing id), never null: {REBUILD}"
        _bad_row(path, c, col, pc.is_null(col), first_row, msg)
    flat = pc.list_flatten(col)
    if flat.null_count:
        arr = col.combine_chunks()
        parents = np.asarray(pc.list_parent_indices(arr).to_numpy(zero_copy_only=False))
        nulls = np.asarray(pc.is_null(pc.list_flatten(arr)).to_numpy(zero_copy_only=False))
        row = int(parents[np.flatnonzero(nulls)[0]])
        raise DataError(
            f"{path}, row {first_row + row} (0-based): column {c.name!r} ({c.what}) holds a null "
            f"id in its list; {_null_fix(c)}"
        )
    _check_ids(path, c, flat, col, "list", first_row)


def _check_ids(
    path: Path,
    c: Column,
    values: pa.ChunkedArray | pa.Array,
    col: pa.ChunkedArray,
    kind: str | None,
    first_row: int,
) -> None:
    if len(values) == 0:
        return
    mm = pc.min_max(values)
    lo, hi = mm["min"].as_py(), mm["max"].as_py()
    if lo is None or (lo >= 0 and hi < c.table_size):
        return
    size = c.table_size
    msg = (
        f"ids must lie in [0, {size - 1}] (metadata.json gives table_size {size}); the Parquet "
        f"files and metadata.json do not match: {REBUILD}"
    )
    if kind is None:
        if pa.types.is_unsigned_integer(col.type):  # above 2^63 no int64 0 compares with it
            bad = pc.greater_equal(col, pa.scalar(size, col.type))  # size <= hi: it fits
        else:
            bad = pc.or_(pc.less(col, 0), pc.greater_equal(col, size))
        _bad_row(path, c, col, bad, first_row, msg)
    arr = col.combine_chunks()
    flat = np.asarray(pc.list_flatten(arr).to_numpy(zero_copy_only=False))
    parents = np.asarray(pc.list_parent_indices(arr).to_numpy(zero_copy_only=False))
    i = int(np.flatnonzero((flat < 0) | (flat >= size))[0])
    raise DataError(
        f"{path}, row {first_row + int(parents[i])} (0-based): column {c.name!r} ({c.what}) holds "
        f"id {int(flat[i])}; {msg}"
    )


def _bad_row(
    path: Path, c: Column, col: pa.ChunkedArray, bad: Any, first_row: int, msg: str
) -> NoReturn:
    if isinstance(bad, pa.ChunkedArray):
        bad = bad.combine_chunks()
    mask = np.asarray(pc.fill_null(bad, False).to_numpy(zero_copy_only=False), dtype=bool)
    i = int(np.flatnonzero(mask)[0])
    value = col[i].as_py()
    shown = "null" if value is None else repr(value)
    raise DataError(
        f"{path}, row {first_row + i} (0-based): column {c.name!r} ({c.what}) is {shown}; {msg}"
    )
