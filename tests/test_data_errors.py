"""Corrupt or incomplete preprocessed directories give a DataError that names the problem.

Each case writes a small directory by hand (Parquet + metadata.json) and checks the error type
and a fragment of its message; the reader is opened both in memory and lazily (on disk), since
the two paths validate differently (all rows at open vs footer statistics + each row group).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lazydp.data.parquet import ParquetDataset
from lazydp.errors import ConfigError, DataError
from lazydp.preprocess import preprocess
from lazydp.preprocess.output import atomic_directory, check_metadata, read_metadata

N = 8
SIZES = {"u": 10, "g": 5}
BOTH = pytest.mark.parametrize("in_memory", [True, False], ids=["memory", "lazy"])


def columns(**override) -> dict[str, pa.Array]:
    cols = {
        "label": pa.array([0, 1] * (N // 2), pa.float32()),
        "d1": pa.array(np.linspace(0, 1, N), pa.float32()),
        "u": pa.array(range(N), pa.int64()),
        "g": pa.array([[1, 2], [0], [], [4], [3, 3], [1], [2], [0]], pa.list_(pa.int64())),
    }
    cols.update(override)
    return cols


def metadata(rows: dict[str, int]) -> dict:
    return {
        "rows": rows,
        "schema": {
            "label": "label",
            "dense": ["d1"],
            "categorical": [
                {"name": "u", "table_size": SIZES["u"], "multi_valued": False},
                {"name": "g", "table_size": SIZES["g"], "multi_valued": True},
            ],
        },
    }


def make(root: Path, train: dict | None = None, test: dict | None = None, **write) -> Path:
    """A directory with one Parquet file per split (train overridden by ``train``)."""
    tables = {"train": pa.table(train or columns()), "test": pa.table(test or columns())}
    for split, t in tables.items():
        (root / split).mkdir(parents=True)
        pq.write_table(t, root / split / "part-00000.parquet", **write)
    (root / "metadata.json").write_text(
        json.dumps(metadata({s: len(t) for s, t in tables.items()}))
    )
    return root


def train_file(root: Path) -> Path:
    return root / "train" / "part-00000.parquet"


def edit_metadata(root: Path, fn) -> None:
    meta = json.loads((root / "metadata.json").read_text())
    fn(meta)
    (root / "metadata.json").write_text(json.dumps(meta))


def open_all(root: Path, in_memory: bool) -> None:
    """Open both splits and read every row (lazy problems surface at the first read)."""
    for split in ("train", "test"):
        ds = ParquetDataset(root, split, in_memory=in_memory)
        ds.batch(np.arange(ds.num_rows))


@BOTH
def test_good_directory_reads(tmp_path, in_memory):
    ds = ParquetDataset(make(tmp_path / "d"), in_memory=in_memory)
    b = ds.batch([7, 0])
    assert b.label.tolist() == [1.0, 0.0] and b.sparse[0][0].tolist() == [7, 0]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_parquet_file(tmp_path, damage):
    root = make(tmp_path / "d")
    data = train_file(root).read_bytes()
    new = {"truncated": data[: len(data) // 2], "garbage": b"not parquet" * 20, "empty": b""}
    train_file(root).write_bytes(new[damage])
    with pytest.raises(DataError, match=r"part-00000\.parquet is not a readable Parquet file"):
        ParquetDataset(root)


def test_corrupt_metadata_json(tmp_path):
    root = make(tmp_path / "d")
    (root / "metadata.json").write_text('{"rows": ')
    with pytest.raises(DataError, match=r"metadata\.json: is not valid JSON \(Expecting value"):
        ParquetDataset(root)
    (root / "metadata.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="holds a JSON list, not an object"):
        read_metadata(root)


@pytest.mark.parametrize(
    "text", ['{"rows": ' + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000], ids=["int", "nested"]
)
def test_metadata_past_jsons_limits_is_named_not_a_bare_error(tmp_path, text):
    # json raised a bare ValueError (an int of over 4300 digits) or RecursionError (nesting).
    root = make(tmp_path / "d")
    (root / "metadata.json").write_text(text)
    with pytest.raises(DataError, match=r"metadata\.json: is not metadata lazydp writes"):
        ParquetDataset(root)


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda m: m.pop("schema"), r"lacks the key\(s\) \['schema'\]"),
        (lambda m: m["rows"].update(train=-1), r"rows\['train'\] is -1"),
        (lambda m: m["schema"].pop("dense"), r"schema\['dense'\] is None, not a list"),
        (lambda m: m["schema"]["categorical"][0].update(table_size=0), "has table_size 0"),
        (lambda m: m["schema"]["categorical"][1].pop("multi_valued"), r"lacks \['multi_valued'\]"),
        (lambda m: m["schema"]["dense"].append("u"), r"column\(s\) \['u'\] more than once"),
    ],
)
def test_incomplete_metadata(tmp_path, edit, fragment):
    root = make(tmp_path / "d")
    edit_metadata(root, edit)
    with pytest.raises(DataError, match=fragment):
        ParquetDataset(root)


@pytest.mark.parametrize(
    ("version", "fragment"),
    [
        (2, r"written by a newer lazydp \(metadata schema_version 2\); this lazydp reads "),
        ("1", r"schema_version is '1', not an integer >= 1"),
        (0, r"schema_version is 0, not an integer >= 1"),
    ],
)
def test_metadata_of_a_newer_schema_is_refused(tmp_path, version, fragment):
    # Data preprocessed by a newer lazydp was read as if its fields meant what they mean here:
    # schema_version was written and never checked.
    root = make(tmp_path / "d")
    edit_metadata(root, lambda m: m.update(schema_version=version))
    with pytest.raises(DataError, match=fragment):
        ParquetDataset(root)
    edit_metadata(root, lambda m: m.update(schema_version=1))
    assert ParquetDataset(root).num_rows == N


def test_data_preprocessed_from_one_input_twice_is_refused(tmp_path):
    # lazydp before 2026-12-07 accepted --input a.tsv a.tsv: every record became two examples
    # (and a DP vocabulary counted it twice), which training charged as one.
    root = make(tmp_path / "d")
    edit_metadata(root, lambda m: m.update(inputs=["/raw/a.tsv", "/raw/b.tsv", "/raw/./a.tsv"]))
    with pytest.raises(DataError, match=r"preprocessed from '/raw/\./a\.tsv' twice"):
        ParquetDataset(root)
    edit_metadata(root, lambda m: m.update(inputs=["/raw/a.tsv", "/raw/b.tsv"]))
    assert ParquetDataset(root).num_rows == N


def test_metadata_checker_accepts_a_minimal_object():
    check_metadata({"rows": {"train": 0}, "schema": {"dense": [], "categorical": []}})


def test_missing_directory_split_and_files(tmp_path):
    with pytest.raises(DataError, match="is not a directory"):
        ParquetDataset(tmp_path / "nowhere")
    root = make(tmp_path / "d")
    train_file(root).unlink()
    with pytest.raises(DataError, match=r"holds no \*\.parquet files but metadata\.json says 8"):
        ParquetDataset(root)
    (root / "train").rmdir()
    with pytest.raises(DataError, match="train is missing"):
        ParquetDataset(root)


@pytest.mark.parametrize(
    ("train", "fragment"),
    [
        ({"u": None}, "column 'u' is missing; metadata.json lists it as a single-valued"),
        ({"d1": pa.array(["0.5"] * N)}, "column 'd1' .* has type string; dense features must be"),
        ({"label": pa.array(["1"] * N)}, "column 'label' .* has type string; labels must be"),
        ({"u": pa.array([12.5] * N)}, "column 'u' .* has type double; category ids must be int"),
        ({"g": pa.array([[1.0]] * N)}, "column 'g' .* has type list<.*double>; category ids"),
        ({"g": pa.array([1] * N)}, "column 'g' .* metadata.json says multi-valued"),
        ({"u": pa.array([[1]] * N)}, "column 'u' .* metadata.json says single-valued"),
    ],
)
def test_missing_column_or_wrong_type(tmp_path, train, fragment):
    cols = {k: v for k, v in columns(**train).items() if v is not None}
    root = make(tmp_path / "d", train=cols)
    with pytest.raises(DataError, match=fragment):
        ParquetDataset(root)


@BOTH
@pytest.mark.parametrize(
    ("train", "memory_fragment", "lazy_fragment"),
    [
        (
            {"label": pa.array([0, 1, 7, 0, 1, 0, 1, 0], pa.float32())},
            r"row 2 \(0-based\): column 'label' \(the label\) is 7\.0; labels must be 0 or 1",
            r"row group 0 \(rows 0-7 of the file\): column 'label' holds labels from 0\.0 to 7\.0",
        ),
        (
            {"u": pa.array([1, None, 3, 4, 5, 6, 7, 8], pa.int64())},
            r"row 1 \(0-based\): column 'u' .* is null; ids must not be null",
            r"column 'u' .* has 1 null value\(s\); ids must not be null",
        ),
        (
            {"u": pa.array([1, 2, 3, 10, 5, 6, 7, 8], pa.int64())},
            r"row 3 \(0-based\): column 'u' .* is 10; ids must lie in \[0, 9\]",
            r"column 'u' holds ids from 1 to 10, but metadata.json gives table_size 10",
        ),
        (
            {"u": pa.array([1, 2, 3, -4, 5, 6, 7, 8], pa.int64())},
            r"row 3 \(0-based\): column 'u' .* is -4",
            "column 'u' holds ids from -4 to 8",
        ),
        (
            {"g": pa.array([[1], [2], [1, 9]] + [[0]] * 5, pa.list_(pa.int64()))},
            r"row 2 \(0-based\): column 'g' .* holds id 9; ids must lie in \[0, 4\]",
            "column 'g' holds ids from 0 to 9",
        ),
        (  # above 2^63: comparing with an int64 0 raised pyarrow's ArrowInvalid
            {"u": pa.array([1, 2, 2**63 + 5, 4, 5, 6, 7, 8], pa.uint64())},
            r"row 2 \(0-based\): column 'u' .* is 9223372036854775813; ids must lie in",
            "column 'u' holds ids from 1 to 9223372036854775813",
        ),
        (
            {"d1": pa.array([0, None] * 4, pa.float32())},
            r"row 1 \(0-based\): column 'd1' .* is null; dense values must not be null",
            r"column 'd1' .* has 4 null value\(s\); dense values must not be null",
        ),
        (
            {"d1": pa.array([0.0, float("inf")] + [0.0] * 6, pa.float32())},
            r"row 1 \(0-based\): column 'd1' \(a dense feature\) is inf; dense features must be",
            "column 'd1' holds an infinite value",
        ),
        (  # finite in float64, but the reader's float32 would make it inf (AUC nan, silently)
            {"d1": pa.array([0.0, 1e300] + [0.0] * 6, pa.float64())},
            r"row 1 \(0-based\): column 'd1' .* within float32's range",
            "column 'd1' holds values from 0.0 to 1e.300, past float32's range",
        ),
    ],
)
def test_bad_values_caught_at_open(tmp_path, in_memory, train, memory_fragment, lazy_fragment):
    root = make(tmp_path / "d", train=columns(**train))
    with pytest.raises(DataError, match=memory_fragment if in_memory else lazy_fragment):
        ParquetDataset(root, in_memory=in_memory)


@BOTH
@pytest.mark.parametrize(
    ("train", "fragment"),
    [
        ({"label": pa.array([0, 0.5] * 4, pa.float32())}, r"row 1 .* is 0\.5; labels must be 0"),
        ({"label": pa.array([0, np.nan] * 4, pa.float32())}, r"row 1 .* is nan; labels must"),
        pytest.param(  # float16: Arrow's is_in has no kernel for it (an ArrowNotImplementedError)
            {"label": pa.array(np.array([0, 0.5] * 4, np.float16), pa.float16())},
            r"row 1 .* is 0\.5; labels must be 0",
            marks=pytest.mark.skipif(
                int(pa.__version__.split(".")[0]) < 15,
                reason="pyarrow < 15 cannot write float16 to Parquet",
            ),
        ),
        ({"d1": pa.array([0, np.nan] * 4, pa.float32())}, r"row 1 .* is nan; dense features"),
        ({"g": pa.array([[1]] * 7 + [None], pa.list_(pa.int64()))}, "row 7 .* is null; a row"),
        ({"g": pa.array([[1]] * 7 + [[1, None]], pa.list_(pa.int64()))}, "row 7 .* null id"),
    ],
)
def test_bad_values_statistics_cannot_see(tmp_path, in_memory, train, fragment):
    """NaN, 0.5 and null lists or list elements pass the footer statistics; the lazy reader finds them
    when it first reads the row group (before the batch is used)."""
    root = make(tmp_path / "d", train=columns(**train))
    with pytest.raises(DataError, match=r"part-00000\.parquet, " + fragment):
        open_all(root, in_memory)


def test_files_without_statistics_are_checked_when_opened(tmp_path):
    label = pa.array([0, 1, 7, 0, 1, 0, 1, 0], pa.float32())
    root = make(tmp_path / "d", train=columns(label=label), write_statistics=False)
    with pytest.raises(DataError, match=r"row 2 \(0-based\): column 'label' .* is 7\.0"):
        ParquetDataset(root, in_memory=False)  # nothing to see in the footer


def test_a_split_kept_on_disk_is_read_through_once_when_opened(tmp_path):
    # Its row groups used to be checked when a batch first read them: bad data in the last
    # one stopped a run after hundreds of charged steps (and no checkpoint to resume from).
    label = pa.array([0, 1, 0, 1, 0, 0.5, 1, 0], pa.float32())
    root = make(tmp_path / "d", train=columns(label=label), row_group_size=3)
    with pytest.raises(DataError, match=r"row 5 \(0-based\): column 'label' .* is 0\.5"):
        ParquetDataset(root, in_memory=False)  # the row is named within its file
    good = make(tmp_path / "g", row_group_size=3)
    ds = ParquetDataset(good, in_memory=False)
    assert not ds._cache and len(ds._checked) == 3  # checked, not kept in memory
    assert len(ds.batch([0, 4, 7]).label) == 3


def test_row_count_mismatch(tmp_path):
    root = make(tmp_path / "d")
    edit_metadata(root, lambda m: m["rows"].update(train=3))
    with pytest.raises(DataError, match="Parquet files hold 8 rows but metadata.json says 3"):
        ParquetDataset(root)


def test_empty_train_split_is_refused_but_empty_test_split_is_not(tmp_path):
    empty = {k: v.slice(0, 0) for k, v in columns().items()}
    root = make(tmp_path / "d", train=empty, test=empty)
    with pytest.raises(DataError, match="the 'train' split has 0 rows, so there is nothing"):
        ParquetDataset(root)
    assert ParquetDataset(root, "test").batch([]).label.shape == (0,)


@BOTH
def test_other_usable_types_are_converted(tmp_path, in_memory):
    """Integer dense/label, int32 ids and a second file with the usual types concatenate."""
    root = make(
        tmp_path / "d",
        train=columns(
            label=pa.array([0, 1] * 4, pa.int8()),
            d1=pa.array(range(N), pa.int32()),
            u=pa.array(range(N), pa.int32()),
            g=pa.array([[1]] * N, pa.large_list(pa.int16())),
        ),
    )
    pq.write_table(pa.table(columns()), root / "train" / "part-00001.parquet")
    edit_metadata(root, lambda m: m["rows"].update(train=2 * N))
    ds = ParquetDataset(root, in_memory=in_memory)
    b = ds.batch([1, N + 1])
    assert b.label.dtype == torch.float32 and b.label.tolist() == [1.0, 1.0]
    assert b.dense[:, 0].tolist() == [1.0, pytest.approx(1 / 7)]
    assert b.sparse[0][0].dtype == torch.int64 and b.sparse[0][0].tolist() == [1, 1]
    assert b.sparse[1][0].tolist() == [1, 0]


def test_preprocess_refuses_input_without_data_rows(tmp_path):
    header_only = tmp_path / "r.csv"
    header_only.write_text("userId,movieId,rating,timestamp,genres\n")
    with pytest.raises(DataError, match=r"r\.csv: no training rows: the input holds no data rows"):
        preprocess("movielens", [header_only], tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    bad_only = tmp_path / "b.csv"
    bad_only.write_text("userId,movieId,rating,timestamp,genres\nx,1,4,0,Drama\n")
    with pytest.raises(DataError, match=r"all 1 data row\(s\) are bad and were skipped"):
        preprocess("movielens", [bad_only], tmp_path / "o", on_bad_row="skip", progress=False)


def test_preprocess_test_fraction_zero_records_an_empty_test_split(tmp_path):
    raw = tmp_path / "r.csv"
    raw.write_text("userId,movieId,rating,timestamp,genres\n1,2,4,0,Drama\n3,4,1,9,\n")
    meta = preprocess("movielens", [raw], tmp_path / "o", test_fraction=0.0, progress=False)
    assert meta["rows"] == {"train": 2, "test": 0}
    assert json.loads((tmp_path / "o" / "metadata.json").read_text())["rows"]["test"] == 0
    assert len(ParquetDataset(tmp_path / "o", "test")) == 0


def test_output_path_problems_are_config_errors(tmp_path):
    (tmp_path / "afile").write_text("x")
    for target in (tmp_path / "afile" / "sub", tmp_path / "afile" / "sub" / "deeper"):
        with pytest.raises(ConfigError, match=r"cannot be created: '.*afile' is a file, not a"):
            with atomic_directory(target):
                pass
    with pytest.raises(ConfigError, match="is a file, not a directory; overwrite only replaces"):
        with atomic_directory(tmp_path / "afile", overwrite=True):
            pass
    assert (tmp_path / "afile").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_overwrite_replaces_only_an_earlier_output_never_an_input(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "raw.csv").write_text("x")
    with pytest.raises(ConfigError, match="holds the input .*raw.csv"):
        with atomic_directory(data, overwrite=True, inputs=[data / "raw.csv"]):
            pass
    (data / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an earlier lazydp output"):
        with atomic_directory(data, overwrite=True):
            pass
    assert sorted(p.name for p in data.iterdir()) == ["notes.txt", "raw.csv"]
    with atomic_directory(tmp_path / "out") as tmp:  # lazydp's own output: replaced
        (tmp / "metadata.json").write_text("{}")
    with atomic_directory(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "metadata.json").write_text('{"v": 2}')
    assert (tmp_path / "out" / "metadata.json").read_text() == '{"v": 2}'


def test_an_output_another_run_finished_meanwhile_is_not_replaced(tmp_path):
    """Two runs for one output without overwrite: the one that finishes second is refused
    (it replaced the first's output silently, and both reported success)."""
    with pytest.raises(ConfigError, match="created by another run while this one was writing"):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "metadata.json").write_text('{"v": 2}')
            with atomic_directory(tmp_path / "out") as first:  # started later, done first
                (first / "metadata.json").write_text('{"v": 1}')
    assert (tmp_path / "out" / "metadata.json").read_text() == '{"v": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the loser's output removed
    with atomic_directory(tmp_path / "out", overwrite=True) as tmp:  # asked for: replaced
        (tmp / "metadata.json").write_text('{"v": 3}')
    assert (tmp_path / "out" / "metadata.json").read_text() == '{"v": 3}'


def test_a_killed_run_s_temporary_output_is_removed_by_the_next_run(tmp_path):
    """A preprocess killed hard leaves DIR.tmp-*; the next run for DIR removes it when its
    writer process is gone, and leaves a live writer's and an unrecorded one alone."""
    import os
    import socket
    import subprocess
    import sys

    from lazydp.preprocess.output import WRITER

    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = int(done.stdout)  # a process that has exited
    host = socket.gethostname()
    abandoned, live, unknown = (tmp_path / f"out.tmp-{k}" for k in ("a", "b", "c"))
    for d, writer in (
        (abandoned, f"{host} {dead_pid}"),
        (live, f"{host} {os.getpid()}"),
        (unknown, None),
    ):
        d.mkdir()
        (d / "part-0.parquet").write_bytes(b"x" * 100)
        if writer:
            (d / WRITER).write_text(writer)
    with pytest.warns(UserWarning, match="no longer exists"):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "metadata.json").write_text("{}")
    assert not abandoned.exists() and live.exists() and unknown.exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metadata.json"]
