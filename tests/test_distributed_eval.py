"""Two gloo ranks: an evaluation on rank 0 alone (the DDP idiom ``if rank == 0: evaluate()``).

Refused on every rank alike when its reads need a collective (pending LazyDP noise, or a
sharded table), instead of hanging in gloo or pairing with the other rank's training forward;
allowed after ``engine.flush()`` on every rank, where it changes nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch

from lazydp import ConfigError
from lazydp.distributed import ShardedEmbeddingBag
from tests.gloo import join
from tests.test_distributed import finish_rank, spawn_two_ranks
from tests.test_distributed_consistency import _build, _steps


def _digest_of(model: torch.nn.Module) -> str:
    """Every weight as every rank sees it (a sharded table gathered: a collective)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if name == "bag.weight" and isinstance(model.bag, ShardedEmbeddingBag):
            p = model.bag.gather_weight()
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _eval(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.zeros(2, 3), torch.tensor([[1, 2], [3, 4]]))


def _run(rank: int, sharded: bool, evaluate: bool, flush: bool) -> tuple[Any, ...]:
    """Three steps; after each, maybe a flush on every rank and an evaluation on rank 0."""
    model, opt, sched, engine = _build(rank, seed=3, sharded=sharded)
    refused = None
    for step in range(3):
        try:
            _steps(model, opt, sched, rank, step, step + 1)
        except ConfigError as exc:
            refused = str(exc)
            break
        if flush:
            engine.flush()
        if evaluate and rank == 0:
            try:
                _eval(model)
            except ConfigError as exc:
                refused = str(exc)
                break
    return refused, engine.ledger.steps, _digest_of(model)


def _export_alone(rank: int, out_dir: str) -> tuple[str | None, int]:
    """``if rank == 0: engine.export(...)`` with a sharded table (assembling it is a collective)."""
    model, opt, sched, engine = _build(rank, seed=3)
    try:
        _steps(model, opt, sched, rank, 0, 1)
        if rank == 0:
            engine.export(Path(out_dir) / "model.pt")
        _steps(model, opt, sched, rank, 1, 2)
    except ConfigError as exc:
        return str(exc), engine.ledger.steps
    return None, engine.ledger.steps


def _worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    join(rank, world, store_path, timeout_s=30)  # a regression fails fast, not in 30 minutes
    results: dict[str, Any] = {}
    for sharded in (False, True):
        results[f"alone/{sharded}"] = _run(rank, sharded, evaluate=True, flush=False)
    results["export_alone"] = _export_alone(rank, out_dir)
    results["flushed"] = _run(rank, False, evaluate=True, flush=True)
    results["reference"] = _run(rank, False, evaluate=False, flush=True)
    finish_rank(results, rank, Path(out_dir))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn_two_ranks(_worker, tmp_path_factory.mktemp("dist-eval"))


@pytest.mark.parametrize("sharded", [False, True])
def test_an_evaluation_on_rank_0_alone_is_refused_on_every_rank(ranks: list, sharded: bool) -> None:
    for r in ranks:
        refused, charged, _ = r[f"alone/{sharded}"]
        assert refused is not None and "ran on some ranks only" in refused
        assert "engine.flush() on every rank" in refused
        assert charged == 1  # refused before the second step was charged
    assert ranks[0][f"alone/{sharded}"][2] == ranks[1][f"alone/{sharded}"][2]


def test_rank_0_evaluates_alone_after_a_flush_on_every_rank_and_changes_nothing(
    ranks: list,
) -> None:
    for r in ranks:
        assert r["flushed"][:2] == (None, 3)
        # The same model as the run that never evaluated: no draw, no drift between replicas.
        assert r["flushed"][2] == r["reference"][2] == ranks[0]["reference"][2]


def test_an_export_of_sharded_tables_on_rank_0_alone_is_refused_on_every_rank(
    ranks: list,
) -> None:
    for r in ranks:
        refused, charged = r["export_alone"]
        assert refused is not None and "gather_weight() (engine.export() with sharded" in refused
        assert "engine.export() on every rank" in refused
        assert charged == 1


def test_a_refused_make_private_gives_the_sharded_tables_back_to_the_optimizer(tmp_path) -> None:
    # make_private takes the sharded weights out of the caller's groups (their owners update
    # them); a refusal left them out, so the corrected call, which the engine allows, was told
    # "sharded tables ['bag'] are in no optimizer" (and the caller's optimizer lost the table).
    import torch.distributed as dist
    from torch import nn

    from lazydp import UnsupportedLayerError
    from lazydp.distributed import DistributedPrivacyEngine
    from tests.toy import loader

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bag = ShardedEmbeddingBag.from_full(torch.nn.EmbeddingBag(40, 4, mode="sum"))
            self.fc = nn.Linear(4, 1)

        def forward(self, x, bag_ids, emb_ids):
            return self.fc(self.bag(bag_ids)).squeeze(1)

    join(0, 1, str(tmp_path / "store"), timeout_s=30)
    try:
        model = Model()
        tables = torch.optim.SGD([model.bag.weight], lr=0.1)
        dense = torch.optim.SGD(model.fc.parameters(), lr=0.1)
        engine = DistributedPrivacyEngine(seed=0)
        kwargs = dict(
            module=model,
            optimizer=[dense, tables],
            data_loader=loader(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            mode="dpsgd_f",
        )
        model.fc.forward = lambda x: nn.Linear.forward(model.fc, x)  # refused by the capture
        with pytest.raises(UnsupportedLayerError, match="forward assigned on the instance"):
            engine.make_private(**kwargs)
        assert tables.param_groups[0]["params"] == [model.bag.weight]
        del model.fc.forward
        engine.make_private(**kwargs)
    finally:
        dist.destroy_process_group()


def test_a_lazy_module_is_refused_clearly_by_the_distributed_engine(tmp_path) -> None:
    # The ranks' starting-weights digest read every parameter's bytes first: a LazyLinear
    # raised torch's "uninitialized parameter" ValueError before make_private could say what
    # to do (run one forward first).
    from torch import nn

    from lazydp.distributed import DistributedPrivacyEngine
    from tests.toy import loader

    join(0, 1, str(tmp_path / "store"), timeout_s=30)
    try:
        model = nn.Sequential(nn.Linear(3, 4), nn.LazyLinear(1))
        with pytest.raises(ConfigError, match="uninitialized parameters"):
            DistributedPrivacyEngine(seed=0).make_private(
                module=model,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                data_loader=loader(),
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                mode="dpsgd_f",
            )
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()
