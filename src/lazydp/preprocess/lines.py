"""Stream a local text file as numbered lines, in chunks, with Hadoop's line rules.

Contract: lines end at ``\\n``, ``\\r\\n`` or a lone ``\\r`` (exactly what Spark's text source and
Hadoop's LineRecordReader do), a final line without terminator counts, a trailing terminator
does not start an empty line. Line numbers are 1-based physical line numbers. Files ending in
``.gz`` are decompressed on the fly. Text must be UTF-8 (invalid bytes are an error, since the
two engines would hash different bytes).
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from lazydp.errors import DataError

BLOCK_BYTES = 8 << 20


def _open(path: Path) -> IO[bytes]:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")  # noqa: SIM115


def iter_line_chunks(
    path: str | Path, chunk_lines: int = 1 << 18
) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(first_line_no, lines)`` chunks of at most about ``chunk_lines`` lines.

    Example::

        for first, lines in iter_line_chunks("day_0.tsv"):
            print(first, len(lines))
    """
    path = Path(path)
    next_no = 1
    pending: list[str] = []
    carry = b""
    with _open(path) as f:
        while True:
            block = f.read(BLOCK_BYTES)
            data = carry + block
            if block:
                # keep an unfinished last line (and a trailing \r that may precede \n) for later
                cut = max(data.rfind(b"\n"), data.rfind(b"\r"))
                if cut == len(data) - 1 and data.endswith(b"\r"):
                    cut = max(data.rfind(b"\n", 0, cut), data.rfind(b"\r", 0, cut))
                carry, data = data[cut + 1 :], data[: cut + 1]
            else:
                carry = b""
            pending.extend(_split_lines(data, path, next_no + len(pending)))
            while len(pending) >= chunk_lines:
                yield next_no, pending[:chunk_lines]
                next_no += chunk_lines
                pending = pending[chunk_lines:]
            if not block:
                break
    if pending:
        yield next_no, pending


def _split_lines(data: bytes, path: Path, first_no: int) -> list[str]:
    # bytes.splitlines knows only \n, \r and \r\n, unlike str.splitlines (which also splits at
    # \x0b, \x1c, \u2028, ...), so split the bytes and decode each line.
    raw = data.splitlines()
    try:
        return [line.decode("utf-8") for line in raw]
    except UnicodeDecodeError as exc:
        bad = next(i for i, line in enumerate(raw) if not _is_utf8(line))
        raise DataError(
            f"{path}, line {first_no + bad}: invalid UTF-8; re-encode the file as UTF-8"
        ) from exc


def _is_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
