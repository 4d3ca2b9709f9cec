"""Training batches from a ``lazydp preprocess`` directory, fetched by global row index.

Contract:
* ``ParquetDataset(root, split)`` reads ``root/<split>/*.parquet`` (in file-name order, which is
  the rows' order) and ``root/metadata.json``; ``num_rows`` is global (from the metadata and
  checked against the Parquet footers), ``table_sizes`` include the reserved ids.
* ``batch(indices)`` returns the rows at those global indices, in the order given (repeats
  allowed), as a ``Batch``; an empty index list gives a valid batch with B = 0. Out-of-range
  indices raise InputError. This is what Poisson sampling needs: any subset, any size.
* Memory: splits whose needed columns take less than ``memory_limit_bytes`` once read (float32
  and int64 values, estimated from the footers; default: a quarter of the memory available at
  open, divided among the ranks on this machine, at least 512 MiB) are loaded once (fast path);
  larger ones stay on disk and only the row groups holding requested rows are read (footers and
  row-group boundaries are cached; a small LRU keeps recently used row groups).
* Bad data raise DataError naming the file and column, never a pyarrow/json traceback and never
  silently wrong batches (lazydp.data.checks): opening checks metadata.json, that every file is
  readable Parquet with the columns and types it names (integer ids, numeric label and dense),
  the row counts, and the values (labels 0/1, finite dense, no nulls, ids within the tables):
  all rows when the split is loaded, else the footer statistics at open and each row group when
  it is first read. A 'train' split with 0 rows is refused (nothing to train on); other splits
  may be empty.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

from lazydp.data.checks import (
    REBUILD,
    Column,
    check_schema,
    check_statistics,
    check_table,
    leaf_indices,
)
from lazydp.errors import DataError, InputError

#: The in-memory limit is this share of the memory available at open (never below the
#: floor): sampling from disk re-reads most row groups at every step (a Poisson batch lands
#: in nearly all of them: 0.9-1.8 s a step on a 3M-row split against 5 ms loaded), so a
#: split that fits comfortably is loaded; the rest of memory is left to the model.
MEMORY_SHARE = 0.25
DEFAULT_MEMORY_LIMIT = 512 << 20  # the floor
ROW_GROUP_CACHE = 8


@dataclass
class Batch:
    """``dense (B, n_dense) float32``, ``sparse``: per categorical feature ``(ids int64 flat,
    offsets int64 (B,))`` (EmbeddingBag input; single-valued features have offsets arange(B)),
    ``label (B,) float32``. Unpacks like the synthetic batches: ``dense, sparse, label = batch``.
    """

    dense: Tensor
    sparse: list[tuple[Tensor, Tensor]]
    label: Tensor

    def __iter__(self) -> Iterator[Any]:
        return iter((self.dense, self.sparse, self.label))

    def __len__(self) -> int:
        return int(self.label.shape[0])


class ParquetDataset:
    """Random access to a preprocessed split.

    Example::

        ds = ParquetDataset("out/movielens", "train")
        b = ds.batch([0, 5, 2])
        assert b.dense.shape == (3, len(ds.dense_names)) and len(b.sparse) == len(ds.table_sizes)
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        memory_limit_bytes: int | None = None,
        in_memory: bool | None = None,
    ) -> None:
        from lazydp.preprocess.output import read_metadata

        self.root = Path(root)
        self.metadata = read_metadata(self.root)  # DataError unless complete and well-formed
        if split not in self.metadata["rows"]:
            raise InputError(f"split={split!r}; use one of {sorted(self.metadata['rows'])}")
        self.split = split
        schema = self.metadata["schema"]
        self.schema: dict[str, Any] = schema
        self.label_name: str = schema.get("label", "label")
        self.dense_names: list[str] = list(schema["dense"])
        self.sparse_names: list[str] = [c["name"] for c in schema["categorical"]]
        self.multi_valued = {c["name"]: bool(c["multi_valued"]) for c in schema["categorical"]}
        self.table_sizes: dict[str, int] = {
            c["name"]: int(c["table_size"]) for c in schema["categorical"]
        }
        self.columns = [self.label_name, *self.dense_names, *self.sparse_names]
        self._checks = [
            Column(self.label_name, "label"),
            *(Column(n, "dense") for n in self.dense_names),
            *(
                Column(n, "categorical", self.table_sizes[n], self.multi_valued[n])
                for n in self.sparse_names
            ),
        ]
        self.num_rows = int(self.metadata["rows"][split])
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise DataError(
                f"{split_dir} is missing (metadata.json says the {split!r} split has "
                f"{self.num_rows} rows); the directory is incomplete: {REBUILD}"
            )
        self.files = sorted(split_dir.glob("*.parquet"))
        if not self.files and self.num_rows:
            raise DataError(
                f"{split_dir} holds no *.parquet files but metadata.json says {self.num_rows} "
                f"rows; the directory is incomplete: {REBUILD}"
            )
        self._parquet = [_open_parquet(f) for f in self.files]
        # global start row of every (file, row group), for bisect; and its first row in its file
        self._groups: list[tuple[int, int]] = []
        self._starts: list[int] = []
        self._file_row: dict[tuple[int, int], int] = {}
        total, size = 0, 0
        for fi, pf in enumerate(self._parquet):
            check_schema(self.files[fi], pf.schema_arrow, self._checks)
            meta = pf.metadata
            leaves = leaf_indices(pf, self._checks)
            in_file = 0
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                self._groups.append((fi, g))
                self._starts.append(total)
                self._file_row[(fi, g)] = in_file
                total += rows
                in_file += rows
                size += self._loaded_bytes(meta.row_group(g), leaves)
        if total != self.num_rows:
            raise DataError(
                f"{split_dir}: Parquet files hold {total} rows but metadata.json says "
                f"{self.num_rows}; the directory is damaged, run the preprocessing again"
            )
        if self.num_rows == 0 and split == "train":
            raise DataError(
                f"{split_dir}: the 'train' split has 0 rows, so there is nothing to train on; "
                "preprocess input that holds data rows (not only a header line, not only bad "
                "or filtered-out rows)"
            )
        if memory_limit_bytes is None:
            memory_limit_bytes = default_memory_limit()
        self.in_memory = size <= memory_limit_bytes if in_memory is None else in_memory
        # Loaded: one single-chunk table per file and its first global row. Not one table of
        # all files: take() on a column of several chunks concatenates them first, a copy of
        # the whole split at every batch (120 ms per 4096 rows of a 3M-row split, not 5 ms).
        self._parts: list[pa.Table] | None = None
        self._part_starts: list[int] = []
        self._checked: set[tuple[int, int]] = set()  # row groups that passed check_table
        if self.in_memory:
            self._parts, start = [], 0
            for f, pf in zip(self.files, self._parquet):
                t = _read(f, partial(pf.read, columns=self.columns))
                check_table(f, t, self._checks, 0)
                self._parts.append(self._canonical(t).combine_chunks())
                self._part_starts.append(start)
                start += t.num_rows
        else:
            for f, pf in zip(self.files, self._parquet):
                check_statistics(f, pf, self._checks)
            # Statistics record no NaN, label values or list elements: every row group is read
            # and checked once now, one at a time, so that bad data stops the run before
            # anything is charged, not at the step that first reads it (budget lost).
            for key in self._groups:
                self._read_checked(key)
        self._cache: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()

    def __len__(self) -> int:
        return self.num_rows

    def _loaded_bytes(self, rg: pq.RowGroupMetaData, leaves: dict[str, int]) -> int:
        """Bytes row group ``rg``'s needed columns take in memory with the reader's types.

        Not the footer's ``total_byte_size``: that is the encoded size (dictionary, run
        lengths, bit packing; extra columns included), which can be 20x below the loaded size
        of low-cardinality ids, so a split far over the memory limit was loaded whole.
        """
        size = 0
        for c in self._checks:
            if c.multi_valued:  # int64 elements (leaf values, empty lists count one) + offsets
                leaf = leaves.get(c.name)  # None: its leaf is ambiguous; count one id a row
                values = rg.num_rows if leaf is None else rg.column(leaf).num_values
                size += 8 * values + 4 * (rg.num_rows + 1)
            else:
                size += c.target_type.bit_width // 8 * rg.num_rows
        return size

    def _empty(self) -> pa.Table:
        return pa.schema([(c.name, c.target_type) for c in self._checks]).empty_table()

    def _canonical(self, t: pa.Table) -> pa.Table:
        """``t`` with the reader's types (float32 label and dense, int64 ids), so that tables of
        files written with other (checked, usable) types concatenate."""
        for c in self._checks:
            col = t.column(c.name)
            same = col.type == c.target_type or (
                c.multi_valued  # list<int64> whatever its element field is named
                and pa.types.is_list(col.type)
                and col.type.value_type == pa.int64()
            )
            if not same:
                i = t.schema.get_field_index(c.name)
                t = t.set_column(i, c.name, pc.cast(col, c.target_type, safe=False))
        return t

    def _read_checked(self, key: tuple[int, int]) -> pa.Table:
        """Row group ``key`` as stored, checked the first time it is read."""
        fi, g = key
        table = _read(
            self.files[fi], partial(self._parquet[fi].read_row_group, g, columns=self.columns), g
        )
        if key not in self._checked:
            check_table(self.files[fi], table, self._checks, self._file_row[key])
            self._checked.add(key)
        return table

    def _group(self, key: tuple[int, int]) -> pa.Table:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        table = self._canonical(self._read_checked(key))
        self._cache[key] = table
        if len(self._cache) > ROW_GROUP_CACHE:
            self._cache.popitem(last=False)
        return table

    def _rows(self, idx: np.ndarray) -> pa.Table:
        if len(idx) == 0:
            return self._empty()
        if self._parts is not None:
            return _gather(idx, self._part_starts, self._parts.__getitem__)
        return _gather(idx, self._starts, lambda g: self._group(self._groups[g]))

    def batch(self, indices: np.ndarray | Sequence[int] | Tensor) -> Batch:
        """The rows at ``indices`` (global, 0-based) as a Batch, in the given order."""
        idx = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices)
        if idx.size and idx.dtype.kind not in "iu":
            # A bool mask would be read as rows 0 and 1, a float index truncated: a wrong batch.
            raise InputError(
                f"row indices must be integers (global row numbers), got dtype {idx.dtype}; "
                "for a mask, pass its positions (np.flatnonzero(mask))."
            )
        idx = idx.astype(np.int64, copy=False).reshape(-1) if idx.size else np.zeros(0, np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_rows):
            bad = idx[(idx < 0) | (idx >= self.num_rows)][0]
            raise InputError(
                f"row index {int(bad)} is outside [0, {self.num_rows}) of split {self.split!r}"
            )
        return self._to_batch(self._rows(idx))

    def _to_batch(self, t: pa.Table) -> Batch:
        n = t.num_rows
        if self.dense_names:
            dense = np.stack([_f32(t.column(c)) for c in self.dense_names], axis=1)
        else:
            dense = np.zeros((n, 0), np.float32)
        sparse = []
        for name in self.sparse_names:
            col = t.column(name)
            if self.multi_valued[name]:
                arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
                offsets = arr.offsets.to_numpy()  # may not start at 0 after a take/slice
                ids = torch.from_numpy(_i64(pc.list_flatten(arr)))
                offs = torch.from_numpy((offsets[:-1] - offsets[0]).astype(np.int64))
            else:
                ids = torch.from_numpy(_i64(col))
                offs = torch.arange(n, dtype=torch.int64)
            sparse.append((ids, offs))
        label = torch.from_numpy(_f32(t.column(self.label_name)))
        return Batch(torch.from_numpy(np.ascontiguousarray(dense)), sparse, label)


def default_memory_limit() -> int:
    """Bytes a split may take loaded: MEMORY_SHARE of the memory available now, shared by the
    ranks torchrun started on this machine, at least DEFAULT_MEMORY_LIMIT."""
    from lazydp.bench.memory import available_memory_bytes  # /proc/meminfo and cgroups

    # Every rank opens the whole split at the same time and sees the same free memory: with
    # a quarter each, 4 ranks of `lazydp train --nproc-per-node 4` loaded all of it.
    share = MEMORY_SHARE / _local_ranks()
    return max(DEFAULT_MEMORY_LIMIT, int(share * available_memory_bytes()))


def _local_ranks() -> int:
    """The processes of this job on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _gather(idx: np.ndarray, starts: list[int], part: Callable[[int], pa.Table]) -> pa.Table:
    """The rows at global ``idx`` (non-empty) of the parts beginning at ``starts``, in order."""
    # take from each needed part once, in index order, then restore the requested order
    order = np.argsort(idx, kind="stable")
    sorted_idx = idx[order]
    pieces = []
    p_of = np.searchsorted(np.asarray(starts), sorted_idx, side="right") - 1
    for p in np.unique(p_of):
        local = sorted_idx[p_of == p] - starts[p]
        pieces.append(part(int(p)).take(pa.array(local)))
    gathered = pa.concat_tables(pieces)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return gathered.take(pa.array(inverse))


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            f"{path} is not a readable Parquet file ({_reason(exc)}); it is truncated or "
            f"corrupt: {REBUILD}"
        ) from None


def _read(path: Path, read: Callable[[], pa.Table], group: int | None = None) -> pa.Table:
    try:
        return read()
    except (pa.ArrowException, OSError) as exc:
        where = "" if group is None else f", row group {group}"
        raise DataError(
            f"{path}{where}: cannot be read ({_reason(exc)}); the file is damaged: {REBUILD}"
        ) from None


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _f32(col: pa.ChunkedArray) -> np.ndarray:
    # a writable copy: torch refuses to share Arrow's read-only buffers safely
    return np.array(col.to_numpy(zero_copy_only=False), dtype=np.float32)


def _i64(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.array(col.to_numpy(zero_copy_only=False), dtype=np.int64)
