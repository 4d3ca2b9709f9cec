"""Atomic output directories: everything is written into ``DIR.tmp-XXXX`` next to ``DIR`` and
renamed to ``DIR`` as the very last step, so a crash never leaves a directory that looks complete
(a complete one always has ``metadata.json``, written last inside the temporary directory).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lazydp.errors import ConfigError

METADATA = "metadata.json"


@contextmanager
def atomic_directory(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``final`` when the block ends without error.

    Example::

        with atomic_directory("out/criteo") as tmp:
            (tmp / "metadata.json").write_text("{}")
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise ConfigError(
            f"output={str(final)!r} already exists; remove it, choose another --output, "
            "or pass overwrite=True"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_metadata(directory: Path, metadata: dict[str, Any]) -> None:
    """Write ``metadata.json`` (sorted keys, so equal metadata gives equal bytes)."""
    text = json.dumps(metadata, indent=2, sort_keys=True, default=str)
    (directory / METADATA).write_text(text + "\n", encoding="utf-8")


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """The metadata of a finished output directory (DataError when it is incomplete)."""
    from lazydp.errors import DataError

    path = Path(directory) / METADATA
    if not path.is_file():
        raise DataError(
            f"{str(directory)!r} has no {METADATA}: not a finished `lazydp preprocess` output; "
            "run the preprocessing (again)"
        )
    return json.loads(path.read_text(encoding="utf-8"))
