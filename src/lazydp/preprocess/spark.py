"""The Spark engine: the same SQL on PySpark (local mode ``local[2]`` or a cluster master URL).

Line numbers without Python UDFs: the text source tags every line with its split's start offset
(``input_file_block_start``) and a per-partition increasing id; one small aggregation gives each
split's line count and first id, so ``line_no = lines in earlier splits + (id - first id) + 1``.
Hadoop's LineRecordReader assigns a line crossing a split boundary to the split where it starts,
so every line is counted once. Inputs and the output must be paths every executor sees (local
files in local mode, a shared file system on a cluster). Nothing runs Python on an executor (no
UDF, no DataFrame made from Python objects), so workers need no copy of the driver's Python
environment. ANSI mode is switched off for the session's SQL so that a malformed value is a
bad row, never a failed job.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

from lazydp.errors import ConfigError
from lazydp.preprocess.dialect import SparkDialect
from lazydp.preprocess.engine import Engine
from lazydp.preprocess.lines import damaged, is_gz

DEFAULT_MASTER = "local[2]"
CONNECT_TIMEOUT_S = 5.0  # to open a TCP connection to a standalone master
# How long a cluster may take to run a first task: executors start in seconds on a standalone
# cluster, a busy YARN queue may need longer (--spark-wait).
SPARK_WAIT_S = 120.0
# What spark-submit and SparkContext accept besides spark:// URLs (checked in check_master).
_OTHER_MASTERS = re.compile(r"local(\[[^\]]+\])?|local-cluster\[[^\]]+\]|yarn|k8s://.+")
# The heap of a local-mode session we start: a quarter of the memory available, within these
# bounds. Spark's own default (1 GiB) leaves ~400 MiB for cached relations, so the pipeline's
# cached views spill to disk, serialised, from about 0.5M Criteo rows on (measured: 1M rows
# took 92 s at 1 GiB, 69 s at 6 GiB; benchmarks/RESULTS.md, "Preprocessing").
LOCAL_HEAP_MIN_MIB, LOCAL_HEAP_MAX_MIB = 1024, 16384


def check_master(master: str) -> None:
    """ConfigError for a master URL Spark would refuse with a Java stack trace, and for a
    standalone master (``spark://HOST:PORT[,HOST:PORT...]``) that nothing answers at: Spark
    retries that for a minute, printing stack traces, then fails inside Py4J.

    Example: ``check_master("local[2]")``.
    """
    if _OTHER_MASTERS.fullmatch(master):
        return
    if not master.startswith("spark://"):
        raise ConfigError(
            f"spark_master={master!r} is not a Spark master URL; use local[N], "
            "spark://HOST:PORT (the URL the master's log shows), yarn or k8s://HOST:PORT"
        )
    failures = []
    for address in master.removeprefix("spark://").split(","):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"spark_master={master!r}: {address!r} is not HOST:PORT; a standalone "
                "master's URL is spark://HOST:PORT (port 7077 unless it was started otherwise)"
            )
        try:
            socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_S).close()
            return  # one master of a standby group is enough, as for Spark
        except OSError as exc:
            failures.append(f"{address}: {exc.strerror or exc}")
    raise ConfigError(
        f"spark_master={master!r}: no Spark master answers there ({'; '.join(failures)}); "
        "start the master, or give the spark://HOST:PORT URL its log shows"
    )


def spark_session(master: str | None = None, shuffle_partitions: int = 2) -> Any:
    """A SparkSession for preprocessing (UI off, few shuffle partitions).

    Example: ``spark = spark_session("local[2]")``.
    """
    from py4j.protocol import Py4JError
    from pyspark import SparkContext
    from pyspark.errors import PySparkException
    from pyspark.sql import SparkSession

    asked, master = master, master or DEFAULT_MASTER
    check_master(master)
    running = SparkContext._active_spark_context
    if asked is not None and running is not None and running.master != master:
        # getOrCreate would hand back that session (one SparkContext per process) and run
        # on its master without a word, after setting this builder's options on it.
        raise ConfigError(
            f"spark_master={master!r}, but this process already runs a SparkSession on "
            f"{running.master!r}, which Spark would use instead. Pass that session as "
            "spark=... (without spark_master) to use it, or stop it first (spark.stop())"
        )
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    memory = local_driver_memory(master) if running is None else None
    builder = (
        SparkSession.builder.master(master)
        .appName("lazydp-preprocess")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", str(shuffle_partitions))
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs", "false")
    )
    if memory is not None:
        builder = builder.config("spark.driver.memory", memory)
    try:
        spark = builder.getOrCreate()
    except (Py4JError, PySparkException) as exc:
        raise ConfigError(
            f"Spark did not start with spark_master={master!r} ({_first_line(exc)}); Spark's "
            "log above says why: check the master URL and that the cluster runs"
        ) from None
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def local_driver_memory(master: str) -> str | None:
    """The heap (``spark.driver.memory``) for a local-mode JVM this process starts, or None to
    leave Spark's default: on a cluster (the driver caches nothing there), and where the user
    set it already (``SPARK_DRIVER_MEMORY``, ``--driver-memory`` in ``PYSPARK_SUBMIT_ARGS``, or
    ``spark-defaults.conf``), which a builder setting would override.

    Example: ``local_driver_memory("yarn") is None``.
    """
    from lazydp.bench.memory import available_memory_bytes  # /proc/meminfo and cgroups

    if not master.startswith("local") or _driver_memory_configured():
        return None
    mib = available_memory_bytes() // 4 >> 20
    return f"{min(max(mib, LOCAL_HEAP_MIN_MIB), LOCAL_HEAP_MAX_MIB)}m"


def _driver_memory_configured() -> bool:
    if os.environ.get("SPARK_DRIVER_MEMORY"):
        return True
    submit = os.environ.get("PYSPARK_SUBMIT_ARGS", "")
    if "--driver-memory" in submit or "spark.driver.memory" in submit:
        return True
    home = os.environ.get("SPARK_HOME") or _pyspark_home()  # pip's pyspark is its own home
    defaults = Path(os.environ.get("SPARK_CONF_DIR") or Path(home) / "conf") / "spark-defaults.conf"
    try:
        text = defaults.read_text()
    except OSError:
        return False
    return any(line.split()[:1] == ["spark.driver.memory"] for line in text.splitlines())


def _pyspark_home() -> str:
    import pyspark

    return str(Path(pyspark.__file__).parent)


def await_first_task(spark: Any, wait_s: float = SPARK_WAIT_S) -> None:
    """ConfigError unless the session's cluster runs a one-row job within ``wait_s`` seconds
    (0 waits without limit; local masters are not checked). A master with no worker that can
    host this application's executor queues every job forever, and with Spark's log at ERROR
    it does so without a word.

    Example: ``await_first_task(spark_session("spark://head:7077"), wait_s=60)``.
    """
    from pyspark import InheritableThread  # carries the job group to the JVM thread

    sc = spark.sparkContext
    if wait_s == 0 or sc.master.startswith("local"):
        return
    group, failed = f"lazydp-first-task-{uuid.uuid4().hex}", []

    def probe() -> None:
        try:
            sc.setJobGroup(group, "lazydp: wait for an executor", interruptOnCancel=True)
            spark.range(0, 1, 1, 1).collect()
        except Exception as exc:  # reported below, in the caller's thread
            failed.append(exc)

    thread = InheritableThread(target=probe, daemon=True)
    thread.start()
    thread.join(wait_s)
    if thread.is_alive():
        sc.cancelJobGroup(group)
        memory = sc.getConf().get("spark.executor.memory", "1g")
        raise ConfigError(
            f"the Spark cluster {sc.master!r} ran no task in {wait_s:g} s: no worker offered "
            f"this application an executor (no worker, or none with a free core and "
            f"spark.executor.memory={memory}; the master's web UI lists them). Start a worker, "
            "or wait longer with --spark-wait SECONDS (spark_wait_s; 0 waits without limit)"
        )
    if failed:
        raise ConfigError(
            f"the Spark cluster {sc.master!r} failed a one-row job ({_first_line(failed[0])}); "
            "Spark's log above says why: check the workers (their logs and the master's web UI)"
        )


def _check_session_master(spark: Any, master: str) -> None:
    """ConfigError when a session is given together with another master: the run would go to
    the session's master, and ``master`` was ignored without a word."""
    running = spark.sparkContext.master
    if running != master:
        raise ConfigError(
            f"spark_master={master!r}, but the session given as spark=... runs on "
            f"{running!r}, where the run would go instead. Leave out spark_master to use that "
            "session, or leave out spark to start one on the master asked for"
        )


def _first_line(exc: Exception) -> str:
    """The Java exception's own message, without Py4J's preamble and the stack trace."""
    java = getattr(exc, "java_exception", None)
    text = str(java) if java is not None else str(exc)
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)


def _values_sql(rows: list[tuple[int, int]], *names: str) -> str:
    """A relation of BIGINT rows as an inline VALUES table. createDataFrame on a Python list
    runs a Python worker on an executor, which on a cluster needs the driver's interpreter at
    the same path on every worker (PYSPARK_PYTHON); a VALUES table stays in the JVM."""
    values = ", ".join(f"({', '.join(str(int(v)) for v in row)})" for row in rows)
    cols = ", ".join(f"CAST({n} AS BIGINT) AS {n}" for n in names)
    return f"SELECT {cols} FROM VALUES {values} AS t({', '.join(names)})"


def _read_splits(tagged: Any, path: str) -> list[Any]:
    """(block start, line count, first id) of each split: the pass that reads the whole file.
    A damaged .gz fails it with a Java traceback; say what the embedded engine says instead."""
    from py4j.protocol import Py4JJavaError
    from pyspark.sql import functions as F

    try:
        return sorted(tagged.groupBy("blk").agg(F.count("*"), F.min("mid")).collect())
    except Py4JJavaError as exc:
        causes = re.findall(r"Caused by: ([^\n]+)", str(exc))
        if not is_gz(path) or "FAILED_READ_FILE" not in str(exc) or not causes:
            raise
        raise damaged(path, causes[-1].strip()) from None


class SparkEngine(Engine):
    """Spark SQL engine over a session (made from ``master`` when none is given)."""

    name = "spark"

    def __init__(
        self,
        spark: Any = None,
        master: str | None = None,
        progress: bool = True,
        wait_s: float = SPARK_WAIT_S,
    ) -> None:
        self.dialect = SparkDialect()
        self.progress = progress
        if spark is not None and master is not None:
            _check_session_master(spark, master)
        self.spark = spark if spark is not None else spark_session(master)
        try:
            await_first_task(self.spark, wait_s)
        except ConfigError:
            if spark is None:  # ours: left running, it would refuse the next call's master
                self.spark.stop()
            raise
        self.spark.conf.set("spark.sql.ansi.enabled", "false")
        self._cached: list[Any] = []

    def load_lines(self, paths: list[str]) -> list[str | None]:
        from pyspark.sql import functions as F

        frames = []
        for file_idx, path in enumerate(paths):
            tagged = self.spark.read.text(path).select(
                F.input_file_block_start().alias("blk"),
                F.monotonically_increasing_id().alias("mid"),
                F.col("value").alias("line"),
            )
            tagged = tagged.persist()
            self._cached.append(tagged)
            splits = _read_splits(tagged, path)
            offsets, before = [], 0
            for blk, count, first_id in splits:
                offsets.append((int(blk), before - int(first_id)))
                before += int(count)
            shift = self.spark.sql(_values_sql(offsets or [(0, 0)], "blk", "shift"))
            frame = tagged.join(F.broadcast(shift), "blk").select(
                F.lit(file_idx).cast("int").alias("file_idx"),
                (F.col("mid") + F.col("shift") + 1).alias("line_no"),
                "line",
            )
            frame.createOrReplaceTempView(f"lines_{file_idx}")
            frames.append(frame)
        lines = frames[0]
        for frame in frames[1:]:
            lines = lines.unionByName(frame)
        lines.createOrReplaceTempView("lines")
        firsts = dict(
            self.query("SELECT file_idx, line FROM lines WHERE line_no = 1")  # type: ignore[arg-type]
        )
        return [firsts.get(i) for i in range(len(paths))]

    def view(self, name: str, sql: str, materialize: bool = False) -> None:
        frame = self.spark.sql(sql)
        if materialize:
            frame = frame.persist()
            self._cached.append(frame)
        frame.createOrReplaceTempView(name)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self.spark.sql(sql).collect()]

    def write_parquet(self, sql: str, directory: Path) -> None:
        # Absolute: Hadoop reads a relative "a:b.tmp-x/train" as a URI with the scheme "a".
        target = str(directory.absolute())
        self.spark.sql(sql).write.option("compression", "snappy").parquet(target)
        # Hadoop's checksum side files are noise for readers of the directory
        for side in list(directory.glob(".*.crc")) + list(directory.glob("_SUCCESS")):
            side.unlink()

    def close(self) -> None:
        for frame in self._cached:
            frame.unpersist()
        self._cached.clear()
