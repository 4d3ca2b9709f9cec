"""Training batches from a ``lazydp preprocess`` directory, fetched by global row index.

Contract:
* ``ParquetDataset(root, split)`` reads ``root/<split>/*.parquet`` (in file-name order, which is
  the rows' order) and ``root/metadata.json``; ``num_rows`` is global (from the metadata and
  checked against the Parquet footers), ``table_sizes`` include the reserved ids.
* ``batch(indices)`` returns the rows at those global indices, in the order given (repeats
  allowed), as a ``Batch``; an empty index list gives a valid batch with B = 0. Out-of-range
  indices raise InputError. This is what Poisson sampling needs: any subset, any size.
* Memory: splits smaller than ``memory_limit_bytes`` (uncompressed) are loaded once (fast path);
  larger ones stay on disk and only the row groups holding requested rows are read (footers and
  row-group boundaries are cached; a small LRU keeps recently used row groups).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

from lazydp.errors import DataError, InputError

DEFAULT_MEMORY_LIMIT = 512 << 20
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
        memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT,
        in_memory: bool | None = None,
    ) -> None:
        from lazydp.preprocess.output import read_metadata

        self.root = Path(root)
        self.metadata = read_metadata(self.root)
        if split not in self.metadata["rows"]:
            raise InputError(f"split={split!r}; use one of {sorted(self.metadata['rows'])}")
        self.split = split
        schema = self.metadata["schema"]
        self.schema: dict[str, Any] = schema
        self.dense_names: list[str] = list(schema["dense"])
        self.sparse_names: list[str] = [c["name"] for c in schema["categorical"]]
        self.multi_valued = {c["name"]: bool(c["multi_valued"]) for c in schema["categorical"]}
        self.table_sizes: dict[str, int] = {
            c["name"]: int(c["table_size"]) for c in schema["categorical"]
        }
        self.columns = ["label", *self.dense_names, *self.sparse_names]
        self.files = sorted((self.root / split).glob("*.parquet"))
        self._parquet = [pq.ParquetFile(f) for f in self.files]
        # global start row of every (file, row group), for bisect
        self._groups: list[tuple[int, int]] = []
        self._starts: list[int] = []
        total, size = 0, 0
        for fi, pf in enumerate(self._parquet):
            meta = pf.metadata
            for g in range(meta.num_row_groups):
                self._groups.append((fi, g))
                self._starts.append(total)
                total += meta.row_group(g).num_rows
                size += meta.row_group(g).total_byte_size
        self.num_rows = int(self.metadata["rows"][split])
        if total != self.num_rows:
            raise DataError(
                f"{self.root / split}: Parquet files hold {total} rows but metadata.json says "
                f"{self.num_rows}; the directory is damaged, run the preprocessing again"
            )
        self.in_memory = size <= memory_limit_bytes if in_memory is None else in_memory
        self._table: pa.Table | None = None
        if self.in_memory:
            tables = [pf.read(columns=self.columns) for pf in self._parquet]
            self._table = pa.concat_tables(tables) if tables else self._empty()
        self._cache: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()

    def __len__(self) -> int:
        return self.num_rows

    def _empty(self) -> pa.Table:
        fields = [("label", pa.float32())] + [(n, pa.float32()) for n in self.dense_names]
        fields += [
            (n, pa.list_(pa.int64()) if self.multi_valued[n] else pa.int64())
            for n in self.sparse_names
        ]
        return pa.schema(fields).empty_table()

    def _group(self, key: tuple[int, int]) -> pa.Table:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        fi, g = key
        table = self._parquet[fi].read_row_group(g, columns=self.columns)
        self._cache[key] = table
        if len(self._cache) > ROW_GROUP_CACHE:
            self._cache.popitem(last=False)
        return table

    def _rows(self, idx: np.ndarray) -> pa.Table:
        if self._table is not None:
            return self._table.take(pa.array(idx))
        if len(idx) == 0:
            return self._empty()
        # read each needed row group once, in index order, then restore the requested order
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        pieces = []
        g_of = np.searchsorted(np.asarray(self._starts), sorted_idx, side="right") - 1
        for g in np.unique(g_of):
            local = sorted_idx[g_of == g] - self._starts[g]
            pieces.append(self._group(self._groups[g]).take(pa.array(local)))
        gathered = pa.concat_tables(pieces)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return gathered.take(pa.array(inverse))

    def batch(self, indices: np.ndarray | Sequence[int] | Tensor) -> Batch:
        """The rows at ``indices`` (global, 0-based) as a Batch, in the given order."""
        idx = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices)
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
        label = torch.from_numpy(_f32(t.column("label")))
        return Batch(torch.from_numpy(np.ascontiguousarray(dense)), sparse, label)


def _f32(col: pa.ChunkedArray) -> np.ndarray:
    # a writable copy: torch refuses to share Arrow's read-only buffers safely
    return np.array(col.to_numpy(zero_copy_only=False), dtype=np.float32)


def _i64(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.array(col.to_numpy(zero_copy_only=False), dtype=np.int64)
