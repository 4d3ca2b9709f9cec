"""Checkpoint and export files: written whole or not at all, read back only if intact.

A checkpoint is a private training state (the tables' pending noise, the ledger position, the
noise streams' keys), an export a released model. Writes go to a temporary of this host and pid,
fsynced, then renamed over the target (``atomic_save``): the earlier file survives a full disk or
a kill, and a checkpoint is owner-only from its first byte. Loads check every record's CRC and
use ``weights_only`` (a file runs no code); a damaged or foreign file is refused by name
(``load_checkpoint_file``). ``engine.py`` decides what goes into them.
"""

from __future__ import annotations

import glob
import io
import os
import pickle
import socket
import zipfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lazydp._process import running
from lazydp.errors import ConfigError, PrivacyError, StorageError

CHECKPOINT_FORMAT = "lazydp-checkpoint-v1"


def released_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` detached for saving, each entry written as its own compact copy, as a clone of
    every entry would write it -- but cloning only the entries that need it: a view into a
    larger storage (torch.save writes the whole storage) or one sharing the storage of an entry
    before it (saved once and loaded shared otherwise). A clone of every table held a second
    copy of the model while model.pt was written: a run sized to fit its tables for training
    was killed by the OS at its export."""
    seen: set[int] = set()
    out = {}
    for key, t in state.items():
        t = t.detach()
        storage = t.untyped_storage()
        whole = (
            t.storage_offset() == 0
            and t.is_contiguous()
            and storage.nbytes() == t.numel() * t.element_size()
        )
        out[key] = t if whole and storage.data_ptr() not in seen else t.clone()
        seen.add(storage.data_ptr())
    return out


def atomic_save(
    obj: Any,
    path: str | os.PathLike[str],
    dump: Callable[[Any, Any], object] = torch.save,
    private: bool = False,
) -> Path:
    """Write ``obj`` to a temporary file (``dump(obj, file)``), fsync it and rename it over
    ``path``: ``path`` is either the earlier file or the complete new one, and no partial
    temporary is left behind. ``private``: readable by its owner only (0600), from its first
    byte on (a private training state); else as the umask says (a released artefact)."""
    path = Path(path)
    tmp = path.with_name(f"{_tmp_prefix(path)}{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(path)
        with _create_new(tmp, 0o600 if private else 0o666) as f:
            dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)):  # torch reports a full disk as RuntimeError
            raise StorageError(
                f"could not write {path} ({type(exc).__name__}: {exc}); the earlier file there, "
                "if any, is intact. Free disk space or choose another location, then retry."
            ) from None
        raise
    return path


def _create_new(tmp: Path, mode: int) -> Any:
    """``tmp`` opened for writing as a new file of this process. Whatever sits at that name is
    removed first, a symlink unfollowed: ``open(tmp, "wb")`` wrote through a link planted there
    (the name is the host and pid) into its target, and the rename then put the link in the
    checkpoint's place, so the private state went wherever it pointed. O_EXCL never follows."""
    with suppress(FileNotFoundError):
        tmp.unlink()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    return os.fdopen(os.open(tmp, flags, mode), "wb")


def check_extra(extra: dict[str, Any]) -> None:
    """ConfigError (nothing written) for an ``extra`` value load_checkpoint could not read back.

    Checkpoints load with ``weights_only`` (a file runs no code), which takes tensors, plain
    Python values and containers of them. A numpy scalar (a metric), an LR scheduler or an
    Opacus-style ``module=model`` was written without a word, or refused as a pickled model,
    and the whole checkpoint was then refused as corrupt at the resume."""
    for key, value in extra.items():
        if isinstance(value, (nn.Module, Optimizer)):
            raise ConfigError(
                f"save_checkpoint({key}=...) got a {type(value).__name__}: the checkpoint holds "
                "the engine's model and optimizer already (unlike Opacus' save_checkpoint, "
                "lazydp's takes only the path and your own extra values). Drop it. Nothing "
                "was written."
            )
        buffer = io.BytesIO()
        try:
            torch.save(value, buffer)
            buffer.seek(0)
            torch.load(buffer, map_location="cpu", weights_only=True)
        except Exception:  # torch raises many kinds for what it cannot save or load
            raise ConfigError(
                f"save_checkpoint({key}=...): a {type(value).__name__} could not be read back by "
                "load_checkpoint, which loads with weights_only=True (tensors, numbers, strings "
                "and lists, tuples and dicts of them). Store plain values instead: float(x) for "
                "a numpy scalar, scheduler.state_dict() for an object. Nothing was written."
            ) from None


def _tmp_prefix(path: Path) -> str:
    """The name of ``path``'s temporaries, but for the writer's pid: the host names the writer
    too, so a run on another host sharing the directory never takes a live one for abandoned."""
    return f".{path.name}.tmp-{socket.gethostname()}-"


def _remove_abandoned(path: Path) -> None:
    """Remove ``path``'s temporaries whose writer, a process of this host, is gone. A run killed
    hard (SIGKILL, out of memory) mid-save cannot remove its own, which is as large as the
    checkpoint or model: one left behind per kill would fill the disk."""
    prefix = _tmp_prefix(path)
    for tmp in path.parent.glob(glob.escape(prefix) + "*"):
        pid = tmp.name[len(prefix) :]
        if pid.isdigit() and not running(int(pid)):
            with suppress(OSError):
                tmp.unlink()


def load_checkpoint_file(path: str | os.PathLike[str], mmap: bool = False) -> dict[str, Any]:
    """Load a lazydp checkpoint safely (weights_only), with a clear error if it is corrupt.

    ``mmap``: the tensors are mapped from the file, not read into memory (see
    :func:`owned_except_copied` for what a caller must then copy)."""
    try:
        # The CRCs first: a damaged record is named as such, where torch's unpickler answered
        # a flipped bit in data.pkl with advice to load it with weights_only=False.
        _check_records(path)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise PrivacyError(f"checkpoint {path} does not exist") from None
    except pickle.UnpicklingError:
        # torch's own text advises weights_only=False, which would run whatever it holds.
        raise PrivacyError(
            f"checkpoint {path} holds pickled objects that no lazydp checkpoint contains (a "
            "model or optimizer object, or code): it was not written by save_checkpoint, and "
            "loading refused it without running anything. Never load it with "
            "weights_only=False, which would run its code; use a checkpoint lazydp wrote."
        ) from None
    except Exception as exc:  # torch raises many kinds for a damaged file
        raise PrivacyError(
            f"checkpoint {path} is corrupt or not a lazydp checkpoint ({type(exc).__name__}: "
            f"{exc}). Use an earlier complete checkpoint; partial files are never renamed into place."
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise _not_ours(path, state.get("format") if isinstance(state, dict) else None)
    return state


def _not_ours(path: str | os.PathLike[str], found: Any) -> PrivacyError:
    """The error for a file without this version's format tag: one of another lazydp version
    (its state may mean other things) is named as such, with what to do; it was only called
    'not a lazydp-checkpoint-v1 file', as if it were no checkpoint at all."""
    if isinstance(found, str) and found.startswith("lazydp-checkpoint-"):
        return PrivacyError(
            f"checkpoint {path} is a {found} file, written by another lazydp version; this "
            f"lazydp reads {CHECKPOINT_FORMAT}. Resume with the lazydp version that wrote it "
            "(or finish the run there and train on from its exported model.pt). Nothing was "
            "loaded."
        )
    return PrivacyError(f"{path} is not a {CHECKPOINT_FORMAT} file")


def owned_except_copied(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint loaded with mmap, with every tensor cloned into memory but the model's and
    the LazyDP tables' (history, velocity): load_checkpoint copies those into the model and the
    tables, so they are read once from the file's pages. Read into memory whole, the checkpoint
    held a second copy of the model next to it while it was loaded (the model, the tables'
    velocity and history: 2.5x the tables with momentum). Everything else may be kept by
    what loads it (torch's optimizers keep the loaded buffers), and must not stay a mapping of
    a file that the next checkpoint replaces."""
    owned = {k: (v if k in ("model", "lazy") else _cloned(v)) for k, v in state.items()}
    lazy = state.get("lazy")
    if isinstance(lazy, dict):
        owned["lazy"] = {k: (v if k == "tables" else _cloned(v)) for k, v in lazy.items()}
    return owned


def _cloned(value: Any) -> Any:
    """``value`` with every tensor in it (through dicts, lists and tuples) cloned."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cloned(v) for v in value)
    return value


def _check_records(path: str | os.PathLike[str]) -> None:
    """Read every record of the checkpoint's zip archive against its CRC-32 (zipfile raises
    BadZipFile on a mismatch): torch.load checks none, so a flipped bit in a weight, a row's
    history or the lr sums loaded without a word (one in the sums would change the noise every
    row is owed from then on). torch.save stores records uncompressed: a compressed one (a zip
    bomb) is refused before torch.load inflates it whole into memory."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(
                    f"record {info.filename!r} is compressed ({info.file_size} bytes inflated), "
                    "which torch.save never writes"
                )
            if info.CRC:  # 0: written with torch.serialization.set_crc32_options(False)
                with archive.open(info) as record:
                    while record.read(1 << 24):
                        pass
