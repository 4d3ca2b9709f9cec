"""The embedded (DuckDB) pipeline against a plain-Python reference, on the raw fixtures."""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lazydp.errors import ConfigError, DataError
from lazydp.preprocess import lines as lines_mod
from lazydp.preprocess import preprocess, reference
from lazydp.preprocess.embedded import EmbeddedEngine
from lazydp.preprocess.spec import MAX_GENRES

FIX = Path(__file__).parent / "fixtures"


def read_split(root: Path, split: str):
    return pq.read_table(sorted((root / split).glob("*.parquet"))).to_pandas()


def both_splits(root: Path):
    import pandas as pd

    frame = pd.concat([read_split(root, "train"), read_split(root, "test")])
    return frame.sort_values(["file_idx", "line_no"]).reset_index(drop=True)


def test_criteo_matches_python_reference(tmp_path):
    meta = preprocess("criteo", [FIX / "criteo_small.tsv"], tmp_path / "o", progress=False)
    out = both_splits(tmp_path / "o")
    raw = (FIX / "criteo_small.tsv").read_text().splitlines()
    assert meta["rows"]["train"] + meta["rows"]["test"] == len(raw) == len(out)
    assert out["line_no"].tolist() == list(range(1, len(raw) + 1))
    for row, line in zip(out.itertuples(), raw):
        f = line.split("\t")
        assert row.label == float(f[0])
        dense = [reference.log1p_int(v) for v in f[1:14]]
        assert [getattr(row, f"I{i}") for i in range(1, 14)] == dense  # bit-exact float32
        ids = [reference.bucket(f"C{i}", v.lower(), 1 << 20) for i, v in enumerate(f[14:], 1)]
        assert [getattr(row, f"C{i}") for i in range(1, 27)] == ids
    test_rows = {n for n, line in enumerate(raw, 1) if reference.is_test(line, 0.1)}
    assert set(read_split(tmp_path / "o", "test")["line_no"]) == test_rows
    assert meta["schema"]["categorical"][0] == {
        "name": "C1",
        "table_size": 1 << 20,
        "multi_valued": False,
    }
    assert meta["privacy_cost"] == {"epsilon": 0.0, "delta": 0.0}
    on_disk = json.loads((tmp_path / "o" / "metadata.json").read_text())
    assert on_disk["rows"] == meta["rows"] and on_disk["engine"] == "embedded"


def test_bad_rows_fail_names_file_and_line(tmp_path):
    with pytest.raises(DataError, match=r"criteo_bad\.tsv, line 3: expected 40 fields, got 39"):
        preprocess("criteo", [FIX / "criteo_bad.tsv"], tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind


def test_bad_rows_skip_counts_and_drops(tmp_path):
    meta = preprocess(
        "criteo", [FIX / "criteo_bad.tsv"], tmp_path / "o", on_bad_row="skip", progress=False
    )
    assert meta["bad_rows"] == 4
    reasons = [(e["line"], e["reason"]) for e in meta["bad_row_examples"]]
    assert reasons == [
        (3, "expected 40 fields, got 39"),
        (5, "I3 is not an integer"),
        (7, "C7 is not a hex string"),
        (9, "label is not 0 or 1"),
    ]
    # 12 lines + 1 blank line (not a row) with CRLF endings: 8 good rows, numbered physically
    assert both_splits(tmp_path / "o")["line_no"].tolist() == [1, 2, 4, 6, 8, 10, 12, 13]


def test_movielens_csv_quoting_unicode_genres_and_time(tmp_path):
    preprocess("movielens", [FIX / "movielens_small.csv"], tmp_path / "o", progress=False)
    out = both_splits(tmp_path / "o")
    with open(FIX / "movielens_small.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(out) == len(rows)
    for got, want in zip(out.itertuples(), rows):
        assert got.label == float(float(want["rating"]) >= 4)
        assert got.userId == reference.bucket("userId", want["userId"], 1 << 16)
        genres = want["genres"].split("|")[:MAX_GENRES]
        assert list(got.genres) == [reference.bucket("genres", g, 1 << 10) for g in genres]
        t = dt.datetime.fromtimestamp(int(want["timestamp"]), dt.timezone.utc)
        assert got.hour_of_day == np.float32(t.hour / 23)
        assert got.day_of_week == np.float32(t.weekday() / 6)
    assert list(out.genres[8]) == [0]  # empty genres: the missing id
    assert len(out.genres[10]) == MAX_GENRES  # 12 genres, bounded to 10


def test_acs_filter_codes_and_label(tmp_path):
    meta = preprocess("acs", [FIX / "acs_small.csv"], tmp_path / "o", progress=False)
    out = both_splits(tmp_path / "o")
    # folktables' filter: 16 < AGEP < 90 and PWGTP >= 1 (drops ages 15 and 90 and PWGTP 0)
    assert out["line_no"].tolist() == [2, 4, 7, 8, 9]
    assert out["label"].tolist() == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert out["AGEP_NUM"].tolist() == [np.float32(a / 100) for a in (34, 45, 61, 17, 30)]
    assert out["SCHL"][1] == reference.bucket("SCHL", "16", 4096)  # "016" is code 16
    assert out["ESP"][0] == 0  # blank is its own (missing) id
    assert meta["rows"]["train"] + meta["rows"]["test"] == 5


def test_failure_mid_write_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    real_write = EmbeddedEngine.write_parquet

    def failing(self, sql_text, directory):
        if directory.name == "test":
            raise OSError("disk full (simulated)")
        real_write(self, sql_text, directory)

    monkeypatch.setattr(EmbeddedEngine, "write_parquet", failing)
    with pytest.raises(OSError, match="simulated"):
        preprocess("criteo", [FIX / "criteo_small.tsv"], tmp_path / "o", progress=False)
    assert list(tmp_path.iterdir()) == []


def _interrupt_inside(*names: str) -> None:
    """SIGINT this process once its main thread is inside one of the Python functions
    ``names`` (here: inside DuckDB's execute, which they call), as a Ctrl-C mid-query."""
    main = threading.main_thread().ident

    def wait_and_interrupt() -> None:
        while sys._current_frames()[main].f_code.co_name not in names:
            time.sleep(0.01)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=wait_and_interrupt, daemon=True).start()


def test_ctrl_c_inside_a_duckdb_query_is_a_keyboard_interrupt(tmp_path, monkeypatch):
    # DuckDB takes a Ctrl-C during a query and raises RuntimeError("Query interrupted"): the
    # CLI printed a traceback from inside duckdb and exited 1 instead of its "interrupted"
    # message (exit 130).
    def interrupted_write(self, sql_text, directory):
        # a table of many row groups: DuckDB checks for a signal between their tasks
        self.view("big", "SELECT x FROM range(5000000) t(x)", materialize=True)
        _interrupt_inside("view", "_execute")
        # ~20M hashes: seconds, so the interrupt 0.2 s in lands inside it on a fast machine too
        slow = "SELECT x FROM big, range(4) r WHERE md5(CAST(x + r.range AS VARCHAR)) < '1'"
        self.view("slow", slow, True)

    monkeypatch.setattr(EmbeddedEngine, "write_parquet", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        preprocess("criteo", [FIX / "criteo_small.tsv"], tmp_path / "o", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_and_bad_settings_are_refused(tmp_path):
    (tmp_path / "o").mkdir()
    src = [FIX / "criteo_small.tsv"]
    with pytest.raises(ConfigError, match="already exists"):
        preprocess("criteo", src, tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match="format='tsv'"):
        preprocess("tsv", src, tmp_path / "p")
    with pytest.raises(ConfigError, match="test_fraction=1.5"):
        preprocess("criteo", src, tmp_path / "p", test_fraction=1.5)
    with pytest.raises(ConfigError, match="feature 'C99'"):
        preprocess("criteo", src, tmp_path / "p", buckets={"C99": 10})
    with pytest.raises(ConfigError, match="vocab_epsilon"):
        preprocess("criteo", src, tmp_path / "p", vocabulary="dp")
    dp = dict(vocabulary="dp", vocab_epsilon=1.0, vocab_delta=1e-6)
    with pytest.raises(ConfigError, match="Drop buckets"):  # was silently ignored
        preprocess("criteo", src, tmp_path / "p", buckets=17, **dp)
    with pytest.raises(ConfigError, match="is not a file"):
        preprocess("criteo", [tmp_path / "missing.tsv"], tmp_path / "p")


def test_an_output_given_as_a_uri_is_refused(tmp_path, monkeypatch):
    # file:///d became the relative directory ./file:/d holding only metadata.json, while Spark
    # wrote the Parquet files to /d.tmp-* and the run reported success.
    monkeypatch.chdir(tmp_path)
    for output in (f"file://{tmp_path}/out", f"file:{tmp_path}/out", "hdfs://nn/out"):
        with pytest.raises(ConfigError, match="looks like a URI; give a local directory path"):
            preprocess("movielens", [FIX / "movielens_small.csv"], output, progress=False)
    assert list(tmp_path.iterdir()) == []
    meta = preprocess("movielens", [FIX / "movielens_small.csv"], "./a:b", progress=False)
    assert meta["rows"]["train"] > 0 and (tmp_path / "a:b" / "metadata.json").is_file()


def test_csv_header_must_name_the_columns(tmp_path):
    bad = tmp_path / "r.csv"
    bad.write_text("user,movie,rating,timestamp,genres\n1,2,3,4,Drama\n")
    with pytest.raises(DataError, match=r"r\.csv, line 1: header lacks column\(s\) \['userId'"):
        preprocess("movielens", [bad], tmp_path / "o", progress=False)
    # A column named twice: the last one silently won (which one holds the data?).
    bad.write_text("userId,userId,movieId,rating,timestamp,genres\n1,5,2,3,4,Drama\n")
    with pytest.raises(DataError, match=r"names column\(s\) \['userId'\] more than once"):
        preprocess("movielens", [bad], tmp_path / "o", progress=False)


def test_a_csv_saved_with_a_byte_order_mark_is_read(tmp_path):
    text = (FIX / "movielens_small.csv").read_text(encoding="utf-8")
    bom = tmp_path / "bom.csv"
    bom.write_text("\ufeff" + text, encoding="utf-8")  # Excel's "CSV UTF-8"
    plain = preprocess("movielens", [FIX / "movielens_small.csv"], tmp_path / "a", progress=False)
    meta = preprocess("movielens", [bom], tmp_path / "b", progress=False)
    assert meta["rows"] == plain["rows"]
    # Spark's reader drops the mark (Hadoop's rule); line 1 of a headerless file was a bad row
    # here and a good one there, and its split hash differed.
    tsv = tmp_path / "bom.tsv"
    tsv.write_bytes(b"\xef\xbb\xbf" + (FIX / "criteo_small.tsv").read_bytes())
    preprocess("criteo", [FIX / "criteo_small.tsv"], tmp_path / "c", progress=False)
    preprocess("criteo", [tsv], tmp_path / "d", progress=False)
    assert both_splits(tmp_path / "c").equals(both_splits(tmp_path / "d"))


def test_dp_vocabulary_ids_and_privacy_cost(tmp_path):
    meta = preprocess(
        "movielens", [FIX / "movielens_small.csv"], tmp_path / "o", vocabulary="dp",
        vocab_epsilon=30.0, vocab_delta=0.3, vocab_seed=1, test_fraction=0.0, progress=False,
    )  # fmt: skip
    cost = meta["privacy_cost"]
    assert (cost["epsilon"], cost["delta"]) == (30.0, 0.3)
    assert cost["per_feature"]["genres"]["max_values_per_row"] == MAX_GENRES
    sizes = {c["name"]: c["table_size"] for c in meta["schema"]["categorical"]}
    vocab = pq.read_table(tmp_path / "o" / "vocab" / "userId").to_pandas()
    assert sizes["userId"] == len(vocab) + 2 and vocab["id"].tolist() == list(
        range(1, len(vocab) + 1)
    )
    assert vocab["value"].tolist() == sorted(vocab["value"])
    out = both_splits(tmp_path / "o")
    mapping = dict(zip(vocab["value"], vocab["id"]))
    with open(FIX / "movielens_small.csv", encoding="utf-8", newline="") as f:
        users = [r["userId"] for r in csv.DictReader(f)]
    assert out["userId"].tolist() == [mapping.get(u, sizes["userId"] - 1) for u in users]


def test_line_reader_follows_hadoop_line_rules(tmp_path, monkeypatch):
    monkeypatch.setattr(lines_mod, "BLOCK_BYTES", 3)  # \r\n split across blocks
    p = tmp_path / "x.txt"
    p.write_bytes(b"ab\r\ncd\re\n\nf\xc3\xa9")
    got = [ln for _, chunk in lines_mod.iter_line_chunks(p, chunk_lines=2) for ln in chunk]
    assert got == ["ab", "cd", "e", "", "f\u00e9"]
    firsts = [first for first, _ in lines_mod.iter_line_chunks(p, chunk_lines=2)]
    assert firsts == [1, 3, 5]
    gz = tmp_path / "x.txt.gz"
    gz.write_bytes(gzip.compress(b"a\nb\n"))
    assert [c for _, c in lines_mod.iter_line_chunks(gz)] == [["a", "b"]]
    p.write_bytes(b"\xef\xbb\xbfa\n\xef\xbb\xbfb")  # only the mark opening the file goes
    assert [c for _, c in lines_mod.iter_line_chunks(p)] == [["a", "\ufeffb"]]
    p.write_bytes(b"\xef\xbb\xbf")
    assert list(lines_mod.iter_line_chunks(p)) == []
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\n")
    with pytest.raises(DataError, match="line 2: invalid UTF-8"):
        list(lines_mod.iter_line_chunks(tmp_path / "bad.txt"))


def test_an_input_given_twice_is_refused(tmp_path):
    # Its records were read twice: every person counted twice, in training and in a DP
    # vocabulary whose cost assumes one record each (a shell glob makes this easy).
    src = FIX / "movielens_small.csv"
    link = tmp_path / "link.csv"
    link.symlink_to(src)
    for inputs in ([src, src], [src, link]):
        with pytest.raises(ConfigError, match="is given twice"):
            preprocess("movielens", inputs, tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match=r"not a file.*pass .*/\*"):
        preprocess("movielens", [tmp_path], tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_damaged_or_unsupported_compressed_input_is_a_clear_error(tmp_path):
    import bz2

    data = (FIX / "movielens_small.csv").read_bytes()
    cases = {
        "truncated.csv.gz": (gzip.compress(data)[:-20], "cannot decompress.*truncated"),
        "plain.csv.gz": (data, "cannot decompress"),
        "packed.csv": (bz2.compress(data), "bzip2-compressed; only .gz"),
        "unnamed.csv": (gzip.compress(data), "gzip-compressed.*rename it to end in .gz"),
        # Spark decompresses these suffixes and this reader does not: refused by both engines
        "packed.csv.bz2": (bz2.compress(data), r"a \.bz2 file; only \.gz files"),
        "plain.csv.bz2": (data, r"a \.bz2 file; only \.gz files"),
        "plain.csv.BZ2": (data, r"a \.BZ2 file; only \.gz files"),  # Spark ignores the case
        "plain.csv.Gz": (data, "cannot decompress"),
    }
    for name, (content, match) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=match):
            preprocess("movielens", [tmp_path / name], tmp_path / "o", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(cases)
    (tmp_path / "upper.csv.GZ").write_bytes(gzip.compress(data))  # gzip to both engines
    assert preprocess("movielens", [tmp_path / "upper.csv.GZ"], tmp_path / "o", progress=False)


def test_the_embedded_engine_draws_no_progress_bar_of_its_own(tmp_path):
    # In an interactive session (a REPL, Jupyter, `python -c`: DuckDB decides when it is
    # imported) DuckDB drew its own bar on stdout, also with progress=False.
    import subprocess

    code = (
        "import sys; from lazydp.preprocess.embedded import EmbeddedEngine; "
        "e = EmbeddedEngine(sys.argv[1], progress=False); "
        "print(e.query(\"SELECT current_setting('enable_progress_bar')\")[0][0])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
