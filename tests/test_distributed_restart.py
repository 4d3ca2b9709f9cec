"""Kill a worker mid-run: torchrun restarts both from the last checkpoint; the ledger only grows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lazydp.cli import main
from lazydp.distributed.worker import KILL_ENV
from lazydp.preprocess import preprocess

FIXTURE = Path(__file__).parent / "fixtures" / "criteo_small.tsv"
STEPS, KILL_AT, EVERY = 8, 5, 2


def _steps(ledger: Path) -> int:
    return sum(json.loads(line)["kind"] == "step" for line in ledger.read_text().splitlines())


@pytest.mark.slow
def test_killed_worker_restarts_from_checkpoint_and_ledger_counts_rerun_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, out, marker = tmp_path / "data", tmp_path / "out", tmp_path / "killed"
    preprocess("criteo", [FIXTURE], data, buckets=64, progress=False)
    monkeypatch.setenv(KILL_ENV, f"1:{KILL_AT}:{marker}")  # rank 1 dies before its 6th step
    argv = ["train", "--data", str(data), "--out", str(out), "--mode", "lazydp"]
    argv += ["--batch-size", "4", "--noise-multiplier", "1.0", "--max-steps", str(STEPS)]
    argv += ["--checkpoint-every", str(EVERY), "--nproc-per-node", "2", "--max-restarts", "3"]
    argv += ["--no-progress", "--json"]
    assert main(argv) == 0
    assert marker.exists()  # the crash happened
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == STEPS
    # Unseeded: the ranks' shared noise stream is seeded from a broadcast secret, not by the user.
    assert not any("reproducible" in c for c in report["privacy"]["caveats"])
    # Steps after the last checkpoint before the crash ran twice and were charged twice.
    resumed_from = KILL_AT // EVERY * EVERY
    for ledger in (out / "ledger.jsonl", out / "ledger.rank1.jsonl"):
        assert _steps(ledger) >= STEPS + (KILL_AT - resumed_from), ledger
    # The last checkpoint was written again after the final flush: nothing is pending in it
    # and it holds the exported weights, so a resume of the finished run releases this model.
    model = torch.load(out / "model.pt", weights_only=True)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(bool(torch.isfinite(t).all()) for t in model.values() if t.is_floating_point())
    lazy = ckpt["lazy"]
    assert lazy["steps_done"] == STEPS and lazy["tables"]
    assert all(not bool((s["applied"] < lazy["steps_done"]).any()) for s in lazy["tables"])
    shared = [k for k in model if k in ckpt["model"]]
    assert shared and all(torch.equal(model[k], ckpt["model"][k]) for k in shared)


@pytest.mark.slow
def test_a_calibrated_run_resumed_after_a_crash_stops_every_rank_at_the_same_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 0 dies before its 6th step; rank 1 fails in that step's first all-reduce, which
    carries the ranks' votes on the step and comes before the charge, so both ledgers hold 5
    steps (rank 1 charged the step before the vote: 5 and 6, the case
    test_distributed_consistency builds by hand). The budget is counted from the ledgers on
    both ranks: they stop together, without another crash, 8 - 5 steps after the step-3
    checkpoint."""
    data, out, marker = tmp_path / "data", tmp_path / "out", tmp_path / "killed"
    preprocess("criteo", [FIXTURE], data, buckets=64, progress=False)
    monkeypatch.setenv(KILL_ENV, f"0:5:{marker}")
    argv = ["train", "--data", str(data), "--out", str(out), "--mode", "dpsgd_f"]
    argv += ["--batch-size", "4", "--target-epsilon", "2", "--max-steps", "8"]
    argv += ["--checkpoint-every", "3", "--nproc-per-node", "2", "--max-restarts", "1"]
    argv += ["--no-progress", "--json"]
    assert main(argv) == 0
    assert marker.exists()
    report = json.loads((out / "report.json").read_text())
    assert report["stopped_for_budget"] and report["steps"] == 3 + (8 - 5)
    assert report["privacy"]["epsilon"] <= 2 + 1e-9
    assert [_steps(out / name) for name in ("ledger.jsonl", "ledger.rank1.jsonl")] == [8, 8]


@pytest.mark.slow
def test_every_rank_refuses_a_busy_out_and_none_waits_for_rank_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Rank 0 alone holds the run lock: without the ranks' vote, rank 1 would go on to its
    # first collective and wait there for a rank 0 that had left.
    from lazydp.run_lock import run_lock

    data, out = tmp_path / "data", tmp_path / "out"
    preprocess("criteo", [FIXTURE], data, buckets=64, progress=False)
    argv = ["train", "--data", str(data), "--out", str(out), "--max-steps", "2"]
    argv += ["--batch-size", "4", "--noise-multiplier", "1.0", "--nproc-per-node", "2"]
    argv += ["--max-restarts", "0", "--no-progress"]
    out.mkdir()
    with run_lock(out):
        assert main(argv) != 0
    assert "in use by another lazydp train" in capsys.readouterr().err
    assert not list(out.glob("ledger*"))
