"""The privacy ledger: charged to disk at once, resumed never reset, corruption never ignored."""

from __future__ import annotations

import json
import math
import os

import pytest

from lazydp.accounting import MechanismCount, compute_epsilon
from lazydp.errors import ConfigError, PrivacyError
from lazydp.ledger import PrivacyLedger, StepEvent, require_existing


def step(t: int, q: float = 0.04, sigma: float = 1.5, sampler: str = "poisson") -> StepEvent:
    return StepEvent(t, q, sigma, max_grad_norm=1.0, mode="lazydp", sampler=sampler)


def lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_in_memory_golden_epsilon():
    ledger = PrivacyLedger()
    for t in range(2250):
        ledger.charge(step(t))
    assert ledger.steps == 2250
    assert ledger.mechanism_counts() == [MechanismCount(0.04, 1.5, 2250)]
    assert round(ledger.epsilon(1e-5, accountant="rdp"), 4) == 7.3293
    assert ledger.epsilon(1e-5) == pytest.approx(6.77, abs=0.02)


def test_mechanism_counts_group_by_rate_noise_and_sampler():
    ledger = PrivacyLedger()
    for t in range(5):
        ledger.charge(step(t))
    for t in range(5, 8):
        ledger.charge(step(t, sigma=2.0))
    for t in range(8, 10):
        ledger.charge(step(t, sampler="shuffle"))
    groups = sorted(ledger.mechanism_counts(), key=lambda g: (g.sampler, g.noise_multiplier))
    assert groups == [
        MechanismCount(0.04, 1.5, 5),
        MechanismCount(0.04, 2.0, 3),
        MechanismCount(0.04, 1.5, 2, "shuffle"),
    ]
    assert ledger.epsilon(1e-5) == compute_epsilon(groups, 1e-5)


def test_charge_is_on_disk_before_it_returns(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path)
    ledger.charge(step(0))
    # Read through a separate handle while the ledger is still open: nothing is buffered.
    records = lines(path)
    assert records[0]["kind"] == "header"
    written = {k: v for k, v in step(0).__dict__.items() if v is not None}  # no shuffle epoch
    assert records[1] == {"kind": "step", **written}
    ledger.charge(step(1))
    assert len(lines(path)) == 3


def test_resume_continues_and_never_resets(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with PrivacyLedger(path) as ledger:
        for t in range(100):
            ledger.charge(step(t))
        before = ledger.epsilon(1e-5)
    resumed = PrivacyLedger(path)
    assert resumed.steps == 100
    assert resumed.events == [step(t) for t in range(100)]
    assert resumed.epsilon(1e-5) == before
    # A step redone after a crash is paid again: steps count charges, not step numbers.
    resumed.charge(step(99))
    resumed.close()
    again = PrivacyLedger(path, fsync=True)
    assert again.steps == 101
    assert again.epsilon(1e-5) > before
    assert sum(r["kind"] == "header" for r in lines(path)) == 1


def test_a_long_run_keeps_a_few_bytes_per_step_in_memory(tmp_path):
    """Every charged step used to stay in memory as a StepEvent, ~190 bytes: 1.9 GB over a run
    of 10M steps. The steps are kept as arrays now, and read back as the same events."""
    import tracemalloc

    ledger = PrivacyLedger()
    ledger.charge(step(0))  # the first charge of a kind sets it up once
    tracemalloc.start()
    try:
        for t in range(1, 20_001):
            ledger.charge(step(t))
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held / 20_000 < 40
    assert ledger.events == [step(t) for t in range(20_001)]
    shuffled = [StepEvent(t, 0.1, 1.0, 1.0, "dpsgd_f", "shuffle", 0, t + 3, "ab") for t in range(3)]
    path = tmp_path / "l.jsonl"
    with PrivacyLedger(path) as written:
        for event in [step(0), *shuffled, step(4, sigma=2.0)]:
            written.charge(event)
    assert PrivacyLedger(path).events == [step(0), *shuffled, step(4, sigma=2.0)]
    with pytest.raises(ConfigError, match="2\\*\\*63"):
        ledger.charge(step(2**63))
    assert ledger.steps == 20_001


def test_a_long_ledger_is_loaded_a_chunk_at_a_time(tmp_path):
    """Read whole and split, a ledger took ~3.4x its size at its peak (~4.7 GB for a 10M-step
    run's resume); read a megabyte at a time, its steps' arrays are what it keeps."""
    import tracemalloc

    path = tmp_path / "l.jsonl"
    with PrivacyLedger(path) as written:
        for t in range(30_000):
            written.charge(step(t))
    size = path.stat().st_size
    tracemalloc.start()
    try:
        loaded = PrivacyLedger(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert loaded.steps == 30_000 and loaded.events[-1] == step(29_999)
    # The file is ~4 MB: a 1 MB chunk split into lines (~3.5 MB at once) and 0.6 MB of arrays
    # (13.9 MB read whole: file, text, lines)
    assert peak < 1.5 * size
    loaded.close()


@pytest.mark.parametrize("position", ["7", [1]])
def test_a_position_that_is_no_int_is_named_not_a_type_error(position):
    # The int64 limit compared it with 2**63 before its type was checked: TypeError "'>=' not
    # supported", and for a ledger line "line 2: '>=' not supported ...".
    bad = StepEvent(0, 0.1, 1.0, 1.0, "dpsgd_f", "shuffle", 0, position, "ab")
    with pytest.raises(ConfigError, match="position=.* must be an int >= 0"):
        PrivacyLedger().charge(bad)


@pytest.mark.parametrize(
    "bad_line,expected",
    [
        ('{"kind": "step", "step": 3, "sample_rate": 0.0', "truncated"),
        ("[1, 2]", "not a JSON object"),
        ('{"kind": "mystery"}', "unknown record kind"),
        ('{"kind": "step", "step": 3}', "lacks"),
    ],
)
def test_corrupt_line_names_file_and_line(tmp_path, bad_line, expected):
    path = tmp_path / "ledger.jsonl"
    with PrivacyLedger(path) as ledger:
        ledger.charge(step(0))
        ledger.charge(step(1))
    with open(path, "a") as f:
        f.write(bad_line)  # no newline: a crash mid-write
    with pytest.raises(PrivacyError) as info:
        PrivacyLedger(path)
    message = str(info.value)
    assert str(path) in message and "line 4" in message and expected in message
    assert "restore" in message.lower()
    # The loader refused; it did not repair or truncate the file behind our back.
    assert path.read_text().endswith(bad_line)


@pytest.mark.parametrize("nesting", [False, True])
def test_a_line_past_jsons_limits_is_named_not_a_bare_error(tmp_path, nesting):
    # json raised a bare ValueError for an int of over 4300 digits and RecursionError for deep
    # nesting: tracebacks naming neither the file nor the line.
    path = tmp_path / "ledger.jsonl"
    with PrivacyLedger(path) as ledger:
        ledger.charge(step(0))
    bad = "[" * 5000 + "]" * 5000 if nesting else '{"kind": "step", "step": ' + "9" * 5000
    with open(path, "a") as f:
        f.write(bad + "}\n")
    with pytest.raises(PrivacyError, match=f"{path}, line 3 is not a ledger line"):
        PrivacyLedger(path)


def test_a_giant_line_is_refused_as_it_grows_not_held_whole(tmp_path):
    # A file with no newline (another file, a zero-filled one) was read whole into one line,
    # copied once per megabyte read (quadratic), then called a torn last charge.
    path = tmp_path / "ledger.jsonl"
    with PrivacyLedger(path) as ledger:
        ledger.charge(step(0))
    start = path.stat().st_size
    with open(path, "ab") as f:
        f.write(bytes(3 << 20))
    with pytest.raises(
        PrivacyError, match=f"{path} has a line of over 65536 bytes at byte {start}"
    ):
        PrivacyLedger(path)


def test_foreign_file_is_not_a_ledger(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"loss": 0.5}\n')
    with pytest.raises(PrivacyError, match="not a lazydp privacy ledger"):
        PrivacyLedger(path)


def test_empty_file_becomes_a_new_ledger(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.touch()
    with PrivacyLedger(path) as ledger:
        ledger.charge(step(0))
    assert PrivacyLedger(path).steps == 1


def test_external_charges_add_by_basic_composition(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with PrivacyLedger(path) as ledger:
        ledger.charge_external("vocabulary", epsilon=0.5, delta=1e-7)
        for t in range(50):
            ledger.charge(step(t))
    ledger = PrivacyLedger(path)
    training = compute_epsilon([MechanismCount(0.04, 1.5, 50)], 1e-5)
    assert ledger.epsilon(1e-5) == pytest.approx(training + 0.5)
    assert ledger.total_delta(1e-5) == pytest.approx(1e-5 + 1e-7)
    assert ledger.external_cost() == (0.5, 1e-7)
    assert ledger.external[0].name == "vocabulary"
    with pytest.raises(ConfigError, match="epsilon"):
        ledger.charge_external("bad", epsilon=-1.0, delta=1e-7)


def test_summary_and_json(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.jsonl")
    for t in range(25):
        ledger.charge(step(t, sampler="shuffle"))
    ledger.charge_external("vocabulary", epsilon=0.25, delta=1e-8)
    summary = json.loads(ledger.to_json(1e-5))
    assert summary["steps"] == 25 and summary["modes"] == ["lazydp"]
    assert summary["mechanisms"] == [
        {
            "sample_rate": 0.04,
            "noise_multiplier": 1.5,
            "steps": 25,
            "sampler": "shuffle",
            "releases": 0,
        }
    ]
    assert summary["epsilon_pld"] == pytest.approx(ledger.epsilon(1e-5))
    assert summary["epsilon_pld_as_if_poisson"] < summary["epsilon_pld"]
    assert summary["delta"] == pytest.approx(1e-5 + 1e-8)
    assert "epsilon_pld" not in ledger.summary()


def test_zero_noise_step_is_infinite():
    ledger = PrivacyLedger()
    ledger.charge(StepEvent(0, 0.1, 0.0, math.inf, "sgd", "poisson"))
    assert ledger.epsilon(1e-5) == math.inf


@pytest.mark.parametrize(
    "event",
    [
        StepEvent(0, 0.0, 1.0, 1.0, "lazydp", "poisson"),
        StepEvent(0, 0.1, float("nan"), 1.0, "lazydp", "poisson"),
        StepEvent(0, 0.1, 1.0, math.inf, "lazydp", "poisson"),  # inf clip only without noise
        StepEvent(0, 0.1, 1.0, 1.0, "fast", "poisson"),
        StepEvent(0, 0.1, 1.0, 1.0, "lazydp", "fixed"),
    ],
)
def test_invalid_events_are_refused_and_not_written(tmp_path, event):
    path = tmp_path / "l.jsonl"
    ledger = PrivacyLedger(path)
    with pytest.raises(ConfigError):
        ledger.charge(event)
    assert ledger.steps == 0 and len(lines(path)) == 1


def test_closed_ledger_refuses_to_charge(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.jsonl")
    ledger.close()
    with pytest.raises(PrivacyError, match="closed"):
        ledger.charge(step(0))


def test_require_existing(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with pytest.raises(PrivacyError, match="missing.*refusing to restart at epsilon 0"):
        require_existing(path, 10)
    with PrivacyLedger(path) as ledger:
        for t in range(5):
            ledger.charge(step(t))
    with pytest.raises(PrivacyError, match="records 5 steps but the checkpoint says 10"):
        require_existing(path, 10)
    ledger = require_existing(path, 5)
    assert ledger.steps == 5
    ledger.charge(step(5))  # resumed ledgers keep charging
    assert require_existing(path, 5).steps == 6  # more than the checkpoint is fine


def test_a_closed_ledger_refuses_an_external_charge_too(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.jsonl")
    ledger.close()
    with pytest.raises(PrivacyError, match="closed"):
        ledger.charge_external("vocabulary", epsilon=1.0, delta=1e-6)  # was kept in memory only
    assert PrivacyLedger(tmp_path / "l.jsonl").external_cost() == (0, 0)


def test_a_ledger_whose_last_newline_was_dropped_takes_the_next_line_on_its_own(tmp_path):
    path = tmp_path / "l.jsonl"
    ledger = PrivacyLedger(path)
    ledger.charge(StepEvent(0, 0.01, 1.0, 1.0, "dpsgd_f", "poisson"))
    ledger.close()
    path.write_bytes(path.read_bytes().rstrip(b"\n"))  # a hand edit
    again = PrivacyLedger(path)
    again.charge(StepEvent(1, 0.01, 1.0, 1.0, "dpsgd_f", "poisson"))
    again.close()
    assert PrivacyLedger(path).steps == 2


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"kind":"external","name":7,"epsilon":1.0,"delta":1e-6}', "name=7"),
        (None, "ledger version 99"),
        # A field of another lazydp version was dropped without a word (an older lazydp so
        # read today's shuffled positions and under-reported the epochs spent).
        (
            '{"kind":"step","step":0,"sample_rate":0.5,"noise_multiplier":1.0,'
            '"max_grad_norm":1.0,"mode":"dpsgd_f","sampler":"poisson","rank":0,"epochs":9}',
            r"step record has \['epochs'\], which this lazydp does not read",
        ),
        (
            '{"kind":"external","name":"v","epsilon":1.0,"delta":0.0,"composition":"x"}',
            r"external record has \['composition'\]",
        ),
    ],
)
def test_lines_lazydp_would_not_write_are_refused_on_load(tmp_path, line, match):
    path = tmp_path / "l.jsonl"
    PrivacyLedger(path).close()
    text = path.read_text()
    if line is None:
        text = text.replace('"version":1', '"version":99')
    else:
        text += line + "\n"
    path.write_text(text)
    with pytest.raises(PrivacyError, match=match):
        PrivacyLedger(path)


def test_a_second_writer_is_refused_not_under_reported(tmp_path):
    # Two runs (or two engines) charging one file: each in-memory view misses the other's
    # charges, so the one that wrote last-but-not-seen must stop before its step is taken.
    path = tmp_path / "ledger.jsonl"
    first = PrivacyLedger(path)
    first.charge(step(0))
    second = PrivacyLedger(path)  # loads the first's step
    second.charge(step(1))
    with pytest.raises(PrivacyError, match="written by someone else"):
        first.charge(step(2))
    assert first.steps == 1  # the refused step is not counted
    second.charge(step(3))  # the up-to-date view goes on
    assert [x.get("step") for x in lines(path)[1:]] == [0, 1, 3]
    with pytest.raises(PrivacyError, match="written by someone else"):
        first.charge_external("vocabulary", 0.1, 1e-9)
    assert PrivacyLedger(path).steps == 3


def test_a_reader_does_not_disturb_the_writer(tmp_path):
    path = tmp_path / "ledger.jsonl"
    writer = PrivacyLedger(path)
    writer.charge(step(0))
    assert PrivacyLedger(path).steps == 1  # a report reads the ledger mid-run
    writer.charge(step(1))
    assert PrivacyLedger(path).steps == 2


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_deleted_or_replaced_ledger_is_refused(tmp_path, how):
    # The open descriptor would keep appending to a file nobody can read any more.
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path)
    ledger.charge(step(0))
    saved = path.read_bytes()
    path.unlink()
    if how == "replaced":
        (tmp_path / "copy").write_bytes(saved)
        (tmp_path / "copy").rename(path)
    with pytest.raises(PrivacyError, match="deleted or replaced"):
        ledger.charge(step(1))
    assert ledger.steps == 1
    assert not path.exists() or path.read_bytes() == saved


def test_a_charge_waits_for_the_file_lock(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    import os
    import threading

    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path)
    other = os.open(path, os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX)  # another writer mid-charge
    done = threading.Event()
    worker = threading.Thread(target=lambda: (ledger.charge(step(0)), done.set()))
    worker.start()
    try:
        assert not done.wait(0.3)  # blocked on the lock, nothing appended
        assert len(lines(path)) == 1
    finally:
        fcntl.flock(other, fcntl.LOCK_UN)
        os.close(other)
    worker.join(5)
    assert done.is_set() and len(lines(path)) == 2


def test_external_deltas_may_not_add_up_to_one(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    ledger.charge_external("a", 0.1, 0.6)
    with pytest.raises(ConfigError, match="guarantees nothing"):
        ledger.charge_external("b", 0.1, 0.5)
    assert ledger.external_cost() == (0.1, 0.6)
    assert len(PrivacyLedger(tmp_path / "ledger.jsonl").external) == 1  # not written either


def test_a_file_system_without_locks_still_charges(tmp_path, monkeypatch):
    fcntl = pytest.importorskip("fcntl")
    import errno

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path)
    ledger.charge(step(0))
    other = PrivacyLedger(path)
    other.charge(step(1))
    with pytest.raises(PrivacyError, match="written by someone else"):
        ledger.charge(step(2))  # the unchanged-file check runs without the lock
    assert PrivacyLedger(path).steps == 2


def _charge(ledger, n=1):
    for t in range(n):
        ledger.charge(StepEvent(t, 0.01, 1.0, 1.0, "dpsgd_f", "poisson"))


def test_an_older_copy_of_a_ledger_is_refused_before_it_charges(tmp_path):
    # Nothing in the run directory tells a restored backup from the real ledger: the mark
    # outside it does (ledger_mark.py).
    path, backup = tmp_path / "l.jsonl", tmp_path / "backup.jsonl"
    with PrivacyLedger(path) as ledger:
        _charge(ledger, 2)
    backup.write_bytes(path.read_bytes())
    with PrivacyLedger(path) as ledger:
        _charge(ledger, 3)
        ledger.charge_external("vocabulary", 0.5, 1e-9)  # one-off charges count too
    path.write_bytes(backup.read_bytes())
    older = PrivacyLedger(path)
    assert older.steps == 2 and older.epsilon(1e-5) > 0  # still readable: reports work
    with pytest.raises(PrivacyError, match=r"holds 2 charges, but this ledger has made 6"):
        _charge(older)
    older.close()
    assert path.read_bytes() == backup.read_bytes()
    with pytest.raises(PrivacyError, match="older copy"):
        require_existing(path, 2)  # a resume is refused up front


def test_ledgers_work_without_marks_where_none_can_be_kept(tmp_path, monkeypatch):
    path = tmp_path / "l.jsonl"
    monkeypatch.setenv("LAZYDP_STATE_DIR", "")  # marks switched off
    with PrivacyLedger(path) as ledger:
        _charge(ledger, 2)
    blocked = tmp_path / "file"
    blocked.write_text("")  # a state "directory" that cannot be created
    monkeypatch.setenv("LAZYDP_STATE_DIR", str(blocked))
    with pytest.warns(UserWarning, match="high-water mark"), PrivacyLedger(path) as ledger:
        _charge(ledger, 2)
    with pytest.warns(UserWarning, match="high-water mark"), PrivacyLedger(path) as ledger:
        assert ledger.steps == 4
        _charge(ledger, 2)  # one warning per ledger opened, not per charge


def test_a_relative_state_directory_is_not_used(tmp_path, monkeypatch):
    # Relative, it named another directory from another working directory: a resume started
    # elsewhere found no mark and accepted an older copy.
    from lazydp.ledger_mark import state_dir

    monkeypatch.setenv("LAZYDP_STATE_DIR", "marks")
    with pytest.warns(UserWarning, match="not an absolute path"):
        assert state_dir() is not None and state_dir().is_absolute()
    monkeypatch.setenv("LAZYDP_STATE_DIR", str(tmp_path / "marks"))
    assert state_dir() == tmp_path / "marks"


def test_a_torn_last_line_says_it_can_be_removed_and_how(tmp_path):
    # A crash or a full disk mid-write leaves a last line without its newline: that charge
    # never returned, so no noise was drawn for it. "Repair that line by hand; deleting a step
    # line under-reports" left the user no way to resume; the message now says what to cut.
    path = tmp_path / "ledger.jsonl"
    with PrivacyLedger(path) as ledger:
        for t in range(3):
            ledger.charge(step(t))
    complete = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b'{"kind":"step","step":3,"sample_rate":0.0')
    with pytest.raises(PrivacyError) as info:
        PrivacyLedger(path)
    message = str(info.value)
    assert "line 5 is truncated" in message and "no noise was drawn" in message
    assert "high-water mark counts 3 charges" in message
    assert f"truncate -s {complete} {path}" in message
    assert path.stat().st_size > complete  # the loader changed nothing itself
    os.truncate(path, complete)  # what the message says to do
    with PrivacyLedger(path) as resumed:
        assert resumed.steps == 3
        resumed.charge(step(3))  # the high-water mark agrees: charging goes on
    # An older copy cut short is no torn write: restore it, never cut it.
    with PrivacyLedger(path) as ledger:
        ledger.charge(step(4))
    os.truncate(path, complete - 5)
    with pytest.raises(PrivacyError, match="lost more than a line being written") as info:
        PrivacyLedger(path)
    assert "truncate -s" not in str(info.value)


def test_check_chargeable_makes_the_charges_checks_without_writing(tmp_path):
    """A distributed step runs it before the ranks vote (a charge refused on one rank after the
    vote left the others charged and applied)."""
    PrivacyLedger().check_chargeable()  # in memory: nothing to check
    path = tmp_path / "l.jsonl"
    ledger = PrivacyLedger(path)
    ledger.charge(step(0))
    size = path.stat().st_size
    ledger.check_chargeable()
    assert path.stat().st_size == size and ledger.steps == 1  # nothing written or recorded
    os.rename(path, tmp_path / "away")
    with pytest.raises(PrivacyError, match="deleted or replaced"):
        ledger.check_chargeable()
    os.rename(tmp_path / "away", path)
    ledger.check_chargeable()
    ledger.close()
    with pytest.raises(PrivacyError, match="is closed"):
        ledger.check_chargeable()


def test_a_ledger_that_cannot_be_written_is_read_and_never_charged(tmp_path, monkeypatch):
    # A read-only mount or a teammate's run directory: opening it failed with a bare OSError,
    # so it could not even be read. (Simulated: as root, file permissions do not refuse.)
    import errno

    from lazydp import ledger as ledger_module

    path = tmp_path / "ledger.jsonl"
    with PrivacyLedger(path) as ledger:
        for t in range(10):
            ledger.charge(step(t))
        ledger.charge_external("vocabulary", epsilon=0.5, delta=1e-7)
        before = ledger.epsilon(1e-5)
    text = path.read_text()
    real_open = os.open

    def read_only_fs(file, flags, *args):
        if flags & (os.O_RDWR | os.O_WRONLY):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, flags, *args)

    monkeypatch.setattr(ledger_module.os, "open", read_only_fs)
    reader = PrivacyLedger(path)
    assert reader.steps == 10 and reader.epsilon(1e-5) == before
    with pytest.raises(PrivacyError, match="read-only .*Read-only file system.*nothing was taken"):
        reader.charge(step(10))
    with pytest.raises(PrivacyError, match="read-only"):
        reader.charge_external("again", epsilon=0.1, delta=1e-9)
    assert reader.steps == 10 and path.read_text() == text
    reader.close()
    with pytest.raises(PrivacyError, match="cannot open it .*Read-only file system"):
        PrivacyLedger(tmp_path / "new" / "ledger.jsonl")  # none to read: a clear refusal
