"""A checkpoint that does not fit the engine is refused before anything is loaded.

The danger these guard against: a lazydp checkpoint's weights still owe the noise its history
tables record. Loading them into an engine that does not apply that noise (another mode, another
noise scale) or loading the weights and then failing half-way would release rows without it.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lazydp import ConfigError, PrivacyEngine, PrivacyError
from lazydp.testing import constant_noise
from tests.test_engine_errors import private
from tests.test_lazy import build, step
from tests.toy import Toy, dense_params, loader, loss_fn, make_batches, table_params


def _trained_checkpoint(tmp_path, mode="lazydp"):
    model, opt, sched, engine = build(mode, ledger_path=tmp_path / "run.jsonl")
    for b in make_batches(3, seed=1):
        step(model, opt, sched, b)
    engine.save_checkpoint(tmp_path / "ck.pt")
    return tmp_path / "ck.pt"


def _weights(model):
    # Direct parameter reads on purpose: model.state_dict() would flush pending noise.
    return [p.detach().clone() for p in model.parameters()]


def _assert_untouched(model, opt, before, steps, pending):
    for a, b in zip(_weights(model), before):
        assert torch.equal(a, b)
    assert opt.steps_done == steps
    assert opt.pending_rows() == pending


def _fresh(mode, tmp_path, **kw):
    model, opt, sched, engine = build(mode, ledger_path=tmp_path / "run.jsonl", **kw)
    return model, opt, engine


@pytest.mark.parametrize(("saved", "resumed"), [("lazydp", "dpsgd_f"), ("dpsgd_f", "lazydp")])
def test_a_checkpoint_resumes_only_in_the_mode_that_wrote_it(tmp_path, saved, resumed):
    with constant_noise(0.9):
        path = _trained_checkpoint(tmp_path, saved)
        model, opt, engine = _fresh(resumed, tmp_path)
        before = _weights(model)
        with pytest.raises(PrivacyError, match=f"written in mode '{saved}'"):
            engine.load_checkpoint(path)
        _assert_untouched(model, opt, before, 0, 0)


def _two_optimizers(model):
    return [
        torch.optim.Adam(dense_params(model), lr=0.01),
        torch.optim.SGD(table_params(model), lr=0.5),
    ]


@pytest.mark.parametrize(
    ("make_opt", "sigma", "match"),
    [
        # the checkpoint's run used sigma 1.3: its pending noise is owed at 1.3
        (_two_optimizers, 0.9, "pending LazyDP noise"),
        # one optimizer where the checkpoint holds two
        (lambda model: torch.optim.SGD(model.parameters(), lr=0.5), 1.3, "optimizer"),
    ],
)
def test_another_noise_scale_or_optimizer_layout_is_refused(tmp_path, make_opt, sigma, match):
    path = _trained_checkpoint(tmp_path)
    torch.manual_seed(0)
    model = Toy()
    engine = PrivacyEngine(seed=1, ledger_path=tmp_path / "run.jsonl")
    model, opt, _ = engine.make_private(
        module=model,
        optimizer=make_opt(model),
        data_loader=loader(),
        noise_multiplier=sigma,
        max_grad_norm=0.7,
        mode="lazydp",
    )
    before = _weights(model)
    with pytest.raises(PrivacyError, match=match):
        engine.load_checkpoint(path)
    _assert_untouched(model, opt, before, 0, 0)


def test_a_bad_part_late_in_the_checkpoint_leaves_the_model_as_it_was(tmp_path):
    path = _trained_checkpoint(tmp_path)
    state = torch.load(path, weights_only=True)
    model, opt, sched, engine = build("lazydp", ledger_path=tmp_path / "run.jsonl")
    for b in make_batches(2, seed=2):
        step(model, opt, sched, b)
    before, pending = _weights(model), opt.pending_rows()
    assert pending > 0
    broken = {
        "pool": lambda s: s["lazy"]["pool"].update(pos=-5),
        "dense_pool": lambda s: s["lazy"]["dense_pool"].update(call="x"),
        "history": lambda s: s["lazy"]["tables"][0].update(
            applied=torch.zeros(3, dtype=torch.int32)
        ),
        "prefix": lambda s: s["lazy"]["prefixes"][0].update(s2=torch.zeros(2, dtype=torch.float64)),
        "tables": lambda s: s["lazy"]["tables"].pop(),
        "noise": lambda s: s["noise"].update(counter=-1),
        "shape": lambda s: s["model"].update({"fc1.weight": torch.zeros(1, 1)}),
        "keys": lambda s: s["model"].pop("fc1.bias"),
    }
    for name, damage in broken.items():
        bad = torch.load(path, weights_only=True)
        damage(bad)
        torch.save(bad, tmp_path / f"{name}.pt")
        with pytest.raises(PrivacyError, match="Nothing was loaded|noise|corrupt"):
            engine.load_checkpoint(tmp_path / f"{name}.pt")
        _assert_untouched(model, opt, before, 2, pending)
    # The refusals are not spurious: the undamaged checkpoint loads.
    engine.load_checkpoint(path)
    assert opt.steps_done == state["lazy"]["steps_done"] == 3


@pytest.mark.parametrize("mode", ["lazydp", "dpsgd_f"])
def test_a_load_between_backward_and_step_is_refused_and_changes_nothing(tmp_path, mode):
    """The recorded gradient belongs to the weights being replaced: the next step applied it to
    the loaded ones (and charged it), so the run went on as no uninterrupted run does."""
    path = _trained_checkpoint(tmp_path, mode)
    model, opt, sched, engine = build(mode, ledger_path=tmp_path / "run.jsonl")
    batches = make_batches(5, seed=2)
    for b in batches[:4]:
        step(model, opt, sched, b)
    x, bag, emb, y = batches[4]
    opt.zero_grad()
    loss_fn(model(x, bag, emb), y).backward()
    before, pending, charged = _weights(model), opt.pending_rows(), engine.ledger.steps
    with pytest.raises(PrivacyError, match=r"backward\(\) and optimizer.step.*zero_grad"):
        engine.load_checkpoint(path)
    _assert_untouched(model, opt, before, 4, pending)
    assert engine.ledger.steps == charged
    opt.zero_grad()  # drops that gradient: the load now goes through
    engine.load_checkpoint(path)
    assert opt.steps_done == 3 and engine.ledger.steps == charged


def _shuffled(tmp_path, **loader_options):
    ds = TensorDataset(torch.arange(40.0)[:, None])  # the feature is the example's index
    loader = DataLoader(ds, batch_size=5, **loader_options)
    return private(
        "dpsgd_f",
        torch.nn.Linear(1, 1),
        data_loader=loader,
        sampler="shuffle",
        ledger_path=tmp_path / "run.jsonl",
    )


def _train_on(model, opt, batches, seen):
    for (x,) in batches:
        seen += x[:, 0].long().tolist()
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_resumed_shuffled_epoch_goes_on_where_it_stopped(tmp_path, workers):
    # 8 batches per epoch; 3 before the checkpoint, the other 5 after it: no example twice, and
    # none skipped though a worker had drawn batches ahead of the loop.
    options = {"num_workers": workers, "prefetch_factor": 2} if workers else {}
    model, opt, dl, engine = _shuffled(tmp_path, **options)
    seen: list[int] = []
    batches = iter(dl)
    _train_on(model, opt, itertools.islice(batches, 3), seen)
    engine.save_checkpoint(tmp_path / "ck.pt")
    del batches
    model, opt, dl, engine = _shuffled(tmp_path)
    engine.load_checkpoint(tmp_path / "ck.pt")
    _train_on(model, opt, dl, seen)
    assert sorted(seen) == list(range(40))
    assert engine.ledger.steps == 8


def test_resuming_a_shuffled_run_twice_from_one_checkpoint_uses_no_example_twice(tmp_path):
    # The checkpoint restores the epoch's permutation: batches redone after a resume used
    # their examples again in the same epoch, and a second crash and resume a third time, while
    # the ledger charges a shuffled epoch as one Gaussian release (the ledger said 2 releases
    # where one example had been used 3 times). The batches charged past the checkpoint are
    # now skipped.
    model, opt, dl, engine = _shuffled(tmp_path)
    seen: list[int] = []
    batches = iter(dl)
    _train_on(model, opt, itertools.islice(batches, 2), seen)
    engine.save_checkpoint(tmp_path / "ck.pt")
    _train_on(model, opt, itertools.islice(batches, 4), seen)  # ... then a crash
    for more in (1, None):  # resumed twice from the one checkpoint: a crash, then the end
        model, opt, dl, engine = _shuffled(tmp_path)
        engine.load_checkpoint(tmp_path / "ck.pt")
        _train_on(model, opt, itertools.islice(dl, more), seen)
    uses = max(seen.count(i) for i in set(seen))
    assert uses == 1 and engine.ledger.steps == 8
    assert engine.ledger.mechanism_counts()[0].epochs == uses


def test_shuffled_batches_workers_drew_ahead_of_a_stopped_loop_are_not_dropped(tmp_path):
    # 8 batches per epoch. A loop that stops after each batch (here: twice per epoch over 8
    # loops) used to drop the batches the workers had drawn ahead: the permutation's epochs ran
    # ahead of the charged steps, and examples were used in more epochs than the accountant's
    # ceil(steps / 8) (with a crash and a resume from a checkpoint as well: 5 uses charged as 4).
    options = {"num_workers": 2, "prefetch_factor": 2}
    model, opt, dl, engine = _shuffled(tmp_path, **options)
    seen: list[int] = []
    for _ in range(12):
        _train_on(model, opt, itertools.islice(dl, 1), seen)
    engine.save_checkpoint(tmp_path / "ck.pt")
    _train_on(model, opt, itertools.islice(dl, 3), seen)  # ... then a crash
    model, opt, dl, engine = _shuffled(tmp_path, **options)
    engine.load_checkpoint(tmp_path / "ck.pt")
    for _ in range(5):
        _train_on(model, opt, itertools.islice(dl, 1), seen)
    epochs = engine.ledger.mechanism_counts()[0].epochs  # ceil(steps / 8)
    assert max(seen.count(i) for i in range(40)) <= epochs
    assert engine.ledger.steps == 20 and epochs == 3  # every loop got its batch


def test_a_shuffled_checkpoint_between_a_batch_and_its_step_keeps_the_batch(tmp_path):
    # `if i % k == 0: save_checkpoint()` at the top of the loop body: the batch in hand was
    # neither charged nor still with the sampler, so a resume skipped one batch too many and
    # the permutation ran ahead of the charged steps (an example used twice in 4 steps).
    model, opt, dl, engine = _shuffled(tmp_path)
    seen: list[int] = []
    it = iter(dl)
    _train_on(model, opt, itertools.islice(it, 1), seen)
    held = next(it)
    engine.save_checkpoint(tmp_path / "ck.pt")
    _train_on(model, opt, [held, next(it)], seen)  # ... then a crash
    del it
    model, opt, dl, engine = _shuffled(tmp_path)
    engine.load_checkpoint(tmp_path / "ck.pt")
    _train_on(model, opt, dl, seen)  # the rest of the epoch
    assert engine.ledger.steps == 8 and sorted(seen) == list(range(40))


def test_a_second_live_iteration_of_the_private_loader_supersedes_the_first(tmp_path):
    # With persistent workers both iterations share torch's one iterator: a batch came out of
    # both (used twice in one epoch). The older one now stops with a message.
    options = {"num_workers": 1, "prefetch_factor": 1, "persistent_workers": True}
    model, opt, dl, engine = _shuffled(tmp_path, **options)
    seen: list[int] = []
    a = iter(dl)
    _train_on(model, opt, [next(a)], seen)
    b = iter(dl)
    _train_on(model, opt, [next(b)], seen)
    with pytest.raises(ConfigError, match="superseded by a newer one"):
        next(a)
    del a, b
    _train_on(model, opt, dl, seen)
    assert sorted(seen) == list(range(40)) and engine.ledger.steps == 8


def test_a_checkpoint_whose_replayed_batches_the_permutation_never_handed_out_is_refused(
    tmp_path,
):
    model, opt, dl, engine = _shuffled(tmp_path)
    _train_on(model, opt, itertools.islice(dl, 2), [])
    engine.save_checkpoint(tmp_path / "ck.pt")
    state = torch.load(tmp_path / "ck.pt", weights_only=True)
    for bad in ([list(range(5))], [[0, 0, 1, 2, 3]], "batches"):
        state["sampler"]["replay"] = bad
        torch.save(state, tmp_path / "bad.pt")
        with pytest.raises(PrivacyError, match="sampler position does not fit"):
            engine.load_checkpoint(tmp_path / "bad.pt")


def test_a_checkpoint_without_the_shuffle_position_is_refused(tmp_path):
    _, _, _, engine = _shuffled(tmp_path)
    engine.save_checkpoint(tmp_path / "ck.pt")
    state = torch.load(tmp_path / "ck.pt", weights_only=True)
    del state["sampler"]
    torch.save(state, tmp_path / "old.pt")
    _, _, _, engine = _shuffled(tmp_path)
    with pytest.raises(PrivacyError, match="no sampler position"):
        engine.load_checkpoint(tmp_path / "old.pt")


def test_a_shuffled_epoch_cannot_change_its_noise_half_way(tmp_path):
    model, opt, dl, engine = _shuffled(tmp_path)
    _train_on(model, opt, itertools.islice(iter(dl), 3), [])
    engine.save_checkpoint(tmp_path / "mid.pt")
    ds = TensorDataset(torch.arange(40.0)[:, None])
    again = private(
        "dpsgd_f",
        torch.nn.Linear(1, 1),
        data_loader=DataLoader(ds, batch_size=5),
        sampler="shuffle",
        noise_multiplier=2.0,
        ledger_path=tmp_path / "run.jsonl",
    )[3]
    with pytest.raises(PrivacyError, match="middle of a shuffled epoch"):
        again.load_checkpoint(tmp_path / "mid.pt")
    assert any("SHUFFLE NEIGHBOURS" in c for c in again.privacy_report(1e-5).caveats)


def test_a_shuffled_loader_iterated_without_steps_keeps_bounded_state(tmp_path, monkeypatch):
    # It keeps each yielded batch's indices until a step takes it: a loop that never steps
    # (statistics over the private loader) would grow that list with every batch.
    from lazydp import loader as loader_mod

    monkeypatch.setattr(loader_mod, "_KEPT_INDICES_CAP", 20)  # four batches of five
    _, _, dl, _ = _shuffled(tmp_path)
    for _ in range(3):
        for _ in dl:
            pass
    assert dl._untracked and not dl._yielded  # (the kept batches are _yielded itself)


def test_extra_values_a_resume_could_not_read_back_are_refused_at_save(tmp_path):
    """Checkpoints load with weights_only: a numpy metric or a scheduler object in ``extra``
    was written without a word and the checkpoint then refused as corrupt at the resume; an
    Opacus-style ``module=model`` was refused as a pickled model."""
    import numpy as np

    model, opt, _, engine = private("dpsgd_f", ledger_path=tmp_path / "run.jsonl")
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    for extra in (dict(best=np.float64(0.5)), dict(scheduler=sched), dict(f=len)):
        with pytest.raises(ConfigError, match="weights_only"):
            engine.save_checkpoint(tmp_path / "bad.pt", **extra)
    for extra in (dict(module=model), dict(optimizer=opt)):
        with pytest.raises(ConfigError, match="holds the engine's model and optimizer"):
            engine.save_checkpoint(tmp_path / "bad.pt", **extra)
    assert not (tmp_path / "bad.pt").exists()
    engine.save_checkpoint(tmp_path / "ok.pt", epoch=3, best=0.5, scheduler=sched.state_dict())
    assert engine.load_checkpoint(tmp_path / "ok.pt")["epoch"] == 3


def test_a_loaded_buffer_is_checked_finite_a_chunk_at_a_time(monkeypatch):
    # The one-shot torch.isfinite(buffer).all() built a bool tensor of the buffer's size: a
    # quarter of a float32 velocity or momentum buffer, as large as its table, on top of the
    # model while a resume checked it (0.25x the tables at the worst moment to run out).
    from lazydp import _dispatch
    from lazydp.optim.resume import buffer_problem

    monkeypatch.setattr(_dispatch, "FINITE_CHUNK", 64)
    seen = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: seen.append(t.numel()) or isfinite(t))
    buf = torch.zeros(1000, 7)
    assert buffer_problem(buf, buf.shape) is None
    assert seen and max(seen) <= 64
    for where in (0, 500, 999):  # first, middle, last chunk
        bad = buf.clone()
        bad[where, 3] = float("nan")
        assert buffer_problem(bad, bad.shape) == "is not finite"
    assert buffer_problem(buf.t(), (7, 1000)) is None  # non-contiguous: slices, no copy
    bad = buf.clone()
    bad[999, 6] = float("inf")
    assert buffer_problem(bad.t(), (7, 1000)) == "is not finite"
    assert _dispatch.all_finite(torch.arange(10**3)) and _dispatch.all_finite(torch.tensor(1.0))
