"""A full disk, a directory in the way, Ctrl-C: a clear message, and nothing lost (the earlier
checkpoint intact, no temporary files left, no step taken without its ledger line)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

import lazydp.checkpoint_file
import lazydp.engine
import lazydp.ledger
import lazydp.preprocess
import lazydp.preprocess.pipeline
import lazydp.training
from lazydp import PrivacyError, StorageError
from lazydp.checkpoint_file import atomic_save
from lazydp.ledger import PrivacyLedger, StepEvent
from tests.test_cli_train import run_cli

EVENT = StepEvent(0, 0.1, 1.0, 1.0, "dpsgd_f", "poisson", 0)


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_save_keeps_the_earlier_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"step": 1}, path)
    before = path.read_bytes()
    monkeypatch.setattr(lazydp.engine.os, "fsync", _no_space)
    with pytest.raises(StorageError, match="No space left.*earlier file there, if any, is intact"):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    with pytest.raises(Exception, match="pickle|lambda"):  # not a disk error: passed on as is
        atomic_save({"f": lambda: 0}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    with pytest.raises(StorageError, match="could not write"):
        atomic_save({}, path / "inside-a-file.pt")  # the parent is a file


def test_a_save_removes_the_temporary_a_writer_killed_mid_save_left(tmp_path):
    """SIGKILL mid-save leaves a checkpoint-sized temporary that its writer cannot remove: the
    next save removes those whose writer process on this host is gone, and no other."""
    import socket
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    path = tmp_path / "checkpoint.pt"
    mine = f".checkpoint.pt.tmp-{socket.gethostname()}-"
    abandoned, live = tmp_path / f"{mine}{int(done.stdout)}", tmp_path / f"{mine}{os.getppid()}"
    elsewhere = tmp_path / f".checkpoint.pt.tmp-{socket.gethostname()}x-{int(done.stdout)}"
    for tmp in (abandoned, live, elsewhere):
        tmp.write_bytes(b"x" * 1000)
    atomic_save({"step": 1}, path)
    assert not abandoned.exists() and live.exists() and elsewhere.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["checkpoint.pt", live.name, elsewhere.name])


def test_a_save_never_writes_through_a_link_at_its_temporary_name(tmp_path):
    """The temporary's name (host, pid) can be guessed: a symlink planted there was followed,
    the target overwritten with the checkpoint and the link renamed into its place."""
    import socket

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    tmp = out / f".checkpoint.pt.tmp-{socket.gethostname()}-{os.getpid()}"
    tmp.symlink_to(victim)
    path = atomic_save({"step": 1}, out / "checkpoint.pt")
    assert victim.read_text() == "precious"
    assert not path.is_symlink() and os.listdir(out) == ["checkpoint.pt"]


def test_a_ledger_that_cannot_be_written_refuses_the_charge(tmp_path, monkeypatch):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    ledger.charge(EVENT)
    monkeypatch.setattr(lazydp.ledger.os, "write", _no_space)
    with pytest.raises(PrivacyError, match="could not write.*step was not taken"):
        ledger.charge(EVENT)
    assert ledger.steps == 1


def test_train_refuses_an_output_it_could_not_write_before_spending(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "model.pt").mkdir(parents=True)
    code, res = run_cli(["train", "--dataset", "acs", "--out", str(out)], capsys)
    assert code == 1 and "model.pt is a directory" in res.err
    assert not (out / "ledger.jsonl").exists()


def test_ctrl_c_gives_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lazydp.training, "run", interrupted)
    code, res = run_cli(["train", "--dataset", "acs", "--out", str(tmp_path / "r")], capsys)
    assert code == 130 and "interrupted" in res.err and "Traceback" not in res.err
    assert "--resume" in res.err
    code, res = run_cli(["train", "--json", "--out", str(tmp_path / "r")], capsys)
    assert code == 130 and json.loads(res.out.splitlines()[-1])["type"] == "KeyboardInterrupt"
    # preprocess has no ledger and no --resume: its message says what it left instead.
    monkeypatch.setattr(lazydp.preprocess, "preprocess", interrupted)
    raw = tmp_path / "r.csv"
    raw.write_text("x\n")
    args = [
        "preprocess",
        "--format",
        "movielens",
        "--input",
        str(raw),
        "--output",
        str(tmp_path / "o"),
    ]
    code, res = run_cli(args, capsys)
    assert code == 130 and "never a part" in res.err and "ledger" not in res.err


def test_train_refuses_a_disk_too_small_for_its_outputs_before_charging(
    tmp_path, capsys, monkeypatch
):
    # Found at the end, a full disk lost the trained model after its budget was spent (a
    # short run keeps no checkpoint to --resume from); found mid-run, it tore the ledger.
    import shutil

    real = shutil.disk_usage

    def nearly_full(path):
        return real(path)._replace(free=100_000)  # room for a ledger, not for model.pt

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    out = tmp_path / "run"
    args = ["train", "--dataset", "acs", "--max-steps", "3", "--out", str(out)]
    code, res = run_cli(args, capsys)
    assert code == 1 and "MB free, but the run writes" in res.err and "model.pt" in res.err
    assert "Nothing was charged" in res.err and "Traceback" not in res.err
    assert not (out / "ledger.jsonl").exists()
    monkeypatch.undo()
    code, res = run_cli(args, capsys)  # with the space, the same command trains
    assert code == 0 and (out / "model.pt").exists()


def test_a_report_that_cannot_be_written_loses_only_the_report(tmp_path, capsys, monkeypatch):
    # It was written in place: a full disk gave a traceback from deep inside pathlib (the
    # privacy report never shown) and a kill mid-write left a truncated report.json.
    real = lazydp.checkpoint_file.atomic_save

    def disk_full_in_the_report(obj, path, dump=None):
        if path.name != "report.json":
            return real(obj, path)

        def half_then_full(data, f):
            f.write(data[: len(data) // 2])
            _no_space()

        return real(obj, path, half_then_full)

    monkeypatch.setattr(lazydp.training, "atomic_save", disk_full_in_the_report, raising=False)
    out = tmp_path / "run"
    args = ["train", "--dataset", "acs", "--max-steps", "3", "--no-progress", "--out", str(out)]
    code, res = run_cli(args, capsys)
    assert code == 1 and "Traceback" not in res.err and "only the report is lost" in res.err
    assert "epsilon" in res.err and (out / "model.pt").exists()
    assert sorted(os.listdir(out)) == ["ledger.jsonl", "model.pt"]  # no partial report.json


def test_preprocess_on_a_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    # DuckDB reports a full disk as its own IOException (Spark as a Py4JJavaError), neither an
    # OSError: the run ended in a traceback from inside duckdb that named neither the output
    # nor what was left of it.
    import duckdb

    from lazydp.preprocess.embedded import EmbeddedEngine

    src = Path(__file__).parent / "fixtures" / "criteo_small.tsv"
    real = EmbeddedEngine.write_parquet

    def full(self, sql_text, directory):
        real(self, sql_text, directory)
        raise duckdb.IOException(
            f'IO Error: Could not write file "{directory}/part-00000.parquet": '
            'No space left on device","errno":"28"'
        )

    monkeypatch.setattr(EmbeddedEngine, "write_parquet", full)
    with pytest.raises(StorageError, match="the disk filled up while writing it"):
        lazydp.preprocess.preprocess("criteo", [src], tmp_path / "o", progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(EmbeddedEngine, "write_parquet", real)
    monkeypatch.setattr(lazydp.preprocess.pipeline, "write_metadata", _no_space)
    with pytest.raises(StorageError, match="partial output was removed"):
        lazydp.preprocess.preprocess("criteo", [src], tmp_path / "o", progress=False)
    assert list(tmp_path.iterdir()) == []
