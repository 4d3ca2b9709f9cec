"""``lazydp train --resume`` and the report of a resumed run: a finished run resumes to the same
released model, a resume with nothing to resume from is refused, and the report keeps every
caveat the run's history calls for."""

from __future__ import annotations

import torch

from tests.test_cli_train import last_json, run_cli
from tests.test_engine_errors import private
from tests.test_lazy import build, step
from tests.toy import loss_fn, make_batches

ACS = ["train", "--dataset", "acs", "--epochs", "1", "--json", "--no-progress"]


def _weights(path):
    return torch.load(path, weights_only=True)


def test_resuming_a_finished_lazydp_run_releases_the_same_model(tmp_path, capsys):
    out = tmp_path / "r"
    args = [*ACS, "--mode", "lazydp", "--noise-multiplier", "1", "--checkpoint-every", "1"]
    args += ["--out", str(out)]
    assert run_cli(args, capsys)[0] == 0
    first = _weights(out / "model.pt")
    steps = (out / "ledger.jsonl").read_text().count('"kind":"step"')
    code, res = run_cli([*args, "--resume"], capsys)
    assert code == 0, res.err
    # The last checkpoint held the flushed model: no pending noise drawn a second time.
    second = _weights(out / "model.pt")
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (out / "ledger.jsonl").read_text().count('"kind":"step"') == steps


def test_resume_without_a_checkpoint_is_refused_and_keeps_the_model(tmp_path, capsys):
    out = tmp_path / "r"
    args = [*ACS, "--noise-multiplier", "1", "--checkpoint-every", "0", "--out", str(out)]
    assert run_cli(args, capsys)[0] == 0
    model = (out / "model.pt").read_bytes()
    code, res = run_cli([*args, "--resume"], capsys)
    assert code == 1 and "no checkpoint.pt" in res.err and "Traceback" not in res.err
    assert (out / "model.pt").read_bytes() == model


def test_a_calibrated_run_resumed_for_more_steps_is_flagged_over_target(tmp_path, capsys):
    out = tmp_path / "r"
    args = [*ACS, "--mode", "dpsgd_f", "--target-epsilon", "2", "--checkpoint-every", "2"]
    args += ["--out", str(out)]
    assert run_cli([*args, "--max-steps", "4"], capsys)[0] == 0
    code, res = run_cli([*args, "--max-steps", "8", "--resume"], capsys)
    assert code == 0, res.err
    privacy = last_json(res.out)["privacy"]
    assert privacy["epsilon"] > 2
    assert any(c.startswith("OVER TARGET") and "other settings" in c for c in privacy["caveats"])
    assert any(c.startswith("MIXED SETTINGS") for c in privacy["caveats"])


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
