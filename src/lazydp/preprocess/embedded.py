"""The embedded engine: DuckDB, in this process.

Why DuckDB: an SQL engine with native Parquet (and CSV) readers and writers, vectorised and
multi-threaded, that spills to disk (out-of-core) when the data outgrow memory, and runs the *same
relational plan* as Spark SQL, so one pipeline definition serves both engines. No JVM, no cluster,
starts in milliseconds.

Lines enter through a streaming reader (lazydp.preprocess.lines) in chunks of Arrow arrays, because
neither engine's CSV reader reports physical line numbers, and bad rows must be named by line. The
reader's chunks drive the progress bar (rows loaded).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
from tqdm import tqdm

from lazydp.preprocess.dialect import DuckDBDialect
from lazydp.preprocess.engine import Engine
from lazydp.preprocess.lines import iter_line_chunks


class EmbeddedEngine(Engine):
    """DuckDB engine. Example: ``EmbeddedEngine(tmp_dir).query("SELECT 1") == [(1,)]``."""

    name = "embedded"

    def __init__(self, spill_dir: Path, threads: int | None = None, progress: bool = True) -> None:
        self.dialect = DuckDBDialect()
        config: dict[str, Any] = {
            "temp_directory": str(spill_dir),
            "preserve_insertion_order": True,
        }
        if threads:
            config["threads"] = threads
        self.con = duckdb.connect(":memory:", config=config)
        # DuckDB draws its own bar on stdout in an interactive session (a REPL, Jupyter), also
        # with progress=False; the reader's bar (rows loaded) is the one lazydp shows.
        self.con.execute("SET enable_progress_bar = false")
        self.progress = progress

    def load_lines(self, paths: list[str]) -> list[str | None]:
        self.con.execute("CREATE TEMP TABLE lines (file_idx INTEGER, line_no BIGINT, line VARCHAR)")
        headers: list[str | None] = []
        bar = tqdm(desc="lines", unit=" rows", file=sys.stderr, disable=not self.progress)
        for file_idx, path in enumerate(paths):
            header = None
            for first, lines in iter_line_chunks(path):
                if first == 1:
                    header = lines[0] if lines else None
                chunk = pa.table(
                    {
                        "file_idx": pa.array([file_idx] * len(lines), pa.int32()),
                        "line_no": pa.array(range(first, first + len(lines)), pa.int64()),
                        "line": pa.array(lines, pa.string()),
                    }
                )
                self.con.register("chunk", chunk)
                self._execute("INSERT INTO lines SELECT * FROM chunk")
                self.con.unregister("chunk")
                bar.update(len(lines))
            headers.append(header)
            self.view(f"lines_{file_idx}", f"SELECT * FROM lines WHERE file_idx = {file_idx}")
        bar.close()
        return headers

    def view(self, name: str, sql: str, materialize: bool = False) -> None:
        kind = "TABLE" if materialize else "VIEW"
        self._execute(f"CREATE OR REPLACE TEMP {kind} {name} AS {sql}")

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        return self._execute(sql).fetchall()

    def write_parquet(self, sql: str, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        target = str(directory / "part-00000.parquet").replace("'", "''")
        # Through a table: DuckDB marks columns REQUIRED from table statistics, which an empty
        # query result lacks; a table (even an empty one) has them.
        self._execute(f"CREATE OR REPLACE TEMP TABLE _to_write AS {sql}")
        self._execute(f"COPY _to_write TO '{target}' (FORMAT parquet, COMPRESSION snappy)")
        self._execute("DROP TABLE _to_write")

    def _execute(self, sql: str) -> duckdb.DuckDBPyConnection:
        """Run ``sql``; KeyboardInterrupt when Ctrl-C stopped it. DuckDB takes the interrupt
        itself and raises ``RuntimeError("Query interrupted")`` instead: the command ended in
        a traceback (exit 1) rather than saying what an interrupted run leaves (exit 130)."""
        try:
            return self.con.execute(sql)
        except (RuntimeError, duckdb.InterruptException) as exc:
            if "interrupted" not in str(exc).lower():
                raise
            raise KeyboardInterrupt from None

    def close(self) -> None:
        self.con.close()
