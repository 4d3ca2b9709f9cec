"""LazyDP: exact equivalence to eager DP-SGD, aggregated-noise variance, no stale reads, resume."""

from __future__ import annotations

import functools
import gc
import os
import re

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from lazydp import ConfigError, PrivacyEngine, PrivacyError, UnsupportedOptimizerError
from lazydp.clipping import clipper_for
from lazydp.noise import GaussianNoise
from lazydp.optim import lazy as lazy_module
from lazydp.optim import rows as rows_module
from lazydp.optim.lazy import LazyTable
from lazydp.testing import constant_noise, zero_noise
from tests.toy import Toy, dense_params, loader, loss_fn, make_batches, table_params


def build(
    mode: str,
    lr_fn=lambda s: 1.0 / (1 + 0.1 * s),
    seed: int = 1,
    ledger_path=None,
    padding: str = "emb",
    model: Toy | None = None,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    nesterov: bool = False,
):
    """``padding``: which tables have a padding_idx (row 0): "emb" (Toy's), "none" or "both".
    ``model``: a Toy to use instead of a fresh one (e.g. with a layer swapped).
    ``weight_decay``, ``momentum``, ``nesterov``: the tables' SGD settings."""
    torch.manual_seed(0)
    model = model or Toy()
    if padding == "none":
        model.emb.padding_idx = None
    if padding == "both":
        model.bag.padding_idx = 0
    dense = torch.optim.Adam(dense_params(model), lr=0.01)
    tables = torch.optim.SGD(
        table_params(model),
        lr=0.5,
        weight_decay=weight_decay,
        momentum=momentum,
        nesterov=nesterov,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(tables, lr_fn)
    engine = PrivacyEngine(seed=seed, ledger_path=ledger_path)
    model, opt, _ = engine.make_private(
        module=model,
        optimizer=[dense, tables],
        data_loader=loader(),
        noise_multiplier=1.3,
        max_grad_norm=0.7,
        mode=mode,
    )
    return model, opt, sched, engine


def step(model, opt, sched, batch):
    x, bag, emb, y = batch
    opt.zero_grad()
    loss_fn(model(x, bag, emb), y).backward()
    opt.step()
    sched.step()


def snapshot(model):
    return {k: t.detach().clone() for k, t in model.state_dict().items()}


@pytest.mark.parametrize(
    ("large_tables", "padding", "momentum"),
    [
        (False, "emb", 0),
        (True, "emb", 0),
        (True, "none", 0),
        (True, "both", 0),
        (False, "emb", 0.9),
    ],
)
def test_lazy_equals_eager_under_constant_noise_with_schedule_and_mid_eval(
    large_tables, padding, momentum, monkeypatch
):
    """``momentum``: the tables' SGD momentum (a velocity per row, caught up with the row; the
    steps where the table changed between forward and step take its update's slow path)."""
    reused, fresh = [], []
    if large_tables:  # the row-update path of big tables: sort-coalesce, reusing catch-up's sort
        monkeypatch.setattr(rows_module, "_LARGE_TABLE_ROWS", 1)
        coalesce = LazyTable.coalesce

        def spy(self, grad):
            out = coalesce(self, grad)
            reused.append(out.coalesced and out.indices is self.last_read.rows)
            return out

        monkeypatch.setattr(LazyTable, "coalesce", spy)
        update = LazyTable.update

        def spy_update(self, grad, alpha):
            w = self._written  # the catch-up's rows are still what the table holds
            fresh.append(
                w is not None
                and w[2] == self.weight._version
                and w[0] is self.last_read.rows
                and grad.indices is self.last_read.ids
            )
            return update(self, grad, alpha)

        monkeypatch.setattr(LazyTable, "update", spy_update)
    batches = make_batches(30, seed=5)
    probe = make_batches(1, seed=99)[0]
    results = {}
    with constant_noise(0.9):
        for mode in ["dpsgd_f", "lazydp"]:
            model, opt, sched, engine = build(mode, padding=padding, momentum=momentum)
            evals = []
            for i, b in enumerate(batches):
                if i in (12, 22):  # the tables change (by x1) between the forward and the step
                    x, bag, emb, y = b
                    opt.zero_grad()
                    loss_fn(model(x, bag, emb), y).backward()
                    with torch.no_grad():
                        for table in (model.bag, model.emb):
                            table.weight.mul_(1.0)
                    opt.step()
                    sched.step()
                else:
                    step(model, opt, sched, b)
                if i in (9, 20):  # an evaluation in the middle reads caught-up rows only
                    model.eval()
                    with torch.no_grad():
                        evals.append(model(*probe[:3]).clone())
                    model.train()
            if mode == "lazydp":
                assert opt.pending_rows() > 0  # rows never read still owe noise here
            results[mode] = (snapshot(model), evals)  # state_dict flushes lazily-noised rows
    (eager, eager_evals), (lazy, lazy_evals) = results["dpsgd_f"], results["lazydp"]
    for k in eager:
        torch.testing.assert_close(lazy[k], eager[k], atol=2e-5, rtol=1e-5, msg=k)
    for a, b in zip(eager_evals, lazy_evals):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    if large_tables:
        # Each table's update added into the rows its catch-up gathered (no coalesce, no
        # gather), also at step 0 (nothing owed yet) and after the evaluations (rows they read
        # were current: a zero draw), except where the table changed since the catch-up ...
        assert sum(fresh) == 2 * (len(batches) - 2)
        # ... and on those 2 steps its coalesce reused the catch-up's sort.
        assert sum(reused) == len(reused) == 4


def test_a_flush_in_several_chunks_equals_eager(monkeypatch):
    """Tables larger than one flush chunk (65,536 rows) flush chunk by chunk: with chunks of 7
    rows the Toy's 40-row tables take 6, and the flushed model still equals dpsgd_f's."""
    monkeypatch.setattr(lazy_module, "_FLUSH_ROWS", 7)
    batches = make_batches(8, seed=5)
    out = {}
    with constant_noise(0.9):
        for mode in ["dpsgd_f", "lazydp"]:
            model, opt, sched, engine = build(mode)
            for b in batches:
                step(model, opt, sched, b)
            engine.flush()
            out[mode] = snapshot(model)
    for k in out["dpsgd_f"]:
        torch.testing.assert_close(out["lazydp"][k], out["dpsgd_f"][k], atol=2e-5, rtol=1e-5, msg=k)


def test_export_without_explicit_flush_is_flushed(tmp_path):
    batches = make_batches(8, seed=2)
    with constant_noise(1.0):
        outs = {}
        for mode in ["dpsgd_f", "lazydp"]:
            model, opt, sched, engine = build(mode)
            for b in batches:
                step(model, opt, sched, b)
            path = engine.export(tmp_path / f"{mode}.pt")
            outs[mode] = torch.load(path, weights_only=True)
            if mode == "lazydp":
                assert opt.pending_rows() == 0
    for k in outs["dpsgd_f"]:
        torch.testing.assert_close(outs["lazydp"][k], outs["dpsgd_f"][k], atol=2e-5, rtol=1e-5)


def test_export_writes_the_tables_without_a_copy_and_the_same_bytes(tmp_path, monkeypatch):
    """model.pt is written from the tables themselves (a clone of each held a second copy of
    the model: a run sized for its tables was killed at its export), and is byte for byte the
    file a clone of every entry wrote -- a view or a tied entry still saved as its own copy."""
    from lazydp import engine as engine_module

    model, opt, sched, engine = build("lazydp")
    for b in make_batches(3, seed=2):
        step(model, opt, sched, b)
    model.register_buffer("tied", model.top.weight.detach())  # shares top.weight's storage
    model.register_buffer("window", torch.arange(10.0)[2:5])  # a view of a larger storage
    saved = {}
    save = engine_module.atomic_save
    monkeypatch.setattr(
        engine_module, "atomic_save", lambda obj, path, **kw: saved.update(obj) or save(obj, path)
    )
    new = engine.export(tmp_path / "model.pt")
    for name in ("bag", "emb"):
        assert saved[f"{name}.weight"].data_ptr() == getattr(model, name).weight.data_ptr()
    old = save({k: t.detach().clone() for k, t in model.state_dict().items()}, tmp_path / "o.pt")
    assert new.read_bytes() == old.read_bytes()
    loaded = torch.load(new, weights_only=True)
    assert loaded["tied"].data_ptr() != loaded["top.weight"].data_ptr()
    assert loaded["window"].untyped_storage().nbytes() == 3 * 4


def untouched_rows(lr_fn, steps: int, seed: int, read_at: tuple[int, ...] = (), **sgd):
    """Train a 5000-row table whose rows >= 12 are never trained on (SGD with ``sgd``
    settings); return those rows at the start and at the end (flushed), in float64.
    ``read_at``: steps before which an evaluation forward reads (so catches up) all of them:
    the law of the end values must not depend on it."""
    torch.manual_seed(0)
    model = nn.EmbeddingBag(5000, 8, mode="sum")
    opt = torch.optim.SGD(model.parameters(), lr=0.5, **sgd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_fn)
    engine = PrivacyEngine(seed=seed)
    ds = torch.utils.data.TensorDataset(torch.zeros(64, 2, dtype=torch.long))
    model, opt, _ = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=torch.utils.data.DataLoader(ds, batch_size=8),
        noise_multiplier=1.3,
        max_grad_norm=0.7,
        mode="lazydp",
    )
    init = model.weight.detach().clone()
    g = torch.Generator().manual_seed(7)
    for i in range(steps):
        if i in read_at:
            with torch.no_grad():
                model(torch.arange(12, 5000).view(-1, 1))
        opt.zero_grad()
        model(torch.randint(0, 12, (8, 2), generator=g)).sum().backward()
        opt.step()
        sched.step()
    engine.flush()
    return init[12:].double(), model.weight.detach()[12:].double()


def _untouched_noise(lr_fn, steps: int, seed: int):
    """The total noise on never-read rows (plain SGD)."""
    init, final = untouched_rows(lr_fn, steps, seed)
    return (final - init).flatten()


@pytest.mark.parametrize("schedule", ["constant", "decaying"])
def test_aggregated_noise_has_dp_sgd_variance(schedule):
    steps = 25
    lr_fn = (lambda s: 1.0) if schedule == "constant" else (lambda s: 0.9**s)
    sigma, clip, b_exp, lr0 = 1.3, 0.7, 8.0, 0.5
    lrs = [lr0 * lr_fn(s) for s in range(steps)]
    std = sigma * clip / b_exp * sum(lr * lr for lr in lrs) ** 0.5
    z = _untouched_noise(lr_fn, steps, seed=11)
    assert stats.kstest(z / std, "norm").pvalue > 1e-3
    assert stats.kstest(z / (0.8 * std), "norm").pvalue < 1e-6
    assert stats.kstest(z / (1.25 * std), "norm").pvalue < 1e-6


def test_training_step_touches_only_read_rows():
    model, opt, sched, engine = build("lazydp")
    step(model, opt, sched, make_batches(1)[0])
    table = opt.lazy[model.bag.weight]
    # After one step, every row owes exactly one step of noise: none was drawn for unread rows.
    assert int((table.history.applied == 0).sum()) == model.bag.weight.shape[0]
    assert table.history.applied.dtype == torch.int32  # compact: 4 bytes per row


@pytest.mark.parametrize(
    "sgd", [{}, {"weight_decay": 0.05}, {"momentum": 0.9, "nesterov": True}], ids=str
)
def test_resume_equals_uninterrupted_run(tmp_path, sgd):
    # Under constant noise: the history table, the lr prefix sums and the step count restore
    # (with weight decay the decay products with the sums; with momentum the rows' velocity
    # and the window). Real noise is re-keyed on resume (the test below).
    batches = make_batches(12, seed=4)
    make = functools.partial(build, **sgd)
    with constant_noise(0.5):
        model, opt, sched, engine = make("lazydp", ledger_path=tmp_path / "a.jsonl")
        for b in batches:
            step(model, opt, sched, b)
        full = snapshot(model)

        model, opt, sched, engine = make("lazydp", ledger_path=tmp_path / "b.jsonl")
        for b in batches[:6]:
            step(model, opt, sched, b)
        engine.save_checkpoint(tmp_path / "ck.pt", sched=sched.state_dict()["last_epoch"])
        assert opt.pending_rows() == 0  # a checkpoint owes no noise (the test below)

        model, opt, sched, engine = make("lazydp", ledger_path=tmp_path / "b.jsonl")
        extra = engine.load_checkpoint(tmp_path / "ck.pt")
        for _ in range(extra["sched"]):
            sched.step()
        for b in batches[6:]:
            step(model, opt, sched, b)
        resumed = snapshot(model)
    assert engine.ledger.steps == 12
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], atol=2e-5, rtol=1e-5, msg=k)


def _mappings_of(path) -> list[tuple[int, int]]:
    """This process's address ranges mapped from ``path`` (Linux)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == str(path):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("mode", ["lazydp", "dpsgd_f"])
def test_a_checkpoint_loads_from_its_file_pages_and_resumes_the_same(tmp_path, mode):
    """load_checkpoint reads the model's and the tables' state from a mapping of the file (read
    into memory whole, the checkpoint held a second copy of the model while it loaded), keeps
    no tensor mapped from it, and resumes exactly as the checkpoint read into memory did."""
    make = functools.partial(build, mode, momentum=0.9, ledger_path=tmp_path / "l.jsonl")
    model, opt, sched, engine = make()
    for b in make_batches(4, seed=3):
        step(model, opt, sched, b)
    path = engine.save_checkpoint(tmp_path / "ck.pt").resolve()
    mapped = []
    load = torch.nn.Module.load_state_dict

    def spy(module, state, *args, **kwargs):
        ranges = _mappings_of(path)
        mapped.extend(any(lo <= t.data_ptr() < hi for lo, hi in ranges) for t in state.values())
        return load(module, state, *args, **kwargs)

    loaded = []
    for mmap in (True, False):
        model, opt, sched, engine = make()
        real_load = torch.load
        with pytest.MonkeyPatch.context() as m:
            if mmap:
                m.setattr(torch.nn.Module, "load_state_dict", spy)
            else:  # the checkpoint read into memory whole, as before
                m.setattr(torch, "load", lambda *a, **kw: real_load(*a, **{**kw, "mmap": False}))
            engine.load_checkpoint(path)
        gc.collect()
        assert _mappings_of(path) == []  # nothing kept that maps the file
        loaded.append(
            [snapshot(model), opt.state_dict(), opt.lazy_state_dict(), engine.noise.state_dict()]
        )
    assert mapped and all(mapped)
    _assert_equal(loaded[0], loaded[1])


def _assert_equal(a, b, where="state"):
    """``a`` and ``b`` hold equal tensors (bit for bit) and values, through dicts and lists."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{k}]")
    else:
        assert a == b, where


def test_a_checkpoint_owes_no_noise_so_each_load_releases_the_same_model(tmp_path):
    """An unflushed checkpoint drew the noise of steps already charged afresh at every load:
    K loads and exports averaged that noise down by sqrt(K) (never-read rows converge to their
    noiseless values), and a roll-back released the same steps' noise twice, uncharged."""
    model, opt, sched, engine = build("lazydp", seed=None, ledger_path=tmp_path / "l.jsonl")
    for b in make_batches(5, seed=2):
        step(model, opt, sched, b)
    assert opt.pending_rows() > 0  # never-read rows owe five steps of noise here
    engine.save_checkpoint(tmp_path / "ck.pt")
    assert opt.pending_rows() == 0
    exports = []
    for k in range(3):  # unseeded: every draw would be fresh OS entropy
        engine.load_checkpoint(tmp_path / "ck.pt")
        engine.export(tmp_path / f"m{k}.pt")
        exports.append(torch.load(tmp_path / f"m{k}.pt", weights_only=True))
    for k, t in exports[0].items():
        assert all(torch.equal(e[k], t) for e in exports[1:]), k
    assert engine.ledger.steps == 5


def _past_checkpoint_then_resumed(tmp_path) -> tuple[dict, dict]:
    """A seeded run checkpointed after step 4 goes on to step 6 (steps 5-6 charged, their
    noise drawn); then resumed from the checkpoint with that ledger (copied), it redoes steps
    5-6 on the same batches. Returns (the first run's model, the resumed run's model)."""
    tmp_path.mkdir()
    batches = make_batches(6, seed=4)
    model, opt, sched, engine = build("lazydp", ledger_path=tmp_path / "a.jsonl")
    for b in batches[:4]:
        step(model, opt, sched, b)
    engine.save_checkpoint(tmp_path / "ck.pt")
    for b in batches[4:]:
        step(model, opt, sched, b)
    first = snapshot(model)
    (tmp_path / "b.jsonl").write_bytes((tmp_path / "a.jsonl").read_bytes())
    model, opt, sched, engine = build("lazydp", ledger_path=tmp_path / "b.jsonl")
    engine.load_checkpoint(tmp_path / "ck.pt")
    for _ in range(4):
        sched.step()
    for b in batches[4:]:
        step(model, opt, sched, b)
    assert engine.ledger.steps == 8  # the redone steps are paid again
    return first, snapshot(model)


def test_a_resumed_seeded_run_never_replays_the_noise_of_the_steps_it_redoes(tmp_path):
    """DP invariant 5: no noise stream reused across restarts. Restored as saved, a seeded
    run's streams redrew the very noise of the steps it redoes -- on other gradients when its
    batches differ (another sampler seed, a roll-back to an older checkpoint), so two released
    models differed by noiseless gradients. Re-keyed from the charged step count, the redone
    steps draw other noise, and the same resume is still reproducible."""
    with zero_noise():  # the control: without noise, the redone steps are the same steps
        first, resumed = _past_checkpoint_then_resumed(tmp_path / "zero")
        for k in first:
            torch.testing.assert_close(resumed[k], first[k], atol=1e-6, rtol=1e-6, msg=k)
    first, resumed = _past_checkpoint_then_resumed(tmp_path / "one")
    for k in ("bag.weight", "emb.weight", "fc1.weight"):
        assert float((resumed[k] - first[k]).abs().max()) > 1e-3, k  # other noise
    _, again = _past_checkpoint_then_resumed(tmp_path / "two")
    for k in resumed:
        torch.testing.assert_close(again[k], resumed[k], atol=0, rtol=0, msg=k)


def _two_runs_on_one_ledger(tmp_path, mode: str) -> tuple[dict, dict]:
    """Two seeded runs from scratch (no checkpoint) on the same batches, the second on the
    ledger the first charged (a restart after a crash before the first checkpoint, or another
    run on that ledger). Returns both models."""
    batches = make_batches(3, seed=5)
    models = []
    for _ in range(2):
        model, opt, sched, engine = build(mode, ledger_path=tmp_path / "l.jsonl")
        for b in batches:
            step(model, opt, sched, b)
        models.append(snapshot(model))
    assert engine.ledger.steps == 6  # the second run is charged as fresh noise
    return models[0], models[1]


@pytest.mark.parametrize("mode", ["dpsgd_f", "lazydp"])
def test_a_seeded_run_on_a_charged_ledger_does_not_redraw_the_first_runs_noise(tmp_path, mode):
    """DP invariant 5 across restarts without a checkpoint: both runs started on stream 0,
    so the second redrew the first run's noise on its steps while the ledger charged them as
    fresh noise -- on other data or settings the two models differ by noiseless gradients."""
    with zero_noise():  # the control: without noise the two runs are the same run
        first, second = _two_runs_on_one_ledger(tmp_path / "zero", mode)
        for k in first:
            torch.testing.assert_close(second[k], first[k], atol=1e-6, rtol=1e-6, msg=k)
    (tmp_path / "one").mkdir()
    first, second = _two_runs_on_one_ledger(tmp_path / "one", mode)
    for k in ("bag.weight", "emb.weight", "fc1.weight"):
        assert float((second[k] - first[k]).abs().max()) > 1e-3, k  # other noise


class SignSGD(torch.optim.SGD):
    """An SGD subclass with its own update: each parameter moves by lr * sign(gradient)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


@pytest.mark.parametrize(
    ("make_opt", "named"),
    [
        (
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1),
            "SGD with dampening=0.1 (momentum=0.9).",
        ),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, maximize=True), "SGD with maximize=True."),
        (lambda ps: torch.optim.Adam(ps, lr=0.1), "Adam."),
        (lambda ps: torch.optim.Adagrad(ps, lr=0.1), "Adagrad."),
        (lambda ps: SignSGD(ps, lr=0.1), "SignSGD, a subclass of SGD with its own step()."),
        (
            lambda ps: torch.optim.SGD(ps[-1:], lr=0.1),  # the tables are in no optimizer
            "none (the table is in none of the optimizers passed to make_private).",
        ),
    ],
)
def test_inexact_optimizers_on_lazy_tables_are_refused(make_opt, named):
    model = Toy()
    # Named with the one setting that is not deferred, if any (not a dict of SGD's options).
    match = f"exact for SGD .*; its optimizer is {re.escape(named)} Adaptive"
    with pytest.raises(UnsupportedOptimizerError, match=match):
        PrivacyEngine().make_private(
            module=model,
            optimizer=make_opt(list(model.parameters())),
            data_loader=loader(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            mode="lazydp",
        )


@pytest.mark.parametrize("subclass", [SignSGD, type("PlainSubclass", (torch.optim.SGD,), {})])
def test_tables_on_an_sgd_subclass_follow_its_step(subclass):
    # The tables' SGD update is applied by lazydp itself (streamed, or deferred), never by the
    # optimizer's step: a subclass with its own step had it silently replaced by plain SGD's.
    # Such tables now take the dense path in dpsgd_f (and lazydp refuses them, above); a
    # subclass that keeps SGD's step is still streamed / deferred.
    torch.manual_seed(0)
    model = Toy()
    before = model.bag.weight.detach().clone()
    opt_tables = subclass(table_params(model), lr=0.5)
    _, opt, _ = PrivacyEngine(seed=0).make_private(
        module=model, optimizer=[torch.optim.SGD(dense_params(model), lr=0.1), opt_tables],
        data_loader=loader(), noise_multiplier=1.0, max_grad_norm=1e6, mode="dpsgd_f",
    )  # fmt: skip
    x, bag, emb, y = make_batches(1, seed=1)[0]
    with zero_noise():
        opt.zero_grad()
        loss_fn(model(x, bag, emb), y).backward()
        opt.step()
    moved = (model.bag.weight.detach() - before).abs()
    moved = moved[moved > 0]
    assert moved.numel() > 0
    assert bool(((moved - 0.5).abs() < 1e-6).all()) == (subclass is SignSGD)


def test_sparse_tables_are_supported():
    torch.manual_seed(0)
    model = nn.EmbeddingBag(20, 3, mode="mean", sparse=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine(seed=0)
    ds = torch.utils.data.TensorDataset(torch.randint(0, 20, (32, 4)))
    model, opt, dl = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=torch.utils.data.DataLoader(ds, batch_size=4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        mode="lazydp",
    )
    for (ids,) in dl:
        opt.zero_grad()
        model(ids).sum().backward()
        opt.step()
    assert opt.pending_rows() == 0  # the epoch end flushed everything
    assert torch.isfinite(model.weight).all()


def test_add_rows_matches_index_add_on_large_tables():
    from lazydp.optim.rows import add_rows_

    g = torch.Generator().manual_seed(0)
    w = torch.randn(300_000, 4, generator=g)
    rows = torch.randint(0, 300_000, (5000,), generator=g)
    rows[:100] = rows[100:200]  # duplicates add up
    vals = torch.randn(5000, 4, generator=g)
    ref = w.clone().index_add_(0, rows, vals, alpha=-0.3)
    add_rows_(w, rows, vals, -0.3)
    torch.testing.assert_close(w, ref)
    u = torch.unique(rows)
    ref.index_add_(0, u, vals[: u.numel()], alpha=2.0)
    add_rows_(w, u, vals[: u.numel()], 2.0, unique=True)
    torch.testing.assert_close(w, ref)


def test_corrupt_noise_pool_state_in_a_checkpoint_is_refused_before_any_lazy_change(tmp_path):
    model, opt, sched, engine = build("lazydp", ledger_path=tmp_path / "a.jsonl")
    for b in make_batches(3, seed=1):
        step(model, opt, sched, b)
    engine.save_checkpoint(tmp_path / "ck.pt")
    state = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert state["lazy"]["pool"]["pos"] > 0  # the catch-up drew from the pool
    state["lazy"]["pool"]["pos"] = -5
    torch.save(state, tmp_path / "bad.pt")
    steps = opt.steps_done
    with pytest.raises(PrivacyError, match="noise-pool state"):
        engine.load_checkpoint(tmp_path / "bad.pt")
    assert opt.steps_done == steps and engine.ledger.steps == 3


@pytest.mark.parametrize("repeats", [False, True])
def test_update_into_the_caught_up_rows_equals_a_plain_row_update(repeats, monkeypatch):
    """The update's fast path (add into the rows the catch-up wrote) against add_rows_."""
    from lazydp.clipping._base import SparseRows
    from lazydp.optim.lazy import LrPrefix

    gen = torch.Generator().manual_seed(3)
    weight = torch.nn.Parameter(torch.randn(5000, 8, generator=gen))
    prefix = LrPrefix()
    prefix.append(0.1)
    table = LazyTable(weight, prefix, GaussianNoise(seed=1), noise_std=0.5)
    ids = torch.randperm(5000, generator=gen)[:300]
    if repeats:
        ids = torch.cat([ids, ids[:40]])
    values = torch.randn(ids.numel(), 8, generator=gen)
    with zero_noise():
        table.catch_up(ids, 1)  # writes every distinct row: all were one step behind
    want = weight.detach().clone()
    rows_module.add_rows_(want, ids, values, alpha=-0.3)
    monkeypatch.setattr(LazyTable, "coalesce", lambda *a: pytest.fail("took the slow path"))
    table.update(SparseRows(ids, values, 5000), alpha=-0.3)
    torch.testing.assert_close(weight.detach(), want)
    assert (table.history.applied[ids] == 1).all()


@pytest.mark.parametrize("padding", ["none", "both"])
def test_deferred_block_is_settled_before_every_other_read(padding, tmp_path, monkeypatch):
    """A training forward reads its caught-up rows from the block and leaves the table write to
    the update. Whatever comes instead of the update -- a state_dict, a second call of the same
    table, a checkpoint load, an evaluation -- must see exactly what the always-write path sees."""
    from lazydp.clipping.embedding import EmbeddingClipper
    from lazydp.clipping.embedding_bag import EmbeddingBagClipper

    batches = make_batches(10, seed=8)
    probe = make_batches(1, seed=98)[0]
    runs = {}
    used: dict[str, list[bool]] = {"EmbeddingBag": [], "Embedding": []}
    originals = {c: c.__dict__["reads_block"] for c in (EmbeddingBagClipper, EmbeddingClipper)}
    for defer in (True, False):
        for clipper, reads_block in originals.items():

            def spy(self, module, *args, defer=defer, reads_block=reads_block):
                ok = defer and reads_block(self, module, *args)
                used[type(module).__name__].append(ok)
                return ok

            monkeypatch.setattr(clipper, "reads_block", spy)
        with constant_noise(0.9):
            path = tmp_path / f"{defer}.jsonl"
            model, opt, sched, engine = build("lazydp", ledger_path=path, padding=padding)
            out = []
            for b in batches[:4]:
                step(model, opt, sched, b)
            engine.save_checkpoint(tmp_path / f"{defer}.pt")
            x, bag, emb, y = batches[4]
            model(x, bag, emb)  # deferred block, then no step: the state_dict settles it
            out.append(snapshot(model))
            # Two reads of each table before one step: the second catch-up settles the first's
            # block (the first forward's gradient is not used: one forward per step).
            opt.zero_grad()
            model(x, bag, emb)
            loss_fn(model(x, bag, emb), y).backward()
            opt.step()
            sched.step()
            model(*batches[5][:3])  # deferred block, then an evaluation reads the same rows
            model.eval()
            with torch.no_grad():
                out.append(model(*batches[5][:3]).clone())
                out.append(model(*probe[:3]).clone())
            model.train()
            step(model, opt, sched, batches[5])
            model(*batches[6][:3])  # deferred block, then a checkpoint (it must hold the block)
            engine.save_checkpoint(tmp_path / f"{defer}-mid.pt")
            engine.load_checkpoint(tmp_path / f"{defer}.pt")  # replaces the table's values
            for b in batches[4:]:
                step(model, opt, sched, b)
            out.append(snapshot(model))  # flushed: a step first, so that rows are behind again
            step(model, opt, sched, batches[9])
            model(*batches[7][:3])  # deferred block, then a checkpoint load replaces everything
            engine.load_checkpoint(tmp_path / f"{defer}-mid.pt")
            for b in batches[6:]:
                step(model, opt, sched, b)
            out.append(snapshot(model))
        runs[defer] = out
    for kind in used:  # both layer kinds deferred when allowed, and never when not
        assert any(used[kind]) and not all(used[kind]), kind
    for a, b in zip(runs[True], runs[False]):
        if isinstance(a, dict):
            for k in a:
                torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6, msg=k)
        else:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def refused_uncharged(model, opt, engine, match, kept=False):
    """The next step (a fresh batch's backward, then step()) raises ConfigError ``match``
    without charging; ``kept``: and without changing any parameter."""
    x, bag, emb, y = make_batches(1, seed=3)[0]
    loss_fn(model(x, bag, emb), y).backward()  # (its reads caught rows up: that is not a step)
    before = {k: t.detach().clone() for k, t in model.named_parameters()}
    charged = engine.ledger.steps
    with pytest.raises(ConfigError, match=match):
        opt.step()
    assert engine.ledger.steps == charged
    for k, t in model.named_parameters() if kept else ():
        assert torch.equal(t.detach(), before[k]), k


@pytest.mark.parametrize(
    ("key", "bad", "match"),
    [
        ("lr", float("nan"), "learning rate"),
        ("lr", float("inf"), "learning rate"),
        ("lr", -0.1, "learning rate"),
        ("weight_decay", float("nan"), "weight_decay"),
        ("weight_decay", -0.1, "weight_decay"),
        # lr * wd >= 1 would zero or flip every row each step (lr is ~0.5 here)
        ("weight_decay", 2.5, "weight_decay"),
    ],
)
def test_a_bad_table_lr_or_decay_is_refused_before_anything_changes(key, bad, match):
    model, opt, sched, engine = build("lazydp", weight_decay=0.01)
    step(model, opt, sched, make_batches(1)[0])
    opt.param_groups[-1][key] = bad  # the tables' SGD group
    refused_uncharged(model, opt, engine, match, kept=True)


def test_a_step_past_what_the_history_tables_count_is_refused_before_its_charge():
    # They count steps in int32: step 2**31 was taken, and the next forward's catch-up died
    # with torch's "value cannot be converted to type int without overflow". The run is moved
    # to its last countable step (every row caught up there) instead of running 2**31 steps.
    model, opt, sched, engine = build("lazydp")
    last = 2**31 - 1
    opt.steps_done = last
    for prefix in opt._prefixes.values():
        prefix.steps = last
        prefix.rebase()
    for table in opt.lazy.values():
        table.history.applied.fill_(last)
    x, bag, emb, y = make_batches(1)[0]
    loss_fn(model(x, bag, emb), y).backward()  # its catch-up at step 2**31 - 1 still counts
    before = {k: t.detach().clone() for k, t in model.named_parameters()}
    with pytest.raises(ConfigError, match="int32"):
        opt.step()
    assert engine.ledger.steps == 0 and opt.steps_done == last
    for k, t in model.named_parameters():
        assert torch.equal(t.detach(), before[k]), k


@pytest.mark.parametrize("mode", ["dpsgd_b", "dpsgd_r", "dpsgd_f"])
@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_a_bad_table_lr_is_refused_before_anything_changes_in_the_eager_modes(mode, bad):
    # Their table pass scales the noise by lr: a schedule gone negative (1 - s here) once
    # applied the clipped rows with no noise at all, charged; inf failed after the charge.
    model, opt, sched, engine = build(mode, lr_fn=lambda s: 1.0 - s)
    step(model, opt, sched, make_batches(1)[0])
    sched.step()
    assert opt.param_groups[-1]["lr"] < 0  # the schedule itself went negative
    opt.param_groups[-1]["lr"] = bad
    refused_uncharged(model, opt, engine, "learning rate .* finite and >= 0", kept=True)


@pytest.mark.parametrize("key", ["weight_decay", "momentum"])
def test_a_nan_weight_decay_or_momentum_is_refused_before_the_charge(key):
    # torch takes NaN there; the step was charged and the weights became NaN.
    model, opt, sched, engine = build("dpsgd_f")
    step(model, opt, sched, make_batches(1)[0])
    opt.param_groups[-1][key] = float("nan")  # the tables' SGD group
    refused_uncharged(model, opt, engine, f"{key} nan of parameter group 0 of the SGD")
    assert all(bool(torch.isfinite(t).all()) for t in model.parameters())


@pytest.mark.parametrize("mode", ["dpsgd_b", "dpsgd_f", "lazydp"])
@pytest.mark.parametrize("nan", [float("nan"), np.float32("nan")])  # numpy's: no float subclass
def test_a_nan_lr_on_the_dense_layers_is_refused_before_the_charge(mode, nan):
    # Noise is on the gradient there, so nothing leaks; but the step was charged and turned
    # the layers into NaN, which only the next step noticed.
    model, opt, sched, engine = build(mode)
    step(model, opt, sched, make_batches(1)[0])
    opt.param_groups[0]["lr"] = nan
    refused_uncharged(
        model, opt, engine, "learning rate nan of parameter group 0 of the Adam optimizer"
    )
    assert all(bool(torch.isfinite(t).all()) for t in model.parameters())


def _read_from_block(module, args, kwargs):
    """What LazyDP's deferred read computes: the layer's output from the gathered block alone."""
    from lazydp.row_groups import RowGroups

    clipper, memo = clipper_for(module), {}
    ids = clipper.rows_read(module, args, kwargs, memo)
    assert clipper.reads_block(module, args, kwargs, memo)
    groups = RowGroups(ids, module.num_embeddings)
    block = module.weight.detach().index_select(0, groups.rows)
    return clipper.forward_from_block(module, args, kwargs, block, groups.positions(), memo)


@pytest.mark.parametrize("padding_idx", [None, 0, 3])
@pytest.mark.parametrize(
    ("mode", "form"),  # torch takes per_sample_weights with mode="sum" only
    [(m, f) for m in ("sum", "mean") for f in ("2d", "offsets", "last_offset")]
    + [("sum", "weights")],
)
def test_a_bag_read_from_the_block_equals_the_layer(padding_idx, mode, form):
    """Exact equality with torch's own forward, padding entries (dropped, and left out of a
    "mean" bag's length) and empty bags included."""
    gen = torch.Generator().manual_seed(4)
    bag = nn.EmbeddingBag(
        9, 3, mode=mode, padding_idx=padding_idx, include_last_offset=form == "last_offset"
    )
    with torch.no_grad():
        bag.weight.normal_(generator=gen)  # the padding row too: it must not be read
    ids = torch.randint(0, 6, (5, 4), generator=gen)
    ids[1] = 3  # a bag of padding only, where padding_idx=3
    args, kwargs = (ids,), {}
    if form != "2d":
        offsets = torch.tensor([0, 4, 4, 9, 13])  # an empty bag, uneven bags
        if form == "last_offset":
            offsets = torch.cat([offsets, torch.tensor([20])])
        args = (ids.reshape(-1), offsets)
        if form == "weights":
            kwargs = {"per_sample_weights": torch.rand(20, generator=gen)}
    torch.testing.assert_close(
        _read_from_block(bag, args, kwargs), bag(*args, **kwargs), atol=0, rtol=0
    )


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("form", ["2d", "offsets", "last_offset"])
def test_one_row_bags_read_from_the_block_equal_the_layer(mode, form):
    """Pooling 1 (every bag one row, repeats across bags) takes a plain row gather."""
    gen = torch.Generator().manual_seed(5)
    bag = nn.EmbeddingBag(9, 3, mode=mode, include_last_offset=form == "last_offset")
    ids = torch.tensor([4, 0, 4, 8, 2, 4, 0])
    args: tuple = (ids[:, None],)
    if form != "2d":
        offsets = torch.arange(ids.numel() + (form == "last_offset"))
        args = (ids, offsets)
    with torch.no_grad():
        bag.weight.normal_(generator=gen)
    torch.testing.assert_close(_read_from_block(bag, args, {}), bag(*args), atol=0, rtol=0)


@pytest.mark.parametrize("padding_idx", [None, 0, 3])
def test_an_embedding_read_from_the_block_equals_the_layer(padding_idx):
    """The padding row is read as the table holds it (here non-zero), never from the block."""
    gen = torch.Generator().manual_seed(5)
    emb = nn.Embedding(9, 3, padding_idx=padding_idx)
    with torch.no_grad():
        emb.weight.normal_(generator=gen)
    ids = torch.randint(0, 6, (5, 4), generator=gen)
    torch.testing.assert_close(_read_from_block(emb, (ids,), {}), emb(ids), atol=0, rtol=0)


def test_a_model_state_loaded_mid_run_is_what_the_model_holds_then(tmp_path):
    """model.load_state_dict(snapshot) mid-run (a roll-back to the best model so far): under
    eager DP-SGD the model then holds the snapshot; LazyDP used to add the replaced rows'
    deferred noise on top of the loaded values at the next read."""
    batches = make_batches(6)
    with constant_noise(0.37):
        finals = {}
        for mode in ("dpsgd_f", "lazydp"):
            model, opt, sched, _ = build(mode)
            for batch in batches[:2]:
                step(model, opt, sched, batch)
            saved = snapshot(model)
            for batch in batches[2:4]:
                step(model, opt, sched, batch)
            model.load_state_dict(saved)
            for k, t in snapshot(model).items():
                assert torch.equal(t, saved[k]), (mode, k)
            for batch in batches[4:]:
                step(model, opt, sched, batch)
            finals[mode] = snapshot(model)
    for k, t in finals["dpsgd_f"].items():
        torch.testing.assert_close(finals["lazydp"][k], t, rtol=1e-5, atol=1e-6)


class _WeightedBag(nn.Module):
    """An EmbeddingBag whose per_sample_weights come from a trained layer (so they require grad)."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(5, 3, mode="sum", padding_idx=4)
        self.w = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        weights = torch.sigmoid(self.w(x)).squeeze(1)
        return self.bag(ids, offsets, per_sample_weights=weights[: ids.numel()]).sum(1)


@pytest.mark.parametrize("between", ["eval", "state_dict", "flush"])
@pytest.mark.parametrize("ids", [[4, 4], []], ids=["all_padding", "no_ids"])
def test_a_weighted_bag_call_reading_no_row_survives_a_table_write_before_backward(
    tmp_path, between, ids
):
    """A training call of an EmbeddingBag with per_sample_weights requiring grad that reads no
    row (every id padding, or no id) ran on the table itself, which autograd then saved; a
    catch-up or flush between that forward and its backward (a no_grad evaluation,
    state_dict(), engine.flush()) writes the table, and torch refused the backward ('modified
    by an inplace operation') that dpsgd_f runs. Both modes must now give the same weights."""
    x = torch.randn(2, 2, generator=torch.Generator().manual_seed(3))
    batch = (x, torch.tensor(ids, dtype=torch.long), torch.tensor([0, min(1, len(ids))]))
    finals = {}
    for mode in ("dpsgd_f", "lazydp"):
        torch.manual_seed(0)
        model = _WeightedBag()
        opts = [
            torch.optim.SGD(model.w.parameters(), lr=0.1),
            torch.optim.SGD([model.bag.weight], lr=0.5),
        ]
        engine = PrivacyEngine(seed=1, ledger_path=tmp_path / f"{mode}.jsonl")
        data = torch.utils.data.TensorDataset(torch.zeros(64, 1))
        model, opt, _ = engine.make_private(
            module=model,
            optimizer=opts,
            data_loader=torch.utils.data.DataLoader(data, batch_size=8),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            mode=mode,
        )
        with constant_noise(0.37):
            for _ in range(3):
                opt.zero_grad()
                out = model(*batch)
                if between == "eval":
                    with torch.no_grad():
                        model(x, torch.tensor([0, 1]), torch.tensor([0, 1]))
                elif between == "state_dict":
                    model.state_dict()
                else:
                    engine.flush()
                out.sum().backward()
                opt.step()
            finals[mode] = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in finals["dpsgd_f"].items():
        torch.testing.assert_close(finals["lazydp"][k], v, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ["dpsgd_f", "lazydp"])
@pytest.mark.parametrize(("group", "key"), [(0, "lr"), (-1, "lr"), (-1, "weight_decay")])
def test_a_setting_beyond_the_parameters_dtype_is_refused_before_the_charge(mode, group, key):
    # 1e300 is finite as a Python float, but torch cannot convert it to the float32 it
    # updates with: it raised deep inside the step, after the step was charged.
    model, opt, sched, engine = build(mode)
    step(model, opt, sched, make_batches(1)[0])
    opt.param_groups[group][key] = 1e300
    # (a LazyDP table's weight_decay is refused by its own rule first: lr * wd < 1)
    refused_uncharged(model, opt, engine, "representable in the parameters' dtype|below 1 / lr")


@pytest.mark.parametrize("mode", ["dpsgd_f", "lazydp"])
def test_an_lr_beyond_float16_is_refused_before_the_charge_on_a_float16_model(mode):
    # 1e5 fits float32 but not float16 (65504): only settings beyond float32 were refused, so
    # torch raised "value cannot be converted to type c10::Half" after the step was charged.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 1)).to(torch.float16)
    x, y = torch.randn(8, 4, dtype=torch.float16), torch.randn(8, 1, dtype=torch.float16)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    engine = PrivacyEngine()
    model, opt, data = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=data,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        mode=mode,
    )
    opt.param_groups[0]["lr"] = 1e5
    xb, yb = next(iter(data))
    ((model(xb).float() - yb.float()) ** 2).mean().backward()
    with pytest.raises(ConfigError, match="representable in the parameters' dtype"):
        opt.step()
    assert engine.ledger.steps == 0
