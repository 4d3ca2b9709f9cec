"""Single-process checks of lazydp.distributed: world size 1, launch command, restart guard."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lazydp.clipping import clipper_for
from lazydp.clipping._base import Call, SparseRows
from lazydp.distributed import ShardedEmbeddingBag
from lazydp.distributed.data_parallel import ClippedSumReducer, _buckets
from lazydp.distributed.launch import prepare_restart, torchrun_command
from lazydp.errors import ConfigError, PrivacyError, UnsupportedLayerError
from lazydp.ledger import PrivacyLedger, StepEvent
from tests.gloo import join, leave, run_ranks


def test_sharded_bag_in_one_process_equals_embedding_bag() -> None:
    torch.manual_seed(0)
    full = nn.EmbeddingBag(20, 3, mode="mean")
    sharded = ShardedEmbeddingBag.from_full(full)
    ids = torch.tensor([1, 1, 5, 19, 0, 7])
    offsets = torch.tensor([0, 3, 3])
    torch.testing.assert_close(sharded(ids, offsets), full(ids, offsets))
    summed = nn.EmbeddingBag(20, 3, mode="sum", _weight=full.weight.detach().clone())
    sharded_sum = ShardedEmbeddingBag.from_full(summed)
    w = torch.tensor([0.5, 2.0, -1.0, 1.0, 3.0, 1.0])
    torch.testing.assert_close(sharded_sum(ids, offsets, w), summed(ids, offsets, w))


def test_sharded_bag_norms_are_the_embedding_bag_norms_with_repeats() -> None:
    torch.manual_seed(0)
    full = nn.EmbeddingBag(10, 4, mode="sum")
    sharded = ShardedEmbeddingBag.from_full(full)
    ids = torch.tensor([[2, 2, 2], [1, 3, 4]])
    g = torch.randn(2, 4)
    call = Call((ids,), {}, g)
    n_sharded = clipper_for(sharded).norms2(sharded, [call])
    # Example 0 repeats row 2 three times: ||dE_0||^2 = 9 ||g_0||^2, not 3 ||g_0||^2.
    torch.testing.assert_close(
        n_sharded, torch.stack([9 * g[0].square().sum(), 3 * g[1].square().sum()])
    )
    torch.testing.assert_close(n_sharded, clipper_for(full).norms2(full, [call]))


def test_sharded_bag_refuses_max_mode_and_bad_ids() -> None:
    with pytest.raises(UnsupportedLayerError, match='mode="max"'):
        ShardedEmbeddingBag(10, 2, mode="max")
    with pytest.raises(Exception, match="ids must be in"):
        ShardedEmbeddingBag(10, 2)(torch.tensor([[3, 10]]))
    with pytest.raises(ConfigError, match="full table"):
        ShardedEmbeddingBag(10, 2, _weight=torch.zeros(9, 2))


def test_a_sharded_table_refuses_a_momentum_too_small_for_its_rows_before_any_collective():
    from lazydp._timing import PhaseTimer
    from lazydp.noise import GaussianNoise
    from lazydp.optim.lazy import SgdStep

    sharded = ShardedEmbeddingBag(10, 2)
    before = sharded.weight.detach().clone()
    sgd = lambda: SgdStep(lr=0.1, momentum=1e-40)  # noqa: E731
    sharded.attach(GaussianNoise(seed=0), 1.0, 8.0, sgd, lazy=True, timer=PhaseTimer(), clip=1.0)
    with pytest.raises(ConfigError, match="too small"):
        sharded.apply_clipped_sum(None)  # no process group: a collective would fail instead
    assert torch.equal(sharded.weight.detach(), before)


def test_reducer_in_one_process_fills_missing_sums_and_keeps_rows() -> None:
    lin, bag = nn.Linear(2, 3), nn.EmbeddingBag(6, 2)
    reducer = ClippedSumReducer([lin.weight, lin.bias], [bag.weight])
    rows = SparseRows(torch.tensor([4, 1, 4]), torch.ones(3, 2), 6)
    sums = {lin.weight: torch.full((3, 2), 2.0), bag.weight: rows}
    reducer(sums)
    assert torch.equal(sums[lin.weight], torch.full((3, 2), 2.0))
    assert torch.equal(sums[lin.bias], torch.zeros(3))
    got = sums[bag.weight]
    assert isinstance(got, SparseRows) and got.indices.tolist() == [4, 1, 4]
    assert torch.equal(got.to_dense(), rows.to_dense())
    # A dense table sum (dpsgd_r without sparse grads) travels as its non-zero rows only.
    dense = torch.zeros(6, 2)
    dense[3] = 1.5
    sums = {bag.weight: dense}
    reducer(sums)
    assert sums[bag.weight].indices.tolist() == [3]  # type: ignore[union-attr]


def test_buckets_respect_the_cap_and_keep_order() -> None:
    params = [nn.Parameter(torch.zeros(n)) for n in (10, 10, 30, 5)]
    sizes = [[p.numel() for p in b] for b in _buckets(params, cap_bytes=4 * 20)]
    assert sizes == [[10, 10], [30], [5]]
    assert [[p.numel() for p in b] for b in _buckets(params, 1 << 20)] == [[10, 10, 30, 5]]
    with pytest.raises(ConfigError, match="bucket_cap_mb"):
        ClippedSumReducer(params, [], bucket_cap_mb=-1)


def test_torchrun_command() -> None:
    ns = argparse.Namespace(nproc_per_node=2, nnodes=1, rdzv_endpoint=None, max_restarts=3)
    cmd = torchrun_command(ns, Path("c.json"))
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--max-restarts=3" in cmd
    assert cmd[-3:] == ["-m", "lazydp.distributed.worker", "c.json"]
    multi = argparse.Namespace(nproc_per_node=4, nnodes=2, rdzv_endpoint="h:29400", max_restarts=0)
    assert "--rdzv-endpoint=h:29400" in torchrun_command(multi, Path("c.json"))
    with pytest.raises(ConfigError, match="rdzv-endpoint"):
        torchrun_command(argparse.Namespace(nproc_per_node=2, nnodes=2), Path("c.json"))


# torchrun's stand-in: records the signal that reaches it, then exits as torchrun does.
_FAKE_TORCHRUN = """
import os, pathlib, signal, sys, time
d = pathlib.Path(sys.argv[1])
def stop(signum, frame):
    (d / "stopped").write_text(str(signum))
    sys.exit(1)
for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, stop)
(d / "ready").write_text(str(os.getpid()))
time.sleep(60)
"""

_LAUNCHER = """
import sys
import lazydp.distributed.launch
launch = sys.modules["lazydp.distributed.launch"]  # the package's name launch is the function
launch.torchrun_command = lambda args, config: [sys.executable, "-c", sys.argv[2], sys.argv[1]]
from lazydp.cli import main
sys.exit(main(["train", "--nproc-per-node", "2", "--no-progress", "--out", sys.argv[1] + "/run"]))
"""


# The same for a distributed audit: torchrun's options end 3 places before its script, and the
# audit appends its own arguments (the stand-in ignores them).
_AUDIT_LAUNCHER = """
import sys
import lazydp.distributed.launch
launch = sys.modules["lazydp.distributed.launch"]
fake = [sys.executable, "-c", sys.argv[2], sys.argv[1], "-", "-", "-"]
launch.torchrun_command = lambda args, config: fake
from lazydp.cli import main
sys.exit(main(["audit", "--nproc-per-node", "2", "--out", sys.argv[1] + "/audit"]))
"""


@pytest.mark.parametrize("launcher_code", [_LAUNCHER, _AUDIT_LAUNCHER], ids=["train", "audit"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launcher_stops_torchrun_and_waits_for_it(
    tmp_path: Path, signum: int, launcher_code: str
) -> None:
    """The launcher died at once on SIGTERM, and SIGKILLed torchrun on SIGINT before it could
    stop its workers: they trained on, orphaned, after the command had returned. A
    distributed audit launched torchrun with subprocess.run: the same."""
    launcher = subprocess.Popen(
        [sys.executable, "-c", launcher_code, str(tmp_path), _FAKE_TORCHRUN],
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    ready = tmp_path / "ready"
    while not ready.exists() or not ready.read_text():
        assert launcher.poll() is None, "the launcher ended before torchrun started"
        time.sleep(0.05)
    child = int(ready.read_text())
    try:
        launcher.send_signal(signum)
        assert launcher.wait(timeout=30) == 128 + signum
        assert (tmp_path / "stopped").read_text() == str(int(signum))  # torchrun was told
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_restart_without_ledger_is_a_privacy_error(tmp_path: Path, monkeypatch) -> None:
    cfg = SimpleNamespace(out=str(tmp_path), resume=False)
    prepare_restart(cfg, rank=1)  # first attempt: nothing to check
    assert cfg.resume is False
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rank0 = PrivacyLedger(tmp_path / "ledger.jsonl")
    rank0.charge(StepEvent(0, 0.01, 1.0, 1.0, "dpsgd_f", "poisson"))
    rank0.close()
    with pytest.raises(PrivacyError, match="ledger.rank1.jsonl is missing"):
        prepare_restart(cfg, rank=1)
    (tmp_path / "ledger.rank1.jsonl").write_text("")
    prepare_restart(cfg, rank=1)
    assert cfg.resume is True


def test_a_restart_after_a_crash_in_the_set_up_goes_ahead(tmp_path: Path, monkeypatch) -> None:
    # Rank 1 died before it opened its ledger: no rank can have charged a step (make_private
    # waits for every rank), so torchrun's restart was refused with advice to restore a
    # ledger that never existed. A checkpoint, or a step on record, still refuses it.
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    PrivacyLedger(tmp_path / "ledger.jsonl").close()  # rank 0 got that far: a header only
    cfg = SimpleNamespace(out=str(tmp_path), resume=False)
    prepare_restart(cfg, rank=1)
    assert cfg.resume is True
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(PrivacyError, match="ledger.rank1.jsonl is missing"):
        prepare_restart(cfg, rank=1)


def test_a_seeded_distributed_run_on_a_charged_ledger_starts_on_a_fresh_stream(tmp_path) -> None:
    # As PrivacyEngine (tests/test_lazy.py): a seeded run from scratch on a ledger that holds
    # charged steps redrew, on stream 0, the noise the run that charged them had drawn.
    from tests.test_distributed_consistency import _build, _steps

    weights = []
    for _ in range(2):
        model, opt, sched, engine = _build(0, ledger=tmp_path / "l.jsonl", seed=3, sharded=False)
        _steps(model, opt, sched, 0, 0, 2)
        weights.append(model.fc.weight.detach().clone())
    assert engine.ledger.steps == 4
    assert engine.noise is not None and engine.noise.stream_path == (3,)  # 1 + 2 charged
    assert float((weights[1] - weights[0]).abs().max()) > 1e-3  # other noise


@pytest.mark.parametrize("mode", ["dpsgd_f", "lazydp"])
def test_a_sharded_tables_negative_lr_is_refused_before_the_charge(tmp_path, mode) -> None:
    # The shard's own update checks its lr in the reduce hook, after the charge: a schedule
    # gone negative was refused with "nothing was charged" while the ledger held the step.
    from tests.test_distributed_consistency import _build, _steps

    model, opt, sched, engine = _build(0, ledger=tmp_path / "l.jsonl", mode=mode)
    _steps(model, opt, sched, 0, 0, 1)
    for group in opt.originals[1].param_groups:  # the tables' SGD
        group["lr"] = -0.1
    before = model.fc.weight.detach().clone()  # (a LazyDP table's forward catches rows up)
    with pytest.raises(ConfigError, match="learning rate -0.1"):
        _steps(model, opt, sched, 0, 1, 2)
    assert engine.ledger.steps == 1
    assert torch.equal(model.fc.weight.detach(), before)


def _lock_worker(rank: int, world: int, store: str, tmp: str) -> None:
    from lazydp.run_lock import run_lock

    join(rank, world, store)
    try:
        with run_lock(Path(tmp) / "out", rank, world):
            outcome = "ran"
    except ConfigError as exc:
        outcome = str(exc)
    (Path(tmp) / f"rank{rank}.txt").write_text(outcome)
    leave()


@pytest.mark.slow
def test_every_rank_refuses_when_rank_0_finds_the_out_in_use(tmp_path: Path) -> None:
    # Only rank 0 takes the lock; without the vote rank 1 went on to wait in a collective.
    from lazydp.run_lock import run_lock

    (tmp_path / "out").mkdir()
    with run_lock(tmp_path / "out"):
        run_ranks(_lock_worker, 2, tmp_path)
    said = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert "in use by another lazydp train (pid" in said[0]
    assert "in use by another lazydp train (another rank 0)" in said[1]
    run_ranks(_lock_worker, 2, tmp_path)  # released: both run
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["ran", "ran"]
