"""A high-water mark of each ledger's charges, kept outside the run directory.

Why: a run directory restored from a backup brings back an older ledger together with an older
checkpoint. The pair is consistent, so a resume used to accept it, and the charges made after
the backup -- steps whose noise may have left the process in a model or checkpoint -- were
gone from the record: the reported epsilon went down. Nothing inside the run directory can
tell a restored backup from the real thing, so each ledger (by the ``run`` id in its header)
keeps one small file elsewhere holding how many charges it has made; a ledger that holds fewer
is refused before its next charge (and on resume).

Where: ``$LAZYDP_STATE_DIR`` if set (empty: no marks; it must be absolute), else ``$XDG_STATE_HOME/lazydp``, else
``~/.local/state/lazydp``; one file per ledger under ``ledgers/`` (21 bytes). It protects
against restores and copies on the machine that charged (or a shared home); it is not a
defence against someone who also deletes the mark. Where the directory cannot be written, the
ledger works without a mark and says so once. Marks are never removed (a run's ledger may be
resumed any time): one small file per ledger ever opened for charging.

Cost: one ``pwrite`` of 21 bytes per charge, beside the ledger's own write.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

__all__ = ["HighWaterMark", "state_dir"]

_WIDTH = 20  # digits; the record is the count, zero-padded, and a newline: fixed size
_RUN_ID = re.compile(r"[0-9a-f]{32}")


def state_dir() -> Path | None:
    """The directory marks live in, or None when ``LAZYDP_STATE_DIR`` is set empty."""
    explicit = os.environ.get("LAZYDP_STATE_DIR")
    if explicit is not None:
        if not explicit:
            return None
        path = Path(explicit).expanduser()
        if path.is_absolute():
            return path
        # Relative, it would name another directory from another working directory, and a
        # resume started elsewhere would find no mark.
        warnings.warn(
            f"LAZYDP_STATE_DIR={explicit!r} is not an absolute path; ledger marks stay in the "
            "default directory. Set it to an absolute path.",
            stacklevel=3,
        )
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "lazydp"


class HighWaterMark:
    """The charge count of ledger ``run`` as last written by whoever charged it."""

    @staticmethod
    def valid(run: str) -> bool:
        """Whether ``run`` is a run id (a uuid4 in hex): only those name a mark file."""
        return _RUN_ID.fullmatch(run) is not None

    def __init__(self, run: str) -> None:
        if not self.valid(run):
            raise ValueError(f"run id {run!r} is not 32 hex digits")
        root = state_dir()
        self.path = None if root is None else root / "ledgers" / run
        self._fd: int | None = None

    def read(self) -> int:
        """The count on record (0 when there is none, or it cannot be read)."""
        if self.path is None:
            return 0
        try:
            text = self.path.read_bytes().decode("ascii", "replace").strip()
        except OSError:
            return 0
        return int(text) if text.isdigit() else 0

    def write(self, count: int) -> None:
        """Record ``count`` (one pwrite); a mark that cannot be written is dropped with one
        warning: the ledger itself is the record, the mark only guards it."""
        if self.path is None:
            return
        try:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            os.pwrite(self._fd, f"{count:0{_WIDTH}d}\n".encode("ascii"), 0)
        except OSError as exc:
            warnings.warn(
                f"lazydp: cannot keep the ledger's high-water mark at {self.path} "
                f"({exc.strerror or exc}); the ledger is still written, but a restored older "
                "copy of it would not be detected. Set LAZYDP_STATE_DIR to a writable "
                "directory to keep marks.",
                stacklevel=4,
            )
            self.close()
            self.path = None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
