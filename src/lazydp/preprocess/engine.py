"""What the pipeline needs from an engine: load numbered lines, run SQL, write Parquet.

Contract: after ``load_lines(paths)`` a relation ``lines(file_idx INT, line_no BIGINT,
line STRING)`` holds every physical line of every file (1-based line numbers, Hadoop line rules,
see lazydp.preprocess.lines), ``lines_<i>`` holds file i's rows of it, and the method returns
each file's first line (the csv header). Each file is parsed from its own relation: parsing a
filter of ``lines`` per file put every file's plan into every other's, and Spark's planning of
200 small files ran for minutes before reading a row.
``view(name, sql, materialize)`` names a relation; ``query`` returns rows as tuples;
``write_parquet(sql, directory)`` writes the result as ``directory/part-*.parquet`` whose
concatenation in file-name order is the result in its ORDER BY order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from lazydp.preprocess.dialect import Dialect


class Engine(ABC):
    dialect: Dialect
    name: str

    @abstractmethod
    def load_lines(self, paths: list[str]) -> list[str | None]: ...

    @abstractmethod
    def view(self, name: str, sql: str, materialize: bool = False) -> None: ...

    @abstractmethod
    def query(self, sql: str) -> list[tuple[Any, ...]]: ...

    @abstractmethod
    def write_parquet(self, sql: str, directory: Path) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass
