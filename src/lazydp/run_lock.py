"""One ``lazydp train`` at a time per ``--out``: a lock held for the whole run.

Two runs on one ``--out`` (started twice by accident, or a ``--resume`` while the first still
trains) share its ledger. The ledger's own lock keeps every charge, but the run that charges
second is refused at that step, mid-run: an accidental ``--resume`` stopped the live run, which
lost its work since its last checkpoint, and near the end the two could interleave model.pt and
report.json. So rank 0 takes an exclusive ``flock`` on ``OUT/.lazydp-train.lock`` before
anything is read or charged and holds it until the run returns, then removes the file. The
kernel drops the lock when its process dies (``kill -9`` included), so a crashed run never
leaves a stale lock (its file stays and is reused). Under torchrun the ranks vote, so that all
of them refuse together rather than the others waiting in a collective for a rank 0 that left.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lazydp.errors import ConfigError
from lazydp.ledger import NO_LOCKS

try:
    import fcntl
except ImportError:  # not POSIX: no lock, as for the ledger's
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lazydp-train.lock"


@contextmanager
def run_lock(out: Path, rank: int = 0, world_size: int = 1) -> Iterator[None]:
    """Hold ``out``'s run lock (rank 0) for the ``with`` block; ConfigError on every rank when
    another live run holds it.

    Example: ``with run_lock(Path("runs/a")): train()``.
    """
    # Here, not at the top: lazydp.distributed's launcher imports this module.
    from lazydp.distributed._comm import over_ranks

    path = out / LOCK_NAME
    fd, holder, locked = _acquire(path) if rank == 0 else (None, None, False)
    try:
        if over_ranks(int(fd is None and rank == 0), world_size, largest=True):
            raise ConfigError(
                f"--out {out} is in use by another lazydp train ({holder or 'another rank 0'}); "
                "two runs on one --out would share its ledger and the later one would stop the "
                "other mid-run. Wait for it to finish (then --resume continues it), or choose "
                "another --out. Nothing was charged."
            )
        yield
    finally:
        if locked:  # removed while still held: a run that finishes leaves OUT as it was
            path.unlink(missing_ok=True)
        if fd is not None:
            os.close(fd)  # releases the lock


def _acquire(path: Path) -> tuple[int | None, str | None, bool]:
    """(descriptor holding the lock, None, True), or (None, who holds it, False). A file
    system without locks (some network mounts) gives the descriptor unlocked (False), as the
    ledger's lock does: the ledger still refuses a second writer at its charge."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(
                f"cannot create {path} ({exc.strerror or exc}), the lock that keeps one run "
                "per --out: give a writable --out"
            ) from None
        if fcntl is None:
            return fd, None, False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip()
            os.close(fd)
            return None, holder or None, False
        except OSError as exc:
            if exc.errno not in NO_LOCKS:
                os.close(fd)
                raise
            return fd, None, False
        if _still_named(path, fd):
            break
        # A finishing run removed the file between our open and our lock: the lock we hold is
        # on a file no one else can open. Take the one at the path now.
        os.close(fd)
    # Who holds it, for the message another run shows: written only while holding the lock.
    os.ftruncate(fd, 0)
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {since}".encode())
    return fd, None, True


def _still_named(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
