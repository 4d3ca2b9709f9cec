"""Atomic output directories: everything is written into ``DIR.tmp-XXXX`` next to ``DIR`` and
renamed to ``DIR`` as the very last step, so a crash never leaves a directory that looks complete
(a complete one always has ``metadata.json``, written last inside the temporary directory).

A run killed hard (SIGKILL, out of memory) cannot remove its temporary directory, which may
hold most of a large data set. Each one therefore names its writer (host and process id, in
``.lazydp-writer``, removed before the rename); the next run for the same ``DIR`` removes those
whose writer is a process on this host that no longer exists, and leaves every other one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lazydp._process import running
from lazydp.errors import ConfigError, DataError, StorageError

METADATA = "metadata.json"
#: metadata.json's format: a later lazydp that changes what a field means (how ids were hashed,
#: where a DP vocabulary's cost is recorded) writes a higher one, which this version refuses.
SCHEMA_VERSION = 1
WRITER = ".lazydp-writer"  # "host pid" of the process writing a temporary directory


@contextmanager
def atomic_directory(
    final: str | Path, overwrite: bool = False, inputs: Sequence[str | Path] = ()
) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``final`` when the block ends without error.

    ``overwrite`` replaces only an empty directory or an earlier lazydp output, and never one
    holding any of ``inputs``: it deletes the old directory.

    Example::

        with atomic_directory("out/criteo") as tmp:
            (tmp / "metadata.json").write_text("{}")
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise ConfigError(
            f"output={str(final)!r} already exists; remove it, choose another --output, "
            "or pass --overwrite (overwrite=True) to replace an earlier lazydp output"
        )
    if final.exists():
        _check_replaceable(final, inputs)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(final)
        tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
        (tmp / WRITER).write_text(f"{socket.gethostname()} {os.getpid()}\n", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(_unwritable(final, exc)) from None
    try:
        yield tmp
        (tmp / WRITER).unlink(missing_ok=True)
        if overwrite and final.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            _rename_new(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _rename_new(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``, which did not exist when the run started; ConfigError if
    it does now. Another run for the same output (two `lazydp preprocess` started at once)
    finished first: replacing its output without --overwrite dropped it silently, and both runs
    reported "wrote DIR". (A rename onto a non-empty directory fails: the check is atomic.)"""
    try:
        if final.exists():
            raise FileExistsError(errno.EEXIST, "exists", str(final))
        os.rename(tmp, final)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        raise ConfigError(
            f"output={str(final)!r} was created by another run while this one was writing it "
            "(two runs for one --output?); it is left as that run wrote it and this run's "
            "output is discarded. Check which one you want: remove it, choose another "
            "--output, or pass --overwrite (overwrite=True) to replace it."
        ) from None


#: How a full disk (or quota) reads in the engines' errors: DuckDB raises its own IOException and
#: Spark a Py4JJavaError, neither an OSError, both with the system's message in their text.
_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("No space left on device", "Disk quota exceeded")


@contextmanager
def disk_full_named(final: str | Path) -> Iterator[None]:
    """A full disk or quota in the block (from Python, DuckDB or Spark) raised as a
    StorageError naming ``final``: a traceback from inside DuckDB or Py4J named neither the
    output nor that nothing of it was kept."""
    try:
        yield
    except Exception as exc:
        full = isinstance(exc, OSError) and exc.errno in _FULL
        why = next((t for t in _FULL_TEXT if t in str(exc)), None)
        if not (full or why):
            raise
        raise StorageError(
            f"output={str(final)!r}: the disk filled up while writing it ({why or exc}); the "
            "partial output was removed and nothing was written there. Free disk space where "
            "the output and the engine's temporary files go (DuckDB spills inside the output's "
            "temporary directory, Spark into spark.local.dir, /tmp by default), or choose an "
            "--output on a disk with room, then run the command again."
        ) from None


def _remove_abandoned(final: Path) -> None:
    """Remove ``final``'s temporary directories whose writer process (on this host) is gone."""
    host = socket.gethostname()
    for d in final.parent.iterdir():
        if not d.name.startswith(f"{final.name}.tmp-") or not d.is_dir():
            continue
        try:
            writer_host, pid = (d / WRITER).read_text(encoding="utf-8").split()
            gone = writer_host == host and not running(int(pid))
        except (OSError, ValueError):
            continue  # no writer recorded (older lazydp, or not ours): leave it
        if gone:
            shutil.rmtree(d, ignore_errors=True)
            warnings.warn(
                f"removed {d}: the temporary output of an earlier run for {final} whose "
                f"process ({pid}) no longer exists (killed before it could clean up)",
                stacklevel=3,
            )


def _check_replaceable(final: Path, inputs: Sequence[str | Path]) -> None:
    """ConfigError unless ``final`` is a directory that overwrite may delete."""
    if not final.is_dir():
        raise ConfigError(
            f"output={str(final)!r} is a file, not a directory; overwrite only replaces an "
            "output directory: choose another --output"
        )
    inside = [
        str(p)
        for p in inputs
        if "://" not in str(p) and Path(p).resolve().is_relative_to(final.resolve())
    ]
    if inside:
        raise ConfigError(
            f"output={str(final)!r} holds the input {inside[0]!r}; overwrite would delete it. "
            "Choose an --output outside the inputs' directories."
        )
    if any(final.iterdir()) and not (final / METADATA).is_file():
        raise ConfigError(
            f"output={str(final)!r} is not an earlier lazydp output (no {METADATA}) and not "
            "empty; overwrite deletes the directory, so it only replaces lazydp's own output. "
            "Choose another --output."
        )


def write_metadata(directory: Path, metadata: dict[str, Any]) -> None:
    """Write ``metadata.json`` (sorted keys, so equal metadata gives equal bytes)."""
    text = json.dumps(metadata, indent=2, sort_keys=True, default=str)
    (directory / METADATA).write_text(text + "\n", encoding="utf-8")


def _unwritable(final: Path, exc: OSError) -> str:
    """Why the output directory ``final`` cannot be created, and what to do."""
    blocker = next((p for p in [final.parent, *final.parent.parents] if p.is_file()), None)
    if blocker is not None:
        why = f"{str(blocker)!r} is a file, not a directory"
    elif isinstance(exc, PermissionError):
        why = f"no permission to write in {str(final.parent)!r}"
    else:
        why = f"{exc.strerror or exc} ({exc.filename or final.parent})"
    return f"output={str(final)!r} cannot be created: {why}; choose another --output"


def _damaged(path: Path, what: str) -> DataError:
    return DataError(
        f"{path}: {what}; the file is damaged or was not written by `lazydp preprocess`: "
        "run the preprocessing again"
    )


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """The metadata of a finished output directory (DataError when it is missing, not JSON or
    lacks what the readers need: ``rows`` and ``schema``, see ``check_metadata``)."""
    directory = Path(directory)
    path = directory / METADATA
    if not directory.is_dir():
        raise DataError(
            f"{str(directory)!r} is not a directory; give the --output directory of "
            "`lazydp preprocess`"
        )
    if not path.is_file():
        raise DataError(
            f"{str(directory)!r} has no {METADATA}: not a finished `lazydp preprocess` output; "
            "run the preprocessing (again)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc}); check it") from None
    except UnicodeDecodeError:
        raise _damaged(path, "is not UTF-8 text") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _damaged(
            path, f"is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    except (ValueError, RecursionError):  # json's limits: 4300-digit ints, deep nesting
        raise _damaged(
            path,
            "is not metadata lazydp writes (an integer of thousands of digits, or values "
            "nested thousands deep)",
        ) from None
    check_metadata(meta, path)
    return meta  # type: ignore[no-any-return]


def check_metadata(meta: Any, path: str | Path = METADATA) -> None:
    """DataError unless ``meta`` has what the readers use: ``rows`` ({split: count >= 0}) and
    ``schema`` (``dense``: names, ``categorical``: [{name, table_size >= 1, multi_valued}],
    optional ``label``: name), all column names distinct.

    Example: ``check_metadata({"rows": {"train": 0}, "schema": {"dense": [], "categorical": []}})``
    """
    path = Path(path)
    if not isinstance(meta, dict):
        raise _damaged(path, f"holds a JSON {type(meta).__name__}, not an object")
    _check_schema_version(meta.get("schema_version", SCHEMA_VERSION), path)
    _check_inputs_once(meta.get("inputs"), path)
    missing = [k for k in ("rows", "schema") if k not in meta]
    if missing:
        raise _damaged(path, f"lacks the key(s) {missing} (it needs 'rows' and 'schema')")
    rows, schema = meta["rows"], meta["schema"]
    if not isinstance(rows, dict):
        raise _damaged(path, f"'rows' is {rows!r}, not an object of split: row count")
    for split, n in rows.items():
        if not _count(n):
            raise _damaged(path, f"rows[{split!r}] is {n!r}, not an integer >= 0")
    if not isinstance(schema, dict):
        raise _damaged(path, f"'schema' is {schema!r}, not an object")
    for key in ("dense", "categorical"):
        if not isinstance(schema.get(key), list):
            raise _damaged(path, f"schema[{key!r}] is {schema.get(key)!r}, not a list")
    label = schema.get("label", "label")
    if not isinstance(label, str) or not label:
        raise _damaged(path, f"schema['label'] is {label!r}, not a column name")
    names = [label]
    for i, name in enumerate(schema["dense"]):
        if not isinstance(name, str) or not name:
            raise _damaged(path, f"schema['dense'][{i}] is {name!r}, not a column name")
        names.append(name)
    for i, c in enumerate(schema["categorical"]):
        where = f"schema['categorical'][{i}]"
        if not isinstance(c, dict):
            raise _damaged(path, f"{where} is {c!r}, not an object")
        absent = [k for k in ("name", "table_size", "multi_valued") if k not in c]
        if absent:
            raise _damaged(path, f"{where} lacks {absent}")
        if not isinstance(c["name"], str) or not c["name"]:
            raise _damaged(path, f"{where}['name'] is {c['name']!r}, not a column name")
        if not _count(c["table_size"]) or c["table_size"] < 1:
            raise _damaged(
                path,
                f"{where} ({c['name']!r}) has table_size {c['table_size']!r}; an embedding "
                "table needs an integer number of rows >= 1",
            )
        if not isinstance(c["multi_valued"], bool):
            raise _damaged(path, f"{where}['multi_valued'] is {c['multi_valued']!r}, not a bool")
        names.append(c["name"])
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise _damaged(path, f"schema names column(s) {repeated} more than once")


def _check_schema_version(version: Any, path: Path) -> None:
    """DataError unless this lazydp reads metadata of ``version`` (absent: hand-written, read
    as the current one). Data preprocessed by a newer lazydp was read as if its fields meant
    what they mean here: a cost or a hashing recorded another way was trained on silently."""
    if not _count(version) or version < 1:
        raise _damaged(path, f"schema_version is {version!r}, not an integer >= 1")
    if version > SCHEMA_VERSION:
        raise DataError(
            f"{path}: written by a newer lazydp (metadata schema_version {version}); this "
            f"lazydp reads schema_version {SCHEMA_VERSION} and could misread it (its privacy "
            "cost, its ids). Upgrade lazydp, or preprocess the data again with this version."
        )


def _check_inputs_once(inputs: Any, path: Path) -> None:
    """DataError for data read from one input twice. lazydp before 2026-12-07 accepted
    ``--input a.tsv a.tsv``: each raw record became two examples, so a training guarantee per
    example covered half a record, and a DP vocabulary counted each record twice against a
    cost computed for once. Preprocessing refuses that now; data it wrote then said so only in
    its ``inputs``. (A file given through two names cannot be told from here.)"""
    if not isinstance(inputs, list) or not all(isinstance(p, str) for p in inputs):
        return  # hand-written metadata: nothing recorded to check
    seen: set[str] = set()
    for p in inputs:
        if os.path.normpath(p) in seen:
            raise DataError(
                f"{path}: the data was preprocessed from {p!r} twice (by a lazydp that "
                "allowed it): its records are two examples each, and a DP vocabulary's "
                "recorded cost counts them once, so no guarantee lazydp reports would hold. "
                "Preprocess the data again, giving each file once."
            )
        seen.add(os.path.normpath(p))


def _count(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0
