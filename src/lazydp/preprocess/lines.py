"""Stream a local text file as numbered lines, in chunks, with Hadoop's line rules.

Contract: lines end at ``\\n``, ``\\r\\n`` or a lone ``\\r`` (exactly what Spark's text source and
Hadoop's LineRecordReader do), a final line without terminator counts, a trailing terminator
does not start an empty line, and a UTF-8 byte-order mark opening the file is dropped (as
LineRecordReader drops it). Line numbers are 1-based physical line numbers. Files ending in
``.gz`` (in any case, as in Spark) are decompressed on the fly. Text must be UTF-8 (invalid
bytes are an error, since the two engines would hash different bytes).
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from lazydp.errors import DataError

BLOCK_BYTES = 8 << 20
BOM = b"\xef\xbb\xbf"
NOT_UTF8 = (
    "invalid UTF-8 (or U+FFFD, the character a lossy conversion leaves for such bytes); "
    "re-encode the file as UTF-8"
)


# Leading bytes of compressed files this reader does not decompress (only ``.gz`` is read).
_COMPRESSED = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
# Suffixes Spark's reader (Hadoop's codecs) decompresses besides ``.gz``, in any case. This
# reader does not, so both engines refuse them: Spark read a .bz2 file the embedded one refused.
SPARK_CODEC_SUFFIXES = (".bz2", ".deflate", ".lz4", ".snappy", ".zst")


def check_compression(path: str | Path) -> None:
    """DataError for a file compressed otherwise than as ``.gz``, or named as if it were: the
    engines would read different text from it, or one of them would refuse it."""
    path = Path(path)
    if path.name.lower().endswith(SPARK_CODEC_SUFFIXES):
        raise DataError(
            f"{path}: a {path.suffix} file; only .gz files are decompressed (Spark would "
            "decompress this one and the embedded engine would not): decompress it, or gzip it "
            "to a .gz file"
        )
    if is_gz(path):
        return
    with open(path, "rb") as f:
        head = f.read(6)
    kind = "gzip" if head.startswith(b"\x1f\x8b") else None
    kind = kind or next((k for magic, k in _COMPRESSED.items() if head.startswith(magic)), None)
    if kind is not None:
        fix = "rename it to end in .gz" if kind == "gzip" else "decompress it first"
        raise DataError(f"{path} is {kind}-compressed; only .gz files are decompressed: {fix}")


def is_gz(path: str | Path) -> bool:
    """Whether a file is read as gzip: Hadoop matches codec suffixes ignoring case (x.GZ)."""
    return Path(path).suffix.lower() == ".gz"


def damaged(path: str | Path, why: object) -> DataError:
    """The error for a .gz file that cannot be decompressed (both engines)."""
    return DataError(
        f"{path}: cannot decompress ({why}); the file is damaged or truncated (an "
        "interrupted download?). Fetch it again."
    )


def _open(path: Path) -> IO[bytes]:
    check_compression(path)
    if is_gz(path):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")  # noqa: SIM115


def _read(f: IO[bytes], path: Path) -> bytes:
    """The next block; DataError naming the file for a damaged or truncated .gz."""
    try:
        return f.read(BLOCK_BYTES)
    except (EOFError, OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise damaged(path, exc) from None


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
    at_start = True
    with _open(path) as f:
        while True:
            block = _read(f, path)
            data = carry + block
            if block:
                # keep an unfinished last line (and a trailing \r that may precede \n) for later
                cut = max(data.rfind(b"\n"), data.rfind(b"\r"))
                if cut == len(data) - 1 and data.endswith(b"\r"):
                    cut = max(data.rfind(b"\n", 0, cut), data.rfind(b"\r", 0, cut))
                carry, data = data[cut + 1 :], data[: cut + 1]
            else:
                carry = b""
            if at_start and data:
                # Spark's reader drops one BOM there (line 1 of a headerless file would differ)
                data, at_start = data.removeprefix(BOM), False
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
        raise DataError(f"{path}, line {first_no + bad}: {NOT_UTF8}") from exc


def _is_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
