"""``lazydp train --resume`` and the report of a resumed run: a finished run resumes to the same
released model, a resume with nothing to resume from is refused, and the report keeps every
caveat the run's history calls for."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch

from lazydp import PrivacyEngine, PrivacyError, training
from tests.test_cli_train import run_cli
from tests.test_engine_errors import private
from tests.test_lazy import build, dense_params, step, table_params
from tests.toy import Toy, loader, loss_fn, make_batches

ACS = ["train", "--dataset", "acs", "--epochs", "1", "--json", "--no-progress"]


def _weights(path):
    return torch.load(path, weights_only=True)


def test_resuming_a_finished_lazydp_run_releases_the_same_model(tmp_path, capsys):
    out = tmp_path / "r"
    args = [*ACS, "--mode", "lazydp", "--noise-multiplier", "1", "--checkpoint-every", "1"]
    args += ["--out", str(out)]
    code, res = run_cli(args, capsys)
    assert code == 0 and "private training state" in res.out  # the checkpoint left beside it
    first = _weights(out / "model.pt")
    steps = (out / "ledger.jsonl").read_text().count('"kind":"step"')
    report = json.loads((out / "report.json").read_text())
    code, res = run_cli([*args, "--resume"], capsys)
    assert code == 0, res.err
    # The last checkpoint held the flushed model: no pending noise drawn a second time.
    second = _weights(out / "model.pt")
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (out / "ledger.jsonl").read_text().count('"kind":"step"') == steps
    # The report keeps the training time and rate of the run (it said 0 s and 0 examples/s).
    again = json.loads((out / "report.json").read_text())
    assert again["examples_per_second"] == report["examples_per_second"] > 0
    assert report["train_seconds"] <= again["train_seconds"] < report["train_seconds"] + 1


def test_resume_without_a_checkpoint_is_refused_and_keeps_the_model(tmp_path, capsys):
    out = tmp_path / "r"
    args = [*ACS, "--noise-multiplier", "1", "--checkpoint-every", "0", "--out", str(out)]
    assert run_cli(args, capsys)[0] == 0
    model = (out / "model.pt").read_bytes()
    code, res = run_cli([*args, "--resume"], capsys)
    # A finished run is named as finished (it used to be called killed before a checkpoint).
    assert code == 1 and "finished" in res.err and "nothing to continue" in res.err
    assert "Traceback" not in res.err and (out / "model.pt").read_bytes() == model
    (out / "report.json").unlink()  # as if killed after model.pt, before the report
    code, res = run_cli([*args, "--resume"], capsys)
    # It used to be called killed before its first checkpoint, model.pt to be replaced.
    assert code == 1 and "finished training" in res.err and "model.pt is complete" in res.err
    assert "PrivacyLedger(" in res.err and "killed before its first" not in res.err
    (out / "model.pt").unlink()  # as if killed before the end and before any checkpoint
    code, res = run_cli([*args, "--resume"], capsys)
    assert code == 1 and "no checkpoint.pt" in res.err and "killed before" in res.err


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["--max-steps", "8"], "calibrated"),  # it set the noise: resumed, it overspent
        (["--lr", "1"], "--lr 1.0 (the run used"),  # torch restored the old lr, silently
        (["--dense-optimizer", "sgd"], "--dense-optimizer"),  # charged, then KeyError in torch
        (["--momentum", "0.9"], "--momentum"),  # "it is not a momentum prefix"
    ],
)
def test_a_resume_with_other_settings_is_refused_before_anything_is_charged(
    tmp_path, capsys, change, named
):
    out = tmp_path / "r"
    args = [*ACS, "--mode", "dpsgd_f", "--target-epsilon", "2", "--checkpoint-every", "2"]
    args += ["--out", str(out), "--max-steps", "4"]
    assert run_cli(args, capsys)[0] == 0
    ledger = (out / "ledger.jsonl").read_text()
    model = (out / "model.pt").read_bytes()
    code, res = run_cli([*args, *change, "--resume"], capsys)
    assert code == 1 and named in res.err and "Traceback" not in res.err, res.err
    assert (out / "ledger.jsonl").read_text() == ledger
    assert (out / "model.pt").read_bytes() == model


def test_a_checkpoint_of_another_optimizer_kind_is_refused_before_loading(tmp_path):
    model, opt, sched, engine = build("lazydp", ledger_path=tmp_path / "l.jsonl")
    step(model, opt, sched, make_batches(1)[0])
    engine.save_checkpoint(tmp_path / "ck.pt")
    model = Toy()
    dense = torch.optim.SGD(dense_params(model), lr=0.1)  # the run had Adam there
    tables = torch.optim.SGD(table_params(model), lr=0.5)
    engine = PrivacyEngine(seed=1, ledger_path=tmp_path / "l.jsonl")
    engine.make_private(
        module=model,
        optimizer=[dense, tables],
        data_loader=loader(),
        noise_multiplier=1.3,  # build()'s
        max_grad_norm=0.7,
        mode="lazydp",
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrivacyError, match=r"\['Adam', 'SGD'\]"):
        engine.load_checkpoint(tmp_path / "ck.pt")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_run_resumed_with_other_privacy_settings_says_so(tmp_path):
    # The API still lets an eager run continue at another noise multiplier: the report says so.
    ledger = tmp_path / "l.jsonl"
    for k, sigma in enumerate((1.0, 2.0)):
        model, opt, _, engine = private("dpsgd_f", noise_multiplier=sigma, ledger_path=ledger)
        if k:
            engine.load_checkpoint(tmp_path / "ck.pt")
        x, bag, emb, y = make_batches(1)[0]
        opt.zero_grad()
        loss_fn(model(x, bag, emb), y).backward()
        opt.step()
        engine.save_checkpoint(tmp_path / "ck.pt")
    assert any(c.startswith("MIXED SETTINGS") for c in engine.privacy_report(1e-5).caveats)


def test_a_seeded_run_resumed_without_a_seed_is_still_called_reproducible(tmp_path):
    model, opt, sched, engine = build("lazydp", ledger_path=tmp_path / "l.jsonl")  # seeded
    step(model, opt, sched, make_batches(1)[0])
    engine.save_checkpoint(tmp_path / "ck.pt")
    model, opt, sched, engine = build("lazydp", seed=None, ledger_path=tmp_path / "l.jsonl")
    engine.load_checkpoint(tmp_path / "ck.pt")
    assert any("reproducible" in c for c in engine.privacy_report(1e-5).caveats)


def test_noise_multiplier_zero_is_not_private():
    model, opt, _, engine = private("dpsgd_f", noise_multiplier=0.0)
    x, bag, emb, y = make_batches(1)[0]
    loss_fn(model(x, bag, emb), y).backward()
    opt.step()
    report = engine.privacy_report(1e-5)
    assert not report.private and "noise multiplier 0" in str(report)


@pytest.mark.parametrize("bad_step", ["x", 10**9, -1])
def test_a_checkpoint_with_a_damaged_step_is_refused(tmp_path, capsys, bad_step):
    out = tmp_path / "r"
    args = [*ACS, "--mode", "lazydp", "--noise-multiplier", "1", "--checkpoint-every", "1"]
    args += ["--out", str(out), "--max-steps", "3"]
    assert run_cli(args, capsys)[0] == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["extra"]["step"] = bad_step
    torch.save(state, out / "checkpoint.pt")
    ledger = (out / "ledger.jsonl").read_text()
    code, res = run_cli([*args, "--resume"], capsys)
    assert code == 1 and "damaged" in res.err and "Traceback" not in res.err, res.err
    assert (out / "ledger.jsonl").read_text() == ledger


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_at_a_step_boundary_with_a_checkpoint_and_the_run_resumes(
    tmp_path, capsys, monkeypatch, signum
):
    # With --checkpoint-every 0 a killed run used to leave only its ledger: spent budget and
    # nothing to resume from.
    out = tmp_path / "r"
    args = [*ACS, "--mode", "lazydp", "--noise-multiplier", "1", "--out", str(out)]
    full = tmp_path / "full"
    assert run_cli([*args[:-1], str(full)], capsys)[0] == 0
    full_steps = (full / "ledger.jsonl").read_text().count('"kind":"step"')
    calls = {"n": 0}
    forward = training._forward

    def forward_then_signal(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:  # mid-step: the step still completes
            os.kill(os.getpid(), signum)
        return forward(model, batch)

    before = signal.getsignal(signum)
    with monkeypatch.context() as m:
        m.setattr(training, "_forward", forward_then_signal)
        code, res = run_cli(args, capsys)
    assert code == 128 + signum and "--resume" in res.err and "Traceback" not in res.err
    # --json ends with one JSON object, a stopped run's too (it used to print none).
    assert json.loads(res.out.splitlines()[-1])["type"] == "StoppedBySignal"
    assert signal.getsignal(signum) == before  # handlers restored
    assert (out / "ledger.jsonl").read_text().count('"kind":"step"') == 3
    assert torch.load(out / "checkpoint.pt", weights_only=True)["extra"]["step"] == 3
    assert not (out / "model.pt").exists()
    code, res = run_cli([*args, "--resume"], capsys)
    assert code == 0, res.err
    assert (out / "ledger.jsonl").read_text().count('"kind":"step"') == full_steps


def test_a_run_a_signal_stops_early_shows_the_epsilon_it_spent_last(tmp_path, capsys, monkeypatch):
    # The progress bar refreshed its epsilon only at the run's planned last step: stopped
    # early (a signal, or a calibrated resume's budget), its last figure was from steps before.
    args = [a for a in ACS if a not in ("--no-progress", "--json")]
    args += ["--mode", "lazydp", "--noise-multiplier", "1", "--out", str(tmp_path / "r")]
    asked = []
    at, forward = training._ShownEpsilon.at, training._forward

    def shown_at(self, last):
        asked.append(last)
        return at(self, last)

    calls = {"n": 0}

    def forward_then_signal(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:  # step 3: not a 5th step, not the planned last
            os.kill(os.getpid(), signal.SIGINT)
        return forward(model, batch)

    monkeypatch.setattr(training._ShownEpsilon, "at", shown_at)
    monkeypatch.setattr(training, "_forward", forward_then_signal)
    code, res = run_cli(args, capsys)
    assert code == 128 + signal.SIGINT, res.err
    assert asked[-1] is True  # the stopped step's figure, computed afresh


def test_a_signal_while_the_trained_model_is_saved_waits_for_model_pt(
    tmp_path, capsys, monkeypatch
):
    # Ctrl-C during the final flush and export used to interrupt it: a run with no checkpoint
    # (the default for short runs) kept its spent budget and no model, nothing to resume.
    out = tmp_path / "r"
    args = [*ACS, "--mode", "lazydp", "--noise-multiplier", "1", "--out", str(out)]
    export = PrivacyEngine.export

    def signal_then_export(self, path):
        os.kill(os.getpid(), signal.SIGINT)
        return export(self, path)

    with monkeypatch.context() as m:
        m.setattr(PrivacyEngine, "export", signal_then_export)
        code, res = run_cli(args, capsys)
    assert code == 128 + signal.SIGINT and "after training finished" in res.err, res.err
    assert "Traceback" not in res.err and (out / "model.pt").exists()
    assert sorted(os.listdir(out)) == ["ledger.jsonl", "model.pt"]
    code, res = run_cli([*args, "--resume"], capsys)  # named as finished: nothing to redo
    assert code == 1 and "model.pt is complete" in res.err


def test_without_checkpoint_every_a_long_run_still_writes_safety_checkpoints(
    tmp_path, capsys, monkeypatch
):
    # A run killed hard (SIGKILL, out of memory) with --checkpoint-every 0 used to leave only
    # its ledger. Here every step is "10 minutes" after the last save.
    monkeypatch.setattr(training, "CHECKPOINT_SECONDS", 0.0)
    saved = []
    save = PrivacyEngine.save_checkpoint
    monkeypatch.setattr(
        PrivacyEngine,
        "save_checkpoint",
        lambda self, path, **kw: saved.append(kw["step"]) or save(self, path, **kw),
    )
    out = tmp_path / "r"
    args = [*ACS, "--noise-multiplier", "1", "--max-steps", "4", "--out", str(out)]
    assert run_cli(args, capsys)[0] == 0
    assert saved == [1, 2, 3, 4, 4]  # each step, then the flushed final state
    monkeypatch.setattr(training, "CHECKPOINT_SECONDS", 1e9)  # a short run: none until the end
    saved.clear()
    assert run_cli([*args[:-1], str(tmp_path / "short")], capsys)[0] == 0
    assert saved == [] and not (tmp_path / "short" / "checkpoint.pt").exists()


def test_resuming_a_run_directory_restored_from_an_older_backup_is_refused(
    tmp_path, capsys, monkeypatch
):
    # A backup holds a consistent older pair (ledger, checkpoint): resuming it used to be
    # accepted, and the steps charged after the backup vanished from the record.
    out, backup = tmp_path / "r", tmp_path / "backup"
    args = [*ACS, "--mode", "lazydp", "--noise-multiplier", "1", "--out", str(out)]
    forward, calls = training._forward, {"n": 0}

    def forward_then_stop(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # stops after this step, with a checkpoint
        return forward(model, batch)

    with monkeypatch.context() as m:
        m.setattr(training, "_forward", forward_then_stop)
        assert run_cli(args, capsys)[0] == 128 + signal.SIGTERM
    shutil.copytree(out, backup)
    assert run_cli([*args, "--resume"], capsys)[0] == 0  # the run finishes: more steps charged
    shutil.rmtree(out)
    shutil.copytree(backup, out)  # ... and the older copy comes back
    code, res = run_cli([*args, "--resume"], capsys)
    assert code == 1 and "older copy" in res.err and "Traceback" not in res.err, res.err
    assert (out / "ledger.jsonl").read_text() == (backup / "ledger.jsonl").read_text()


def test_a_second_signal_stops_at_once_and_says_what_is_left(capsys):
    """It exited 143 with no word: the user did not learn that the ledger is whole and that
    the last checkpoint resumes."""
    from lazydp.stop_signals import StopRequest

    request = StopRequest()
    request._handle(signal.SIGTERM, None)
    assert request.requested and "send it again" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        request._handle(signal.SIGTERM, None)
    err = capsys.readouterr().err
    assert "SIGTERM again: stopping now" in err and "--resume" in err
