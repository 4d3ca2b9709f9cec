"""Engine equivalence: Spark (local mode) writes exactly what DuckDB writes, on the fixtures.

Two formats cover both splitters (tab by position, RFC 4180 by header), hashing and the DP
vocabulary (single- and multi-valued); acs uses the same machinery as movielens and is left out
to keep the Spark part of the suite short.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lazydp.errors import ConfigError, DataError
from lazydp.preprocess import preprocess

pytest.importorskip("pyspark")
pytestmark = pytest.mark.slow
FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def spark():
    from lazydp.preprocess.spark import spark_session

    session = spark_session("local[2]", shuffle_partitions=1)
    # tiny fixtures: compiling generated code costs more than interpreting it
    session.conf.set("spark.sql.codegen.wholeStage", "false")
    session.conf.set("spark.sql.codegen.factoryMode", "NO_CODEGEN")
    yield session
    session.stop()


def _table(directory: Path) -> pa.Table:
    files = sorted(directory.glob("*.parquet"))
    assert files and not list(directory.glob(".*.crc"))
    # file-name order is row order; Spark adds its own key-value metadata, which we ignore
    return pa.concat_tables([pq.read_table(f) for f in files]).replace_schema_metadata(None)


def _assert_same(a: Path, b: Path, parts: list[str]) -> None:
    for part in parts:
        ta, tb = _table(a / part), _table(b / part)
        assert ta.schema.equals(tb.schema), part
        assert ta.equals(tb), part


CASES = {
    # two files (file index order), CRLF, a blank line, empty fields, 4 bad rows skipped
    "criteo": (["criteo_small.tsv", "criteo_bad.tsv"], {"on_bad_row": "skip"}),
    # unicode and quoted titles, bad rows, DP vocabulary incl. the multi-valued genres
    "movielens": (
        ["movielens_bad.csv", "movielens_small.csv"],
        {
            "on_bad_row": "skip",
            "vocabulary": "dp",
            "vocab_epsilon": 30.0,
            "vocab_delta": 0.3,
            "vocab_seed": 5,
            "test_fraction": 0.3,
        },
    ),  # fmt: skip
}


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_spark_output_equals_embedded(fmt, tmp_path, spark):
    files, kwargs = CASES[fmt]
    inputs = [FIX / f for f in files]
    emb = preprocess(fmt, inputs, tmp_path / "emb", progress=False, **kwargs)
    spk = preprocess(
        fmt, inputs, tmp_path / "spk", engine="spark", spark=spark, progress=False, **kwargs
    )
    parts = ["train", "test"]
    if kwargs.get("vocabulary") == "dp":
        parts += [f"vocab/{c['name']}" for c in emb["schema"]["categorical"]]
    _assert_same(tmp_path / "emb", tmp_path / "spk", parts)
    assert spk["engine"] == "spark" and emb["engine"] == "embedded"
    for key in ("rows", "bad_rows", "bad_row_examples", "schema", "privacy_cost"):
        assert spk[key] == emb[key], key
    assert emb["bad_rows"] == {"criteo": 4, "movielens": 3}[fmt]


def test_executors_run_no_python(tmp_path, spark, monkeypatch):
    # The split offsets became a DataFrame through createDataFrame on a Python list, which runs
    # a Python worker on an executor: on a cluster whose workers lack the driver's interpreter
    # path (PYSPARK_PYTHON), preprocessing failed with a Java stack trace. An interpreter no
    # executor can start must not matter.
    monkeypatch.setattr(spark.sparkContext, "pythonExec", str(tmp_path / "no-python"))
    files, kwargs = CASES["criteo"]
    inputs = [FIX / f for f in files]
    emb = preprocess("criteo", inputs, tmp_path / "emb", progress=False, **kwargs)
    spk = preprocess(
        "criteo", inputs, tmp_path / "spk", engine="spark", spark=spark, progress=False, **kwargs
    )
    assert spk["rows"] == emb["rows"] and spk["bad_row_examples"] == emb["bad_row_examples"]
    _assert_same(tmp_path / "emb", tmp_path / "spk", ["train", "test"])


def test_each_file_is_planned_once_so_many_files_do_not_stall_spark(tmp_path, spark, monkeypatch):
    # Each file was parsed from a filter of the union of all files' lines, so the plan of
    # the checked rows held every file's scan once per file: 200 files of 2k rows planned for
    # over 6 minutes (a 6 GB heap) before a row was read. One scan per file now.
    from lazydp.preprocess.spark import SparkEngine

    inputs = []
    for i in range(4):
        inputs.append(tmp_path / f"day_{i}")
        shutil.copy(FIX / "criteo_small.tsv", inputs[-1])
    plans = []
    close = SparkEngine.close

    def keep_plan(engine):
        plan = engine.spark.table("checked")._jdf.queryExecution().analyzed().toString()
        plans.append(plan)
        close(engine)

    monkeypatch.setattr(SparkEngine, "close", keep_plan)
    spk = preprocess("criteo", inputs, tmp_path / "spk", engine="spark", spark=spark)
    assert plans[0].count("] text") == len(inputs)
    emb = preprocess("criteo", inputs, tmp_path / "emb", progress=False)
    assert spk["rows"] == emb["rows"]
    _assert_same(tmp_path / "emb", tmp_path / "spk", ["train", "test"])


def test_spark_fails_on_the_same_bad_row(tmp_path, spark):
    with pytest.raises(DataError) as emb:
        preprocess("movielens", [FIX / "movielens_bad.csv"], tmp_path / "a", progress=False)
    with pytest.raises(DataError) as spk:
        preprocess(
            "movielens", [FIX / "movielens_bad.csv"], tmp_path / "b", engine="spark", spark=spark
        )
    assert str(emb.value) == str(spk.value)
    assert "movielens_bad.csv, line 3: rating is not a rating (3 bad row(s) in all)" in str(
        spk.value
    )
    assert list(tmp_path.iterdir()) == []


def test_spark_reads_a_long_quoted_field_and_refuses_names_it_would_misread(
    tmp_path, spark, monkeypatch
):
    # A quoted title of 3,000 characters overflowed the JVM's stack in Spark's regex (~2,000
    # lines of Py4J traceback); the quoting rules are the same with the unrolled pattern.
    text = (FIX / "movielens_small.csv").read_text(encoding="utf-8").splitlines()
    long_title = '"' + "a, " * 1000 + 'b ""quoted"""'
    head, first = text[0], text[1].split(",")
    title_at = head.split(",").index("title")
    first[title_at] = long_title
    src = tmp_path / "long.csv"
    src.write_text("\n".join([head, ",".join(first), *text[2:]]) + "\n", encoding="utf-8")
    emb = preprocess("movielens", [src], tmp_path / "emb", progress=False)
    spk = preprocess("movielens", [src], tmp_path / "spk", engine="spark", spark=spark)
    assert spk["rows"] == emb["rows"] and spk["bad_rows"] == emb["bad_rows"] == 0
    _assert_same(tmp_path / "emb", tmp_path / "spk", ["train", "test"])
    # Spark reads "_x.csv" as a hidden file (zero rows, exit 0) and "x[1].csv" as a pattern.
    for name in ("_part2.csv", "ml[1].csv", "a:b.csv"):
        odd = tmp_path / name
        odd.write_bytes(src.read_bytes())
        link = tmp_path / f"link{len(name)}.csv"  # Spark is given the file a link points to
        link.symlink_to(odd)
        for given in (odd, link):
            with pytest.raises(ConfigError, match="Spark reads a file whose name"):
                preprocess("movielens", [given], tmp_path / "o", engine="spark", spark=spark)
    colon_dir = tmp_path / "t12:00"  # a ':' in a directory is read fine
    colon_dir.mkdir()
    (colon_dir / "day.csv").write_bytes(src.read_bytes())
    assert (
        preprocess(
            "movielens", [colon_dir / "day.csv"], tmp_path / "c", engine="spark", spark=spark
        )["rows"]
        == emb["rows"]
    )
    assert preprocess("movielens", [odd], tmp_path / "e", progress=False)["rows"] == emb["rows"]
    # A relative output with a ':' in its name failed in Hadoop ("Relative path in absolute URI")
    monkeypatch.chdir(tmp_path)
    meta = preprocess("movielens", [src], "./o:1", engine="spark", spark=spark, progress=False)
    assert meta["rows"] == emb["rows"]
    _assert_same(tmp_path / "emb", tmp_path / "o:1", ["train", "test"])


def test_both_engines_refuse_text_that_is_not_utf8_with_the_same_message(tmp_path, spark):
    # Spark's text source reads bytes that are not UTF-8 as U+FFFD and used to go on (the
    # embedded reader refused the file): the engines hashed different text.
    good = (FIX / "movielens_small.csv").read_bytes().split(b"\n")
    for name, bad in (("bytes.csv", b"\xff\xfe"), ("fffd.csv", "\ufffd".encode())):
        src = tmp_path / name
        src.write_bytes(b"\n".join([*good[:3], good[3] + bad, *good[4:]]))
        with pytest.raises(DataError) as emb:
            preprocess("movielens", [src], tmp_path / "a", progress=False)
        with pytest.raises(DataError) as spk:
            preprocess("movielens", [src], tmp_path / "b", engine="spark", spark=spark)
        assert str(emb.value) == str(spk.value)
        assert f"{name}, line 4: invalid UTF-8" in str(spk.value)


def test_both_engines_refuse_compressed_input_with_the_same_message(tmp_path, spark):
    # Spark decompresses .bz2 (and .deflate, .lz4, ...) by name, where the embedded engine
    # refused the file; a plain file named .bz2 read as empty on Spark and fine here.
    import bz2
    import zlib

    data = (FIX / "movielens_small.csv").read_bytes()
    cases = {
        "a.csv.bz2": bz2.compress(data),
        "b.csv.bz2": data,
        "c.csv.deflate": zlib.compress(data),
        "d.csv": gzip.compress(data),
        "e.csv.BZ2": data,  # Spark matches the suffix ignoring case
    }
    for name, content in cases.items():
        src = tmp_path / name
        src.write_bytes(content)
        with pytest.raises(DataError) as emb:
            preprocess("movielens", [src], tmp_path / "a", progress=False)
        with pytest.raises(DataError) as spk:
            preprocess("movielens", [src], tmp_path / "b", engine="spark", spark=spark)
        assert str(emb.value) == str(spk.value)
        assert str(src) in str(spk.value)


def test_a_damaged_gz_is_the_same_clear_error_on_spark(tmp_path, spark):
    # Spark failed with ~60 lines of Java stack trace (FAILED_READ_FILE) from inside Py4J.
    data = (FIX / "movielens_small.csv").read_bytes()
    for name, content in (("cut.csv.gz", gzip.compress(data)[:-20]), ("plain.csv.gz", data)):
        src = tmp_path / name
        src.write_bytes(content)
        with pytest.raises(DataError, match=r"cannot decompress \(.+\); the file is damaged"):
            preprocess("movielens", [src], tmp_path / "b", engine="spark", spark=spark)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.csv.gz", "plain.csv.gz"]


def _small_on_spark(tmp_path, **kw):
    """The small MovieLens fixture through the Spark engine into tmp_path / "out"."""
    out = tmp_path / "out"
    return preprocess(
        "movielens", [FIX / "movielens_small.csv"], out, engine="spark", progress=False, **kw
    )


def test_a_master_url_spark_cannot_use_is_a_clear_error_before_spark_starts(tmp_path):
    # A standalone master that nothing answers at cost a minute of Java stack traces, then a
    # Py4J traceback ("Cannot call methods on a stopped SparkContext"); a malformed URL failed
    # inside spark-submit or SparkContext with a Java stack trace.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    cases = {
        "127.0.0.1:7077": "is not a Spark master URL; use local[N], spark://HOST:PORT",
        "spark://127.0.0.1": "'127.0.0.1' is not HOST:PORT",
        "spark://127.0.0.1:99999": "'127.0.0.1:99999' is not HOST:PORT",
        f"spark://127.0.0.1:{port}": f"no Spark master answers there (127.0.0.1:{port}: ",
    }
    for url, message in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            _small_on_spark(tmp_path, spark_master=url)
    assert list(tmp_path.iterdir()) == []


def test_a_master_other_than_the_running_sessions_is_refused_not_ignored(tmp_path, spark):
    # One SparkContext per process: getOrCreate handed back the running session, and the run
    # went to its master instead of the one asked for, without a word.
    with pytest.raises(ConfigError, match=r"already runs a SparkSession on 'local\[2\]'"):
        _small_on_spark(tmp_path, spark_master="local[1]")
    assert list(tmp_path.iterdir()) == []
    assert spark.sparkContext.master == "local[2]"  # the running session is untouched


def test_a_master_other_than_the_given_sessions_is_refused_not_ignored(tmp_path, spark):
    # spark=... with another spark_master ran on the session's master, spark_master unused.
    with pytest.raises(ConfigError, match=r"the session given as spark=... runs on 'local\[2\]'"):
        _small_on_spark(tmp_path, spark=spark, spark_master="local[1]")
    assert list(tmp_path.iterdir()) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def master_without_workers(tmp_path):
    """A Spark standalone master with no worker (``spark://127.0.0.1:PORT``), stopped after
    the test whatever happens."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("a Spark standalone master needs Java (no java on PATH, no JAVA_HOME)")
    import pyspark

    home = Path(pyspark.__file__).parent
    port = _free_port()
    log = tmp_path / "master.log"
    cmd = [str(home / "bin" / "spark-class"), "org.apache.spark.deploy.master.Master"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--webui-port", "0"]
    env = {**os.environ, "SPARK_HOME": str(home), "SPARK_LOG_DIR": str(tmp_path)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120  # a JVM start on a loaded machine; not a timing check
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the Spark master did not start:\n{log.read_text()[-2000:]}")
                time.sleep(0.2)
        yield f"spark://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_session_started_for_a_cluster_that_runs_nothing_is_stopped(monkeypatch):
    # Left running after the error, it made the next call with another master fail as
    # "already runs a SparkSession", and the caller held no handle to stop it. A session the
    # caller passed in is the caller's: it stays.
    import lazydp.preprocess.spark as spark_module

    class Session:
        stopped = False

        def stop(self):
            self.stopped = True

    def no_task(spark, wait_s):
        raise ConfigError("ran no task")

    monkeypatch.setattr(spark_module, "await_first_task", no_task)
    ours = Session()
    monkeypatch.setattr(spark_module, "spark_session", lambda master: ours)
    with pytest.raises(ConfigError, match="ran no task"):
        spark_module.SparkEngine(None, "spark://h:7077", progress=False)
    assert ours.stopped
    theirs = Session()
    with pytest.raises(ConfigError, match="ran no task"):
        spark_module.SparkEngine(theirs, None, progress=False)
    assert not theirs.stopped


def test_a_cluster_without_workers_is_a_clear_error_not_a_silent_hang(
    tmp_path, master_without_workers
):
    # The first job waited forever for an executor, and with Spark's log at ERROR it did so
    # without a word. The driver runs in its own process: this one has a local session.
    cmd = [sys.executable, "-m", "lazydp", "preprocess", "--format", "movielens"]
    cmd += ["--input", str(FIX / "movielens_small.csv"), "--output", str(tmp_path / "out")]
    cmd += ["--engine", "spark", "--spark-master", master_without_workers, "--spark-wait", "1"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("lazydp preprocess hung on a Spark master without workers")
    assert done.returncode == 1, done.stderr[-3000:]
    assert (
        f"error: the Spark cluster {master_without_workers!r} ran no task in 1 s: no worker "
        "offered this application an executor"
    ) in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["master.log"]


def test_a_local_session_gets_a_heap_sized_to_the_machine(spark):
    # Spark's 1 GiB default spilled the pipeline's cached views to disk from ~0.5M rows on.
    heap = spark.sparkContext.getConf().get("spark.driver.memory")  # the default is unset
    assert heap is not None and heap.endswith("m") and 1024 <= int(heap[:-1]) <= 16384


@pytest.mark.parametrize(("available_gib", "heap"), [(1, "1024m"), (24, "6144m"), (1024, "16384m")])
def test_the_local_heap_is_a_quarter_of_what_is_available_within_bounds(
    available_gib, heap, monkeypatch
):
    from lazydp.bench import memory
    from lazydp.preprocess.spark import local_driver_memory

    for name in ("SPARK_DRIVER_MEMORY", "PYSPARK_SUBMIT_ARGS", "SPARK_CONF_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: available_gib << 30)
    assert local_driver_memory("local[2]") == heap
    assert local_driver_memory("local") == heap
    assert local_driver_memory("spark://head:7077") is None  # executors cache, not the driver
    assert local_driver_memory("yarn") is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SPARK_DRIVER_MEMORY", "2g"),
        ("PYSPARK_SUBMIT_ARGS", "--driver-memory 2g pyspark-shell"),
        ("PYSPARK_SUBMIT_ARGS", "--conf spark.driver.memory=2g pyspark-shell"),
        ("SPARK_CONF_DIR", "conf"),
    ],
)
def test_a_heap_the_user_set_is_left_alone(name, value, tmp_path, monkeypatch):
    from lazydp.preprocess.spark import local_driver_memory

    for other in ("SPARK_DRIVER_MEMORY", "PYSPARK_SUBMIT_ARGS", "SPARK_CONF_DIR"):
        monkeypatch.delenv(other, raising=False)
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "spark-defaults.conf").write_text(
        "spark.executor.cores 2\nspark.driver.memory   3g\n"
    )
    monkeypatch.setenv(name, str(tmp_path / value) if name == "SPARK_CONF_DIR" else value)
    assert local_driver_memory("local[2]") is None
    (tmp_path / "conf" / "spark-defaults.conf").write_text("spark.executor.cores 2\n")
    if name == "SPARK_CONF_DIR":  # a defaults file without the key leaves it to us
        assert local_driver_memory("local[2]") is not None
