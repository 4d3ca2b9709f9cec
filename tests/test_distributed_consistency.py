"""Two gloo ranks: ranks that disagree are refused alike on every rank (settings at make_private,
checkpoint steps at resume, a step one rank refuses), and a sharded table follows its LR schedule
after a resume."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from lazydp import ConfigError, InputError, PrivacyError
from lazydp.distributed import DistributedPrivacyEngine, ShardedEmbeddingBag
from lazydp.distributed._comm import over_ranks
from lazydp.errors import LazyDPError
from lazydp.ledger import PrivacyLedger, StepEvent
from lazydp.testing import constant_noise
from tests.gloo import join, leave
from tests.test_distributed import (
    CLIP,
    SIGMA,
    _dataset_loader,
    _ShardModel,
    finish_rank,
    loss_fn,
    spawn_two_ranks,
)

STEPS = 6


def _build(
    rank: int,
    sigma: float = SIGMA,
    ledger: Path | None = None,
    seed: int | None = None,
    nudge: float = 0.0,
    mode: str = "lazydp",
    sharded: bool = True,
):
    model = _ShardModel(sharded=sharded)
    with torch.no_grad():
        model.fc.bias[0] += nudge  # a replica built from other weights
    tables = torch.optim.SGD([model.bag.weight], lr=0.3)
    dense = torch.optim.SGD(
        [p for n, p in model.named_parameters() if not n.startswith("bag.")], lr=0.3
    )
    sched = torch.optim.lr_scheduler.LambdaLR(tables, lambda s: 1.0 / (1 + s))
    engine = DistributedPrivacyEngine(ledger_path=ledger, seed=seed)
    model, opt, _ = engine.make_private(
        module=model,
        optimizer=[dense, tables],
        data_loader=_dataset_loader(),
        noise_multiplier=sigma,
        max_grad_norm=CLIP,
        mode=mode,
    )
    return model, opt, sched, engine


def _steps(model, opt, sched, rank: int, start: int, stop: int) -> None:
    for step in range(start, stop):
        g = torch.Generator().manual_seed(100 * step + rank)
        x, ids = torch.randn(4, 3, generator=g), torch.randint(0, 20, (4, 2), generator=g)
        y = (torch.rand(4, generator=g) < 0.5).float()
        opt.zero_grad()
        loss_fn(model(x, ids), y).backward()
        opt.step()
        sched.step()


def _error(fn) -> str | None:
    try:
        fn()
    except LazyDPError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    join(rank, world, store_path)
    out = Path(out_dir)
    results: dict[str, Any] = {}
    results["mismatch"] = _error(lambda: _build(rank, sigma=SIGMA if rank == 0 else SIGMA / 2))
    # Seeds that agree in their low 52 bits (a float64 comparison of the seeds passed them).
    results["seeds"] = _error(lambda: _build(rank, seed=1 + rank * 2**52))
    results["seeded_and_not"] = _error(lambda: _build(rank, seed=5 if rank else None))
    results["weights"] = _error(lambda: _build(rank, nudge=1e-6 * rank))
    results["same_start"] = _error(lambda: _build(rank, seed=7))
    # The report's examples (summed) and the budget's charged steps (the largest ledger).
    results["over_ranks"] = (over_ranks(rank + 1, world), over_ranks(rank + 1, world, True))
    torch.manual_seed(0)  # every rank alike: each must still initialise rows of its own
    results["fresh_shards"] = ShardedEmbeddingBag(8, 2).gather_weight()
    with constant_noise(0.5):
        model, opt, sched, engine = _build(rank)
        _steps(model, opt, sched, rank, 0, STEPS)
        engine.flush()
        results["full"] = model.bag.gather_weight()

        ledger = out / f"ledger.rank{rank}.jsonl"  # the interrupted run's, kept across resume
        model, opt, sched, engine = _build(rank, ledger=ledger)
        _steps(model, opt, sched, rank, 0, 2)
        engine.save_checkpoint(out / f"early.rank{rank}.pt", sched=sched.state_dict())
        _steps(model, opt, sched, rank, 2, 3)
        engine.save_checkpoint(out / f"mid.rank{rank}.pt", sched=sched.state_dict())

        engine.ledger.close()
        model, opt, sched, engine = _build(rank, ledger=ledger)
        mixed = out / (f"mid.rank{rank}.pt" if rank == 0 else f"early.rank{rank}.pt")
        results["mixed"] = _error(lambda: engine.load_checkpoint(mixed))
        extra = engine.load_checkpoint(out / f"mid.rank{rank}.pt")
        sched.load_state_dict(extra["sched"])
        _steps(model, opt, sched, rank, 3, STEPS)
        engine.flush()
        results["resumed"] = model.bag.gather_weight()

        model, opt, sched, engine = _build(rank, mode="dpsgd_f")
        _steps(model, opt, sched, rank, 0, 1)
        model.bag.weight.requires_grad_(False)  # frozen on every rank
        before = model.bag.gather_weight()
        _steps(model, opt, sched, rank, 1, 3)
        results["frozen_moved"] = float((model.bag.gather_weight() - before).abs().max())

    # A replicated LazyDP table flushed by rank 0 alone (the DDP snapshot idiom).
    model, opt, sched, engine = _build(rank, seed=3, sharded=False)
    _steps(model, opt, sched, rank, 0, 1)
    if rank == 0:
        model.state_dict()
    results["flushed_alone"] = _error(lambda: _steps(model, opt, sched, rank, 1, 2))
    results["flushed_alone_charged"] = engine.ledger.steps
    finish_rank(results, rank, out)


def _uneven_worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    """After a crash the ledgers differ by a step (rank 0 charged one whose all-reduce never
    finished); the checkpoints of the resumed run must still load on every rank."""
    join(rank, world, store_path, timeout_s=60)  # a refusal on one rank only fails, not hangs
    out, results = Path(out_dir), {}
    try:
        for sharded in (False, True):
            ledger = out / f"uneven{int(sharded)}.rank{rank}.jsonl"
            if rank == 0:
                crashed = PrivacyLedger(ledger)
                crashed.charge(StepEvent(0, 0.5, SIGMA, CLIP, "lazydp", "poisson"))
                crashed.close()
            model, opt, sched, engine = _build(rank, ledger=ledger, sharded=sharded)
            _steps(model, opt, sched, rank, 0, 2)
            engine.flush()  # every rank (replicated: rank 0 then writes the file alone)
            path = out / (f"uneven.rank{rank}.pt" if sharded else "uneven.pt")
            if sharded or rank == 0:
                engine.save_checkpoint(path)
            engine.ledger.close()
            model, opt, sched, engine = _build(rank, ledger=ledger, sharded=sharded)
            engine.load_checkpoint(path)
            _steps(model, opt, sched, rank, 2, 3)  # and the resumed run goes on
            results[f"sharded={sharded}"] = engine.ledger.steps
    except Exception as exc:  # noqa: BLE001 -- a refusal, or the other rank's broken collective
        results["error"] = f"{type(exc).__name__}: {exc}"
    torch.save(results, out / f"rank{rank}.pt")
    leave(tolerate_broken=True)  # a group broken by a refusal: the results are saved


class _TablesOnly(torch.nn.Module):
    """No dense parameter: no all-reduce bucket to carry the ranks' votes on a step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.bag = torch.nn.EmbeddingBag(30, 4, mode="sum")

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.bag(ids).sum(1)


def _build_tables_only() -> tuple[Any, Any, DistributedPrivacyEngine]:
    model = _TablesOnly()
    engine = DistributedPrivacyEngine(seed=3)
    model, opt, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
        data_loader=_dataset_loader(),
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        mode="dpsgd_f",
    )
    return model, opt, engine


def _skipping_refused(
    rank: int, spoil: Any, mode: str, sharded: bool, ledger: Path | None = None
) -> dict[str, Any]:
    """Three steps of a loop that skips a step refused with a lazydp error; ``spoil(rank, step,
    model, opt, x)`` may spoil one rank's step 1. Mode "tables": _TablesOnly under dpsgd_f."""
    if mode == "tables":
        model, opt, engine = _build_tables_only()
    else:
        model, opt, _, engine = _build(rank, seed=3, mode=mode, sharded=sharded, ledger=ledger)
    errors: list[str | None] = []
    for step in range(3):
        g = torch.Generator().manual_seed(100 * step + rank)
        x, ids = torch.randn(4, 3, generator=g), torch.randint(0, 20, (4, 2), generator=g)
        y = (torch.rand(4, generator=g) < 0.5).float()
        undo = spoil(rank, step, model, opt, x)
        opt.zero_grad()
        loss_fn(model(x, ids), y).backward()
        errors.append(_error(opt.step))
        if undo is not None:
            undo()
    shard = isinstance(model.bag, ShardedEmbeddingBag)
    weights = [model.bag.gather_weight()] if shard else []
    weights += [
        p.detach().clone() for n, p in model.named_parameters() if not shard or "bag" not in n
    ]
    charged = (engine.ledger.steps, opt.steps_with_data)
    return {"errors": errors, "charged": charged, "weights": weights}


def _nan_features(rank: int, step: int, model: Any, opt: Any, x: torch.Tensor) -> None:
    if (rank, step) == (0, 1):
        x[0, 0] = float("nan")  # a data problem in one rank's batch


def _hook(rank: int, step: int, model: Any, opt: Any, x: torch.Tensor) -> Any:
    if (rank, step) == (1, 1):
        return model.fc.weight.register_hook(lambda g: g).remove  # a set-up of one rank


def _table_lr(rank: int, step: int, model: Any, opt: Any, x: torch.Tensor) -> Any:
    if (rank, step) == (0, 1):
        group = opt.originals[-1].param_groups[0]  # the table's SGD
        lr, group["lr"] = group["lr"], -0.1  # an lr schedule gone wrong on one rank
        return lambda: group.update(lr=lr)


def _ledger_moved(rank: int, step: int, model: Any, opt: Any, x: torch.Tensor) -> Any:
    if (rank, step) == (1, 1):
        path = opt.ledger.path  # gone for one step: that rank's charge would be refused
        os.rename(path, f"{path}.away")
        return lambda: os.rename(f"{path}.away", path)


def _retried_under_dpsgd_r(rank: int) -> dict[str, Any]:
    """dpsgd_r on a model with a buffer: rank 1 refuses step 0 (a hook), takes the hook off, and
    every rank retries the same step (same forward and backward, nothing was changed)."""
    model, opt, _, engine = _build(rank, seed=3, mode="dpsgd_r", sharded=False)
    model.register_buffer("scale", torch.ones(1))  # the second pass puts it back: a new version
    g = torch.Generator().manual_seed(rank)
    x, ids = torch.randn(4, 3, generator=g), torch.randint(0, 20, (4, 2), generator=g)
    opt.zero_grad()
    loss_fn(model(x, ids), (torch.rand(4, generator=g) < 0.5).float()).backward()
    hook = model.fc.weight.register_hook(lambda g: g) if rank == 1 else None
    errors: list[str | None] = []
    for _ in range(2):
        errors.append(_error(opt.step))
        if hook is not None:
            hook.remove()
            hook = None
    weights = [p.detach().clone() for p in model.parameters()]
    return {"errors": errors, "charged": engine.ledger.steps, "weights": weights}


def _refusing_worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    """One rank refuses a step: every rank must refuse it, none charge it, and the loop go on
    (it skipped the refused step on one rank only: the others charged it and waited in its
    all-reduce -- gloo's "Connection closed by peer", a hang, or one rank's next step paired
    with the others' refused one)."""
    join(rank, world, store_path, timeout_s=30)  # a regression fails fast, not in 30 minutes
    results: dict[str, Any] = {}
    for name, spoil, mode, sharded in (
        ("nan", _nan_features, "dpsgd_f", False),
        ("hook", _hook, "lazydp", False),  # replicated LazyDP tables: their check's collective
        ("shard_lr", _table_lr, "lazydp", True),
        ("tables_only", _table_lr, "tables", False),  # a collective of its own for the votes
        ("ledger", _ledger_moved, "dpsgd_f", False),  # the charge runs after the vote
    ):
        ledger = Path(out_dir) / f"ledger.rank{rank}.jsonl" if name == "ledger" else None
        try:
            results[name] = _skipping_refused(rank, spoil, mode, sharded, ledger)
        except Exception as exc:  # noqa: BLE001 -- the other rank's broken collective
            results[name] = f"{type(exc).__name__}: {exc}"
    try:
        results["retry_dpsgd_r"] = _retried_under_dpsgd_r(rank)
    except Exception as exc:  # noqa: BLE001 -- the other rank's broken collective
        results["retry_dpsgd_r"] = f"{type(exc).__name__}: {exc}"
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    leave(tolerate_broken=True)  # a group broken by a regression: the results are saved


@pytest.fixture(scope="module")
def refusing_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn_two_ranks(_refusing_worker, tmp_path_factory.mktemp("dist-refusing"))


def test_a_step_one_rank_refuses_is_refused_on_every_rank_and_charged_on_none(
    refusing_ranks: list,
) -> None:
    ranks = refusing_ranks
    for name, refuser, kind, why in (
        ("nan", 0, InputError, "NaN or Inf reached layer 'fc'"),
        ("hook", 1, ConfigError, "carry gradient hooks"),
        ("shard_lr", 0, ConfigError, "learning rate -0.1"),
        ("tables_only", 0, ConfigError, "learning rate -0.1"),
        ("ledger", 1, PrivacyError, "was deleted or replaced"),
    ):
        runs = [r[name] for r in ranks]
        assert all(isinstance(run, dict) for run in runs), runs
        for rank, run in enumerate(runs):
            first, refused, last = run["errors"]
            assert first is None and last is None  # the loop went on, on every rank alike
            assert refused is not None and refused.startswith(f"{kind.__name__}: ")
            assert why in refused
            if rank != refuser:
                assert f"rank {refuser} refused this step" in refused
                assert "nothing was changed or charged on any rank" in refused
            assert run["charged"] == (2, 2)  # the refused step on no rank
        for mine, theirs in zip(runs[0]["weights"], runs[1]["weights"]):
            assert torch.equal(mine, theirs)  # the replicas still agree


def test_a_step_refused_on_another_rank_can_be_retried_under_dpsgd_r(
    refusing_ranks: list,
) -> None:
    # dpsgd_r's second pass on rank 0 put the model's buffers back (new versions) before the
    # vote refused the step; its retry was then refused as a step whose buffers changed since
    # the forward, on every rank, for good.
    runs = [r["retry_dpsgd_r"] for r in refusing_ranks]
    assert all(isinstance(run, dict) for run in runs), runs
    for run in runs:
        refused, retried = run["errors"]
        assert refused is not None and "gradient hooks" in refused
        assert retried is None
        assert run["charged"] == 1
    for mine, theirs in zip(runs[0]["weights"], runs[1]["weights"]):
        assert torch.equal(mine, theirs)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn_two_ranks(_worker, tmp_path_factory.mktemp("dist-consistency"))


def test_ranks_with_different_settings_are_refused_on_every_rank(ranks: list) -> None:
    for r in ranks:
        assert r["mismatch"] is not None and "noise_multiplier [1.3, 0.65]" in r["mismatch"]


def test_ranks_with_other_seeds_or_weights_are_refused_on_every_rank(ranks: list) -> None:
    for r in ranks:
        assert r["seeds"] is not None and "noise seed (digest)" in r["seeds"]
        # One rank seeded, one not: refused, not a wait in the seed broadcast.
        assert (
            r["seeded_and_not"] is not None and "noise seed given [0.0, 1.0]" in r["seeded_and_not"]
        )
        assert r["weights"] is not None and "initial weights" in r["weights"]
        assert r["same_start"] is None


def test_counts_over_ranks_are_the_same_on_every_rank(ranks: list) -> None:
    assert [r["over_ranks"] for r in ranks] == [(3, 2), (3, 2)]


def test_fresh_shards_hold_rows_of_their_own_on_each_rank(ranks: list) -> None:
    for r in ranks:
        full = r["fresh_shards"]  # rows r % 2 live on rank r
        assert not torch.equal(full[0::2], full[1::2])
        assert torch.equal(full, ranks[0]["fresh_shards"])


def test_checkpoints_of_different_steps_are_refused_on_every_rank(ranks: list) -> None:
    for r in ranks:
        assert r["mixed"] is not None and "different steps" in r["mixed"]


def test_a_resumed_sharded_table_follows_the_lr_schedule(ranks: list) -> None:
    for r in ranks:
        torch.testing.assert_close(r["resumed"], r["full"], atol=1e-6, rtol=1e-5)


def test_a_frozen_sharded_table_is_left_alone_in_the_eager_modes(ranks: list) -> None:
    # Its owners kept adding noise (and decay, momentum) every step; a frozen replicated
    # table, and lazydp's sharded one, were left alone.
    for r in ranks:
        assert r["frozen_moved"] == 0.0


def test_replicated_lazy_tables_flushed_by_one_rank_alone_are_refused_before_the_charge(
    ranks: list,
) -> None:
    # The flush drew from the stream every rank shares on rank 0 only: the replicas then drew
    # other catch-up noise and drifted apart silently.
    for r in ranks:
        assert (
            r["flushed_alone"] is not None
            and "a full flush of the replicated" in r["flushed_alone"]
        )
        assert r["flushed_alone_charged"] == 1  # the refused step was not charged


def test_checkpoints_load_on_every_rank_when_a_crash_left_the_ledgers_a_step_apart(
    tmp_path: Path,
) -> None:
    # Stamped with the writer's charged steps alone, rank 0's checkpoint was refused on rank 1
    # ("the privacy ledger holds 2"), and each rank's own sharded file as "different steps".
    ranks = spawn_two_ranks(_uneven_worker, tmp_path)
    assert [r.get("error") for r in ranks] == [None, None]
    assert [r["sharded=False"] for r in ranks] == [4, 3]  # each its own count, one more
    assert [r["sharded=True"] for r in ranks] == [4, 3]
