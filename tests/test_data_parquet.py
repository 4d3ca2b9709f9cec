"""ParquetDataset.batch against reading the split with pandas; lazy == in-memory; built-ins."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lazydp.data.parquet import Batch, ParquetDataset
from lazydp.errors import DataError, InputError
from lazydp.preprocess import preprocess

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def movielens_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pq") / "ml"
    copies = [root.parent / f"part{i}.csv" for i in range(3)]  # three files: more rows
    for c in copies:
        c.write_bytes((FIX / "movielens_small.csv").read_bytes())
    preprocess("movielens", copies, root, test_fraction=0.0, progress=False)
    # many small row groups and files, so the lazy path crosses group and file boundaries
    table = pq.read_table(sorted((root / "train").glob("*.parquet")))
    for f in (root / "train").glob("*.parquet"):
        f.unlink()
    pq.write_table(table.slice(0, 20), root / "train" / "part-00000.parquet", row_group_size=3)
    pq.write_table(table.slice(20), root / "train" / "part-00001.parquet", row_group_size=4)
    return root


def expected(root: Path, idx: list[int]) -> pd.DataFrame:
    frame = pq.read_table(sorted((root / "train").glob("*.parquet"))).to_pandas()
    return frame.iloc[idx].reset_index(drop=True)


@pytest.mark.parametrize("in_memory", [True, False])
def test_batch_matches_pandas(movielens_dir, in_memory):
    ds = ParquetDataset(movielens_dir, "train", in_memory=in_memory)
    assert ds.num_rows == len(ds) == 36 and ds.in_memory == in_memory
    idx = [35, 0, 19, 20, 7, 7, 3]
    b = ds.batch(np.array(idx))
    want = expected(movielens_dir, idx)
    assert torch.equal(b.label, torch.tensor(want["label"].to_numpy(), dtype=torch.float32))
    dense = want[["hour_of_day", "day_of_week", "years_since_1995"]].to_numpy(np.float32)
    assert torch.equal(b.dense, torch.from_numpy(dense.copy()))
    ids, offsets = b.sparse[0]
    assert ids.tolist() == want["userId"].tolist() and offsets.tolist() == list(range(len(idx)))
    g_ids, g_off = b.sparse[2]
    flat = [int(x) for lst in want["genres"] for x in lst]
    lengths = [len(lst) for lst in want["genres"]]
    assert g_ids.tolist() == flat
    assert g_off.tolist() == np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
    dense_, sparse_, label_ = b  # unpacks like the synthetic batches
    assert dense_ is b.dense and label_ is b.label and len(b) == len(idx)


@pytest.mark.parametrize("in_memory", [True, False])
def test_empty_batch_is_valid(movielens_dir, in_memory):
    b = ParquetDataset(movielens_dir, in_memory=in_memory).batch([])
    assert isinstance(b, Batch) and b.dense.shape == (0, 3) and b.label.shape == (0,)
    assert all(i.numel() == 0 and o.numel() == 0 for i, o in b.sparse)
    assert all(i.dtype == torch.int64 and o.dtype == torch.int64 for i, o in b.sparse)


def test_out_of_range_and_damaged_directories(movielens_dir, tmp_path):
    ds = ParquetDataset(movielens_dir)
    with pytest.raises(InputError, match="row index 36 is outside"):
        ds.batch([1, 36])
    with pytest.raises(InputError, match="row index -1"):
        ds.batch([-1])
    with pytest.raises(DataError, match="no metadata.json"):
        ParquetDataset(tmp_path)
    assert ds.table_sizes == {"userId": 1 << 16, "movieId": 1 << 16, "genres": 1 << 10}
    assert ParquetDataset(movielens_dir, "test").batch([]).label.shape == (0,)


def test_lazy_mode_is_the_default_above_the_memory_limit(movielens_dir):
    assert not ParquetDataset(movielens_dir, memory_limit_bytes=1).in_memory
    assert ParquetDataset(movielens_dir).in_memory


def test_a_loaded_split_is_not_copied_at_every_batch(tmp_path):
    """take() on a column of several chunks (one per file) concatenates them first: each batch
    copied the whole split (120 ms per batch of 4096 rows of a 3M-row split)."""
    n, files = 50_000, 3
    root = tmp_path / "d"
    table = pa.table({"label": pa.array(np.arange(n) % 2, pa.float32()), "u": np.arange(n) % 7})
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        for f in range(files):
            pq.write_table(table, root / split / f"part-{f}.parquet", row_group_size=10_000)
    categorical = [{"name": "u", "table_size": 7, "multi_valued": False}]
    rows = {"train": files * n, "test": files * n}
    meta = {"rows": rows, "schema": {"dense": [], "categorical": categorical}}
    (root / "metadata.json").write_text(json.dumps(meta))
    ds = ParquetDataset(root, in_memory=True)
    idx = np.arange(0, files * n, 997)[::-1]
    pool, default = pa.proxy_memory_pool(pa.default_memory_pool()), pa.default_memory_pool()
    pa.set_memory_pool(pool)  # counts what the batch allocates in Arrow
    try:
        b = ds.batch(idx)
    finally:
        pa.set_memory_pool(default)
    assert b.sparse[0][0].tolist() == (idx % n % 7).tolist()
    assert b.label.tolist() == (idx % n % 2).tolist()
    assert pool.max_memory() < files * n * 12 // 20  # the batch's rows, not the split (12 B a row)


def test_memory_limit_counts_the_loaded_size_not_the_encoded_one(tmp_path):
    """Low-cardinality columns encode to a few bits a value in Parquet; loaded they take 4 or 8
    bytes. The footer's encoded size let a split 20x over the limit be loaded whole."""
    n = 20_000
    root = tmp_path / "d"
    cols = {
        "label": pa.array(np.arange(n) % 2, pa.float32()),
        "u": pa.array(np.arange(n) % 3, pa.int64()),
        "g": pa.array([[1, 2]] * n, pa.list_(pa.int64())),
        "unused": pa.array(np.arange(n, dtype=np.float64)),  # not read: not counted
    }
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        pq.write_table(pa.table(cols), root / split / "part-00000.parquet")
    categorical = [
        {"name": "u", "table_size": 3, "multi_valued": False},
        {"name": "g", "table_size": 3, "multi_valued": True},
    ]
    meta = {"rows": {"train": n, "test": n}, "schema": {"dense": [], "categorical": categorical}}
    (root / "metadata.json").write_text(json.dumps(meta))
    loaded = n * (4 + 8) + 8 * 2 * n + 4 * (n + 1)  # label, u, g's ids and offsets
    footer = pq.ParquetFile(root / "train" / "part-00000.parquet").metadata.row_group(0)
    assert footer.total_byte_size < loaded // 2  # the encoded size underestimates
    assert not ParquetDataset(root, memory_limit_bytes=loaded - 1).in_memory
    assert ParquetDataset(root, memory_limit_bytes=loaded).in_memory


def test_the_default_memory_limit_is_a_share_of_available_memory(monkeypatch):
    """Loaded splits train ~200x faster than sampled from disk: the default limit follows the
    machine (a quarter of what is available), not a fixed 512 MiB."""
    from lazydp.bench import memory
    from lazydp.data import parquet

    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 8 << 30)
    assert parquet.default_memory_limit() == 2 << 30
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 1 << 20)
    assert parquet.default_memory_limit() == parquet.DEFAULT_MEMORY_LIMIT  # the floor


def test_ranks_on_one_machine_share_the_default_memory_limit(monkeypatch):
    """Each rank of `lazydp train --nproc-per-node 4` opens the whole split and saw the same
    free memory: a quarter each loaded all of it (out of memory)."""
    from lazydp.bench import memory
    from lazydp.data import parquet

    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 16 << 30)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert parquet.default_memory_limit() == 1 << 30  # a quarter of 16 GiB, over 4 ranks


@pytest.mark.parametrize("bad", [torch.tensor([True, False]), [2.7], np.array([1.0])])
def test_batch_refuses_indices_that_are_not_integers(movielens_dir, bad):
    with pytest.raises(InputError, match="must be integers"):
        ParquetDataset(movielens_dir).batch(bad)
