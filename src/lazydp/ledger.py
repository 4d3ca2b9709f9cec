"""The privacy ledger: an append-only JSON-lines record of every privacy cost a run has paid.

Contract (DESIGN.md invariant 6: charged before noise, never lowered by a restart):
* ``charge(event)`` writes the step's line to disk *before* it returns, so a caller that charges
  and then draws noise can never release noise that is not on record. Each line goes out in one
  ``os.write`` on an ``O_APPEND`` descriptor: lines from one process never interleave or tear
  except on a crash mid-write, which the loader reports instead of guessing.
* Opening an existing file resumes it: the spent budget never starts again at 0. A malformed
  line raises :class:`PrivacyError` naming the file and line; nothing is ever dropped silently.
* ``steps`` counts charges, not distinct step numbers: a step redone after a crash drew fresh
  noise and is paid for twice.
* One-off costs (``charge_external``, e.g. a DP vocabulary built in preprocessing) compose with
  training by basic composition: epsilons add and deltas add. The total is reported at
  ``delta + sum(external deltas)``.
* One process charges a ledger (rank 0 in a distributed run: a step is one global step, and
  ``rank`` records who charged it); every rank charging one file would count each step W times.
  A charge holds an exclusive ``flock`` while it checks that the file is still the one this
  object loaded and last wrote (same inode, same size) and appends; a second writer (two runs
  with one output directory) or a deleted or replaced file makes the charge fail, before any
  noise, instead of leaving a ledger that under-reports.
* The format is JSON only (never pickle): a header line ``{"kind": "header", ...}``, then one
  ``{"kind": "step", ...}`` or ``{"kind": "external", ...}`` object per line.

Cost: a charge is one ``write`` syscall (a few microseconds). With ``fsync=True`` every charge
also waits for the disk (typically 0.1-10 ms), which survives power loss, not just a crash.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from array import array
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lazydp._validate import (
    check_delta,
    check_epsilon,
)
from lazydp.accounting import (
    MechanismCount,
    compute_epsilon,
    epoch_steps,
    epsilon_report,
)
from lazydp.errors import ConfigError, PrivacyError
from lazydp.ledger_mark import HighWaterMark
from lazydp.ledger_records import OPTIONAL, ExternalCharge, StepEvent, check_item, from_record
from lazydp.shuffle_epochs import ShuffledEpochs

try:
    import fcntl
except ImportError:  # not POSIX: the unchanged-file check still runs, without the lock
    fcntl = None  # type: ignore[assignment]

FORMAT = "lazydp-privacy-ledger"
VERSION = 1
_MAX_LINE = 1 << 16  # bytes; a ledger line is a few hundred (a lineage is at most 64)
_PAST_JSON_LIMITS = "an integer of thousands of digits, or values nested thousands deep"


#: A step's fields other than its step number and position, as PrivacyLedger keeps them once.
_Kind = tuple[float, float, float, str, str, int, str | None]


#: What flock raises on a file system without locks (some network mounts).
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)


@contextmanager
def _locked(fd: int) -> Iterator[None]:
    """An exclusive advisory lock on the ledger file while a charge checks and appends (so two
    writers cannot both pass the check and append); a no-op where ``fcntl`` is missing or the
    file system has no locks (some network mounts: ENOLCK), where the check runs unlocked."""
    locked = fcntl is not None
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in NO_LOCKS:
                raise
            locked = False
    try:
        yield
    finally:
        if locked:
            fcntl.flock(fd, fcntl.LOCK_UN)


def _identity(fd: int) -> tuple[int, int]:
    """(inode, size) of the open file."""
    st = os.fstat(fd)
    return st.st_ino, st.st_size


def _check_length(line: bytes, start: int, path: Path) -> None:
    if len(line) > _MAX_LINE:
        raise PrivacyError(
            f"privacy ledger {path} has a line of over {_MAX_LINE} bytes at byte {start}; a "
            "ledger line is a few hundred. It is not a lazydp privacy ledger, or it is damaged: "
            "pass the ledger file the run wrote, or restore it from a backup."
        )


def _read_lines(fd: int, path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(byte offset, line without its newline, whether a newline ends it) for each line of the
    file, read through ``fd`` (the file the lock is on, not a path lookup) a megabyte at a
    time: a ledger of millions of steps is never held whole (read at once and split, a 10M-step
    ledger took ~4.7 GB at its peak). A line past ``_MAX_LINE`` bytes is refused as it grows:
    kept, a file with no newline (another file, a zero-filled one) was held whole and copied
    once per megabyte (8 s and 0.5 GB for 128 MB; quadratic)."""
    offset, start, tail = 0, 0, b""
    while chunk := os.pread(fd, 1 << 20, offset):
        offset += len(chunk)
        *complete, tail = (tail + chunk).split(b"\n")
        for line in complete:
            _check_length(line, start, path)
            yield start, line, True
            start += len(line) + 1
        _check_length(tail, start, path)
    if tail:
        yield start, tail, False


class PrivacyLedger:
    """Append-only record of the privacy spent by one run; in memory when ``path`` is None.

    >>> ledger = PrivacyLedger()
    >>> for t in range(2250):
    ...     ledger.charge(StepEvent(t, 0.04, 1.5, 1.0, "lazydp", "poisson"))
    >>> ledger.steps, round(ledger.epsilon(1e-5, accountant="rdp"), 4)
    (2250, 7.3293)
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, fsync: bool = False) -> None:
        self.path = Path(path) if path is not None else None
        self.fsync = fsync
        # Each charged step as its step number, its position (-1: None) and an index into
        # _kinds, the distinct rest of its fields: 20 bytes a step. A list of StepEvents took
        # ~190 (1.9 GB for a run of 10M steps, held for as long as the ledger is open).
        self._step_numbers = array("q")
        self._positions = array("q")
        self._kind_of = array("I")
        self._kinds: list[_Kind] = []
        self._kind_index: dict[_Kind, int] = {}
        # Kept up to date on every charge so that epsilon() on a long run stays O(groups).
        self._counts: Counter[tuple[float, float, str]] = Counter()
        self._epochs = ShuffledEpochs()  # the shuffled epochs the steps drew from, per group
        self._external: list[ExternalCharge] = []
        self._fd: int | None = None
        # The file as this object last saw it (inode, size): a charge checks it is unchanged,
        # so a second writer or a replaced file is refused instead of under-reported.
        self._seen: tuple[int, int] | None = None
        # The header's run id and its high-water mark outside the run directory (ledger_mark.py);
        # _behind > 0: this file holds fewer charges than it has made (an older copy).
        self._mark: HighWaterMark | None = None
        self._behind = 0
        self._read_only: str | None = None  # why the file could not be opened for writing
        if self.path is None:
            return
        if self.path.is_dir():
            raise PrivacyError(
                f"privacy ledger path {self.path} is a directory; pass a file path, e.g. "
                f"{self.path / 'ledger.jsonl'}"
            )
        fd = self._open(self.path)
        try:
            with _locked(fd):
                empty = os.fstat(fd).st_size == 0
                run, ended = (uuid.uuid4().hex, True) if empty else self._load(self.path, fd)
                self._fd = fd
                if self._read_only:
                    run = None  # nothing is charged through it: no high-water mark to keep
                elif empty:
                    self._write(
                        {"kind": "header", "format": FORMAT, "version": VERSION, "run": run}
                    )
                elif not ended:
                    # A hand edit dropped the last newline: the next line would be glued onto
                    # it and the ledger would no longer load. The loaded last line parsed.
                    os.write(fd, b"\n")
                if run is not None:
                    self._mark = HighWaterMark(run)
                    self._behind = self._mark.read() - self.charges
                self._seen = _identity(fd)
        except BaseException:
            self._fd = None
            os.close(fd)
            raise

    # -- persistence -------------------------------------------------------------------------

    def _open(self, path: Path) -> int:
        """The ledger's descriptor: read-write, or read-only where the file exists but cannot be
        written (a read-only mount, a teammate's run directory), so that it can still be read;
        charging it is then refused (_append)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or not path.is_file():
                raise PrivacyError(
                    f"privacy ledger {path}: cannot open it ({exc.strerror or exc}); give a "
                    "writable location"
                ) from None
            self._read_only = exc.strerror or str(exc)
        try:
            return os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise PrivacyError(
                f"privacy ledger {path}: cannot read it ({exc.strerror or exc}); check its "
                "permissions"
            ) from None

    def _load(self, path: Path, fd: int) -> tuple[str | None, bool]:
        """Read every line: (the header's run id (None in ledgers from before it), whether a
        newline ends the file)."""
        run, ended = None, True
        fix = (
            f"Restore {path} from a backup taken after its last charge (an older one is "
            "refused: ledger_mark.py), or repair that line by hand; deleting a step line "
            "under-reports the privacy spent."
        )
        for number, (start, raw, ended) in enumerate(_read_lines(fd, path), start=1):
            where = f"privacy ledger {path}, line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PrivacyError(
                    f"privacy ledger {path} is not UTF-8 text (byte {start + exc.start}); it is "
                    f"damaged. {fix}"
                ) from None
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if not ended:  # the last line, cut short
                    raise self._torn(path, start, number, run) from None
                raise PrivacyError(f"{where} is corrupt or truncated ({exc.msg}). {fix}") from None
            except (ValueError, RecursionError):
                # json's own limits, past which it raised these bare (ValueError's advice: raise
                # Python's limit): an integer of over 4300 digits, or nesting past the recursion
                # limit. No charge has either.
                raise PrivacyError(
                    f"{where} is not a ledger line ({_PAST_JSON_LIMITS}). {fix}"
                ) from None
            if not isinstance(record, dict):
                raise PrivacyError(f"{where} is not a JSON object. {fix}")
            if number == 1:
                if record.get("kind") != "header" or record.get("format") != FORMAT:
                    raise PrivacyError(
                        f"{where}: not a lazydp privacy ledger (no header). Pass the ledger "
                        "file the run wrote, or a new path to start a new run."
                    )
                if record.get("version") != VERSION:
                    raise PrivacyError(
                        f"{where}: ledger version {record.get('version')!r}; this lazydp reads "
                        f"version {VERSION}. Use the lazydp version that wrote it."
                    )
                run = record.get("run")
                run = run if isinstance(run, str) and HighWaterMark.valid(run) else None
                continue
            try:
                item = from_record(record, where)
            except (PrivacyError, TypeError) as exc:
                raise PrivacyError(f"{exc} {fix}") from None
            if isinstance(item, StepEvent):
                self._record(item)
            else:
                self._external.append(item)
        return run, ended

    def _torn(self, path: Path, keep: int, number: int, run: str | None) -> PrivacyError:
        """The error for a last line cut short (no newline ends it): a charge whose one write
        did not complete -- the run crashed or its disk filled mid-write -- so ``charge`` never
        returned and no noise was drawn for it. Removing it loses nothing, and the user must be
        told so: "repair the line" left them nothing to repair it to."""
        complete = self.charges  # ``keep``: the bytes of the complete lines before it
        remove = (
            f"Remove that partial line, keeping the {keep} bytes of the complete lines before "
            f"it (e.g. `truncate -s {keep} {path}`), and resume."
        )
        made = HighWaterMark(run).read() if run is not None else 0
        where = f"privacy ledger {path}, line {number}"
        if made > complete:  # lines that were complete are missing too: not a torn write
            return PrivacyError(
                f"{where} is cut short, and the file holds {complete} complete charges where "
                f"this ledger made {made} (its high-water mark): it lost more than a line being "
                f"written. Restore {path} from a backup taken after its last charge."
            )
        confirmed = (
            f" (its high-water mark counts {made} charges: the complete lines hold them all)"
            if made
            else ""
        )
        return PrivacyError(
            f"{where} is truncated: the run stopped while writing it (a crash, or a full "
            f"disk), so that charge never completed and no noise was drawn for it{confirmed}. "
            + remove
            + " (Or restore the file from a backup taken after its last charge.)"
        )

    def check_chargeable(self) -> None:
        """The checks a charge makes before it writes, without writing: PrivacyError if this
        ledger is closed, its file was replaced or written by someone else, or it is behind its
        high-water mark. A distributed step runs them before the ranks vote on it, so that a
        rank whose charge would be refused refuses the step on every rank (the others had
        charged and applied it: replicas apart, or a hang at the next collective). A write
        error (a full disk) can still fail on one rank alone."""
        with self._checked():
            pass

    @contextmanager
    def _checked(self) -> Iterator[bool]:
        """A charge's checks, then (under the file's lock) whether there is a file to write:
        False for an in-memory ledger; PrivacyError for a closed one."""
        if self._fd is None:
            if self.path is not None:  # closed: a charge that is not written is not kept either
                raise PrivacyError(
                    f"privacy ledger {self.path} is closed; open it again to charge."
                )
            yield False
            return
        with _locked(self._fd):
            self._check_unchanged()
            self._check_not_behind()
            yield True

    def _append(self, record: dict[str, Any]) -> None:
        if self._read_only is not None:
            raise PrivacyError(
                f"privacy ledger {self.path} is open read-only ({self._read_only}): it can be "
                "read, not charged; nothing was taken. Train with a writable copy of its run "
                "directory, or fix the file's permissions."
            )
        with self._checked() as on_file:
            if not on_file:
                return
            assert self._fd is not None
            self._write(record)
            self._seen = _identity(self._fd)
        if self._mark is not None:
            self._mark.write(self.charges + 1)  # the caller records the charge after this

    def _check_not_behind(self) -> None:
        """PrivacyError if this file holds fewer charges than its ledger has made."""
        if self._behind <= 0:
            return
        assert self._mark is not None
        made = self.charges + self._behind
        raise PrivacyError(
            f"privacy ledger {self.path} holds {self.charges} charges, but this ledger has made "
            f"{made} (its high-water mark {self._mark.path}): this file is an older copy -- a "
            "restored backup of the run directory, or a copy of it -- and charging on from it "
            f"would drop the {self._behind} later charges from the record, lowering the "
            "reported epsilon although their noise may have been released. Put back the "
            f"ledger that made {made} charges and resume. If it is lost, this run's spent "
            "budget is not on record: start a new run in a new output directory. Nothing was "
            "changed or charged."
        )

    def _check_unchanged(self) -> None:
        """PrivacyError if the file is not the one this object loaded and last wrote."""
        assert self._fd is not None and self.path is not None and self._seen is not None
        try:  # the descriptor keeps the inode it was opened on: compare the path's with it
            replaced = os.stat(self.path).st_ino != self._seen[0]
        except FileNotFoundError:
            replaced = True
        if replaced:
            raise PrivacyError(
                f"privacy ledger {self.path} was deleted or replaced while this run was charging "
                "it; the step was not taken. Put the run's ledger back (a backup of the run "
                "directory) and resume: a new ledger would restart the spent budget at 0."
            )
        if _identity(self._fd) != self._seen:
            raise PrivacyError(
                f"privacy ledger {self.path} was written by someone else since this run last "
                "charged it (two runs or engines sharing one ledger?); the step was not taken. "
                "Give each run its own output directory, or resume the run so that it loads "
                "every charge on record."
            )

    def _write(self, record: dict[str, Any]) -> None:
        assert self._fd is not None
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")
        # One write call per line: O_APPEND makes it land whole at the end of the file.
        try:
            written = os.write(self._fd, data)
            if self.fsync and written == len(data):
                os.fsync(self._fd)
        except OSError as exc:
            # Raised before the charge is recorded: the step is not taken (no noise drawn).
            raise PrivacyError(
                f"privacy ledger {self.path}: could not write ({exc.strerror or exc}); the step "
                "was not taken. Free space or fix the file's permissions, then resume."
            ) from None
        if written != len(data):
            raise PrivacyError(
                f"privacy ledger {self.path}: short write ({written} of {len(data)} bytes); "
                "the disk may be full. Free space, then remove the partial last line (loading the "
                "ledger says how: no noise was drawn for it) and resume."
            )

    def _record(self, event: StepEvent) -> None:
        kind: _Kind = (
            event.sample_rate,
            event.noise_multiplier,
            event.max_grad_norm,
            event.mode,
            event.sampler,
            event.rank,
            event.lineage,
        )
        index = self._kind_index.get(kind)
        if index is None:
            index = self._kind_index[kind] = len(self._kinds)
            self._kinds.append(kind)
        self._step_numbers.append(event.step)
        self._positions.append(-1 if event.position is None else event.position)
        self._kind_of.append(index)
        group = (event.sample_rate, event.noise_multiplier, event.sampler)
        self._counts[group] += 1
        if event.lineage is not None and event.position is not None:
            per_epoch = epoch_steps("shuffle", event.sample_rate)
            self._epochs.record(group, event.lineage, event.position, per_epoch)

    def close(self) -> None:
        """Release the file descriptor (the ledger stays readable in memory)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._mark is not None:
            self._mark.close()

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # -- charging ----------------------------------------------------------------------------

    def charge(self, event: StepEvent) -> None:
        """Record one step; call it BEFORE drawing the step's noise.

        >>> PrivacyLedger().charge(StepEvent(0, 0.01, 1.0, 1.0, "dpsgd_f", "poisson"))
        """
        check_item(event)
        if self._fd is not None or self.path is not None:  # in memory: no line to build
            line = {k: v for k, v in asdict(event).items() if v is not None or k not in OPTIONAL}
            self._append({"kind": "step", **line})
        self._record(event)

    def charge_external(self, name: str, epsilon: float, delta: float) -> None:
        """Record a one-off (epsilon, delta) cost paid outside training (basic composition).

        >>> ledger = PrivacyLedger()
        >>> ledger.charge_external("vocabulary", epsilon=0.5, delta=1e-7)
        >>> ledger.epsilon(1e-5)
        0.5
        """
        charge = ExternalCharge(str(name), check_epsilon(epsilon), check_delta(delta))
        deltas = self.external_cost()[1] + charge.delta
        if deltas >= 1:
            raise ConfigError(
                f"external charge {name!r}: its delta {charge.delta:g} would bring the one-off "
                f"deltas to {deltas:g} >= 1, which guarantees nothing. Each release's delta "
                "should be well below 1/N."
            )
        self._append({"kind": "external", **asdict(charge)})
        self._external.append(charge)

    # -- reading -----------------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """Number of steps charged (a step redone after a crash counts twice)."""
        return len(self._step_numbers)

    @property
    def charges(self) -> int:
        """Lines on record after the header: steps and one-off charges."""
        return self.steps + len(self._external)

    @property
    def events(self) -> list[StepEvent]:
        """A copy of the charged step events, in charge order (built on each call)."""
        events = []
        for step, position, kind in zip(self._step_numbers, self._positions, self._kind_of):
            rate, sigma, clip, mode, sampler, rank, lineage = self._kinds[kind]
            where = None if position < 0 else position
            events.append(StepEvent(step, rate, sigma, clip, mode, sampler, rank, where, lineage))
        return events

    @property
    def external(self) -> list[ExternalCharge]:
        """A copy of the one-off charges."""
        return list(self._external)

    def mechanism_counts(self) -> list[MechanismCount]:
        """Steps grouped by (sample_rate, noise_multiplier, sampler), for the accountant, with
        the shuffled epochs each group was recorded drawing from."""
        return [
            MechanismCount(*group[:2], n, group[2], self._epochs.releases(group))
            for group, n in self._counts.items()
        ]

    def last_position(self, lineage: str | None) -> int | None:
        """The newest batch position a shuffled step recorded in ``lineage`` (None: none)."""
        return self._epochs.last_position(lineage)

    def epsilon(self, delta: float, accountant: str = "pld") -> float:
        """Total epsilon: training at ``delta`` plus every external charge's epsilon.

        The guarantee holds at ``total_delta(delta)`` (deltas add too).
        """
        spent = compute_epsilon(self.mechanism_counts(), delta, accountant)
        return spent + self.external_cost()[0]

    def external_cost(self) -> tuple[float, float]:
        """(sum of epsilons, sum of deltas) of the one-off charges (basic composition).

        >>> ledger = PrivacyLedger()
        >>> ledger.charge_external("vocabulary", epsilon=0.5, delta=1e-7)
        >>> ledger.external_cost()
        (0.5, 1e-07)
        """
        return sum(c.epsilon for c in self._external), sum(c.delta for c in self._external)

    def total_delta(self, delta: float) -> float:
        """The delta of :meth:`epsilon`'s guarantee: ``delta`` plus the external deltas."""
        return check_delta(delta) + self.external_cost()[1]

    def summary(self, delta: float | None = None) -> dict[str, Any]:
        """Plain-data summary; with ``delta``, epsilon by PLD and RDP (and as-if-Poisson).

        >>> PrivacyLedger().summary(1e-5)["epsilon_pld"]
        0.0
        """
        out: dict[str, Any] = {
            "path": str(self.path) if self.path is not None else None,
            "steps": self.steps,
            "mechanisms": [asdict(m) for m in self.mechanism_counts()],
            "modes": sorted({kind[3] for kind in self._kinds}),
            "external": [asdict(c) for c in self._external],
        }
        if delta is not None:
            report = epsilon_report(self.mechanism_counts(), delta)
            extra = self.external_cost()[0]
            out["delta"] = self.total_delta(delta)
            out["epsilon_pld"] = report.pld + extra
            out["epsilon_rdp"] = report.rdp + extra
            if report.pld_as_if_poisson is not None:
                out["epsilon_pld_as_if_poisson"] = report.pld_as_if_poisson + extra
        return out

    def to_json(self, delta: float | None = None) -> str:
        """:meth:`summary` as a JSON string."""
        return json.dumps(self.summary(delta))


def require_existing(path: str | os.PathLike[str], expected_steps: int) -> PrivacyLedger:
    """Open the ledger a checkpoint refers to; refuse to resume if it is missing or short.

    A checkpoint that says ``expected_steps`` were charged needs a ledger with at least that
    many steps (more is fine: steps charged after the checkpoint was written still count).

    >>> require_existing("/nonexistent/ledger.jsonl", 10)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lazydp.errors.PrivacyError: privacy ledger /nonexistent/ledger.jsonl is missing ...
    """
    path = Path(path)
    restore = (
        "refusing to restart at epsilon 0; restore it from a backup of the run directory "
        "taken after its last charge (or copy it beside the checkpoint) and resume again."
    )
    if not path.is_file():
        raise PrivacyError(
            f"privacy ledger {path} is missing but the checkpoint says {expected_steps} steps "
            f"were charged; {restore}"
        )
    ledger = PrivacyLedger(path)
    try:
        ledger._check_not_behind()  # a restored backup: refuse at resume, not at the first step
    except PrivacyError:
        ledger.close()
        raise
    if ledger.steps < expected_steps:
        ledger.close()
        raise PrivacyError(
            f"privacy ledger {path} records {ledger.steps} steps but the checkpoint says "
            f"{expected_steps} were charged (ledger truncated or replaced); {restore}"
        )
    return ledger


def ledger_path(out: str | os.PathLike[str], rank: int = 0) -> Path:
    """The ledger file of ``rank`` in a run directory (rank 0's is the run's ledger).

    >>> ledger_path("runs/x", 1).name
    'ledger.rank1.jsonl'
    """
    return Path(out) / ("ledger.jsonl" if rank == 0 else f"ledger.rank{rank}.jsonl")
