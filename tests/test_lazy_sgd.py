"""LazyDP with SGD's weight decay and momentum on the tables: exact against eager DP-SGD,
variance, rebase, resume, refusals. A row's decay (optim/lazy.py, LrPrefix) and its velocity
(optim/lazy_momentum.py) are deferred with its noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from lazydp import ConfigError, PrivacyError
from lazydp.optim import lazy as lazy_module
from lazydp.optim import lazy_momentum
from lazydp.optim.lazy import LrPrefix
from lazydp.testing import constant_noise
from tests.test_lazy import build, refused_uncharged, snapshot, step, untouched_rows
from tests.toy import make_batches


def _train(mode, batches, weight_decay, wd_change_at=None, probe=None, **sgd):
    model, opt, sched, engine = build(mode, weight_decay=weight_decay, **sgd)
    evals = []
    for i, b in enumerate(batches):
        if i == wd_change_at:  # a decay schedule: the group's value is read every step
            opt.param_groups[-1]["weight_decay"] = weight_decay / 3
        step(model, opt, sched, b)
        if probe is not None and i in (7, 19):
            model.eval()
            with torch.no_grad():
                evals.append(model(*probe[:3]).clone())
            model.train()
    return model, opt, engine, evals


def _lazy_equals_eager(batches, weight_decay, wd_change_at=None, atol=2e-5, **sgd):
    """Train dpsgd_f and lazydp under constant noise with evaluations in the middle; assert
    equal evaluations and flushed parameters. Returns lazydp's parameters, optimizer, and
    (rows owing noise, its first table's prefix base) before the final flush."""
    probe = make_batches(1, seed=98)[0]
    out = {}
    with constant_noise(0.7):
        for mode in ("dpsgd_f", "lazydp"):
            model, opt, _, evals = _train(mode, batches, weight_decay, wd_change_at, probe, **sgd)
            if mode == "lazydp":
                before = (opt.pending_rows(), next(iter(opt.lazy.values())).prefix.base)
            out[mode] = (snapshot(model), evals, opt)  # state_dict flushes
    (eager, eager_evals, eager_opt), (lazy, lazy_evals, lazy_opt) = out["dpsgd_f"], out["lazydp"]
    for k in eager:
        torch.testing.assert_close(lazy[k], eager[k], atol=atol, rtol=1e-5, msg=k)
    if sgd.get("momentum"):  # the velocities too, padding rows included (0 in both)
        for table, q in zip(lazy_opt.lazy.values(), eager_opt.tables, strict=True):
            buffer = eager_opt.originals[-1].state[q]["momentum_buffer"]
            torch.testing.assert_close(table.velocity, buffer, atol=atol, rtol=1e-5)
    for a, b in zip(eager_evals, lazy_evals):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)
    return lazy, lazy_opt, before


@pytest.mark.parametrize("wd_change_at", [None, 11])
def test_lazy_equals_eager_with_weight_decay(wd_change_at):
    """Constant noise, a decaying LR, rows read many times, once and never, evaluations in the
    middle: the flushed lazy tables equal eager DP-SGD's (SGD with weight decay) to float32."""
    batches = make_batches(30, seed=8)
    lazy, opt, (pending, _) = _lazy_equals_eager(batches, 0.05, wd_change_at)
    assert pending > 0
    assert next(iter(opt.lazy.values())).prefix.decays
    # The decay did act: rows never read shrank, and differ from a run without it.
    with constant_noise(0.7):
        plain = snapshot(_train("lazydp", batches, 0.0)[0])
    assert not torch.allclose(plain["bag.weight"], lazy["bag.weight"], atol=1e-3)


def test_rebased_prefixes_stay_exact(monkeypatch):
    """A prefix whose decay product falls below REBASE_BELOW flushes its tables and restarts;
    with the threshold raised it happens every few steps, and the result is unchanged."""
    batches = make_batches(24, seed=9)
    with constant_noise(0.7):
        eager = snapshot(_train("dpsgd_f", batches, 0.05)[0])
        monkeypatch.setattr(lazy_module, "REBASE_BELOW", 0.8)
        model, opt, _, _ = _train("lazydp", batches, 0.05)
        prefix = next(iter(opt.lazy.values())).prefix
        assert prefix.base > 0  # it did rebase
        lazy = snapshot(model)
    for k in eager:
        torch.testing.assert_close(lazy[k], eager[k], atol=2e-5, rtol=1e-5, msg=k)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_a_full_flush_drops_the_lr_sums_before_it(tmp_path, weight_decay):
    """A prefix kept the sums of every step the run ever took (40 bytes a step: gigabytes over
    a long run, all written into every checkpoint). Every full flush (an epoch's end) restarts
    it now, and the run is the same as one never flushed."""
    batches = make_batches(20, seed=5)
    with constant_noise(0.6):
        plain = snapshot(_train("lazydp", batches, weight_decay)[0])
        model, opt, sched, engine = build("lazydp", weight_decay=weight_decay)
        for i, b in enumerate(batches):
            step(model, opt, sched, b)
            if i % 6 == 5:
                engine.flush()  # what the private loader does at each epoch's end
        prefix = next(iter(opt.lazy.values())).prefix
        assert prefix.base == 18 and prefix.state_dict()["s2"].numel() == 3
        engine.save_checkpoint(tmp_path / "ck.pt")
        saved = torch.load(tmp_path / "ck.pt", weights_only=True)["lazy"]["prefixes"]
        assert [s["s2"].numel() for s in saved] == [1]  # not one entry per step of the run
        flushed = snapshot(model)
    for k in plain:
        torch.testing.assert_close(flushed[k], plain[k], atol=2e-5, rtol=1e-5, msg=k)


def test_a_checkpoint_loaded_under_inference_mode_trains_on(tmp_path):
    """The state it made (LazyDP's lr sums, Adam's moments) were inference tensors: the next
    step raised torch's 'Inplace update to inference tensor outside InferenceMode' after that
    step was charged."""
    batches = make_batches(6, seed=4)
    ledger = tmp_path / "ledger.jsonl"
    with constant_noise(0.6):
        model, opt, sched, engine = build("lazydp", ledger_path=ledger, weight_decay=0.05)
        for b in batches[:3]:
            step(model, opt, sched, b)
        engine.save_checkpoint(tmp_path / "ck.pt")
        runs = []
        for inference in (False, True):
            model, opt, sched, engine = build("lazydp", ledger_path=ledger, weight_decay=0.05)
            with torch.inference_mode(inference):
                engine.load_checkpoint(tmp_path / "ck.pt")
            for b in batches[3:]:
                step(model, opt, sched, b)
            runs.append(snapshot(model))
    for k in runs[0]:
        torch.testing.assert_close(runs[1][k], runs[0][k], msg=k)


def test_lr_sums_kept_from_step_0_by_an_older_checkpoint_still_load():
    prefix = LrPrefix()
    for lr in (0.2, 0.4):
        prefix.append(lr, 0.1)
    prefix.rebase()
    for lr in (0.3, 0.1, 0.5):
        prefix.append(lr, 0.1)
    state = prefix.state_dict()
    assert state["offset"] == 2 and state["s2"].numel() == 4
    # As lazydp wrote them before: every array from step 0, its entries before the rebase unused.
    old = {
        k: torch.cat([torch.full((2,), 0.0 if k.endswith("_lo") else 7.0).double(), v])
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    } | {"base": 2}
    applied = torch.tensor([2, 3, 5])
    for loaded_state in (state, old):
        loaded = LrPrefix()
        loaded.load_state_dict(loaded_state)
        assert loaded.steps == 5 and loaded.base == 2
        for got, want in zip(loaded.pending(applied, 5), prefix.pending(applied, 5)):
            assert got.tolist() == want.tolist()


@pytest.mark.parametrize("schedule", ["constant", "decaying"])
def test_untouched_rows_decay_and_get_the_dp_sgd_variance(schedule):
    """W_T = prod f_s W_0 + sum_s lr_s (prod_{r>s} f_r) n_s: the decayed start plus ONE
    Gaussian of that variance (KS accepts it and rejects 0.8x and 1.25x sigma)."""
    steps, wd = 25, 0.08
    lr_fn = (lambda s: 1.0) if schedule == "constant" else (lambda s: 0.9**s)
    lrs = [0.5 * lr_fn(s) for s in range(steps)]
    fs = [1 - lr * wd for lr in lrs]
    var = sum(lr**2 * math.prod(fs[s + 1 :]) ** 2 for s, lr in enumerate(lrs))
    std = 1.3 * 0.7 / 8.0 * math.sqrt(var)
    init, final = untouched_rows(lr_fn, steps, seed=12, weight_decay=wd)
    z = (final - math.prod(fs) * init).flatten()
    assert stats.kstest(z / std, "norm").pvalue > 1e-3
    assert stats.kstest(z / (0.8 * std), "norm").pvalue < 1e-6
    assert stats.kstest(z / (1.25 * std), "norm").pvalue < 1e-6
    # The decay is part of it: the same rows measured against an undecayed start are rejected.
    assert stats.kstest((final - init).flatten() / std, "norm").pvalue < 1e-6


def test_prefix_without_decay_keeps_the_plain_sums_and_old_states_load():
    prefix = LrPrefix()
    for lr in (0.1, 0.3, 0.2):
        prefix.append(lr)
    assert not prefix.decays
    s1, s2, decay = prefix.pending(torch.tensor([0, 2]), 3)
    assert decay is None
    assert s1.tolist() == pytest.approx([0.6, 0.2], rel=1e-15)
    assert s2.tolist() == pytest.approx([0.14, 0.04], rel=1e-15)
    old = {k: v for k, v in prefix.state_dict().items() if k in ("s1", "s2")}  # pre-decay format
    loaded = LrPrefix()
    loaded.load_state_dict(old)
    assert loaded.steps == 3 and not loaded.decays
    assert loaded.pending(torch.tensor([0]), 3)[1].tolist() == s2[:1].tolist()
    loaded.append(0.5, 0.1)  # decay from here on: factors and sums continue exactly
    _, s2, decay = loaded.pending(torch.tensor([3, 4]), 4)
    assert decay.tolist() == [0.95, 1.0]  # exactly 1 for a row already at the step
    assert s2.tolist() == pytest.approx([0.25, 0.0], rel=1e-15)


def test_a_decay_factor_of_exactly_zero_is_refused_and_any_above_is_kept():
    # lr * wd == 1 zeroes every row (f = 0) and the prefix product P with it: the sums divide
    # by P, so the next catch-up would add inf noise to a step already charged.
    prefix = LrPrefix()
    with pytest.raises(ConfigError, match="weight_decay"):
        prefix.append(0.5, 2.0)
    assert prefix.steps == 0
    prefix.append(0.5, 1.5)  # f = 0.25: a strong decay, still exact
    _, s2, decay = prefix.pending(torch.tensor([0]), 1)
    assert decay.tolist() == [0.25] and s2.tolist() == pytest.approx([0.25], rel=1e-15)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-4])
def test_small_late_steps_keep_their_noise_after_a_long_run(weight_decay):
    # In one float64, S2[t] - S2[a] dropped every step with lr^2 below ~1e-16 * S2[t]: after
    # 10k steps at lr 1, five steps at lr 1e-7 got exactly 0 variance (gradient applied in full).
    prefix = LrPrefix()
    for _ in range(10_000):
        prefix.append(1.0, weight_decay)
    late = [1e-7, 3e-8, 1e-6, 2e-9, 5e-8]
    for lr in late:
        prefix.append(lr, weight_decay)
    t = prefix.steps
    applied = torch.tensor([t - 5, t - 3, t - 1, t])
    _, s2, _ = prefix.pending(applied, t, sum_lr=False)
    # P changes by < 1e-12 over these steps at lr * wd <= 1e-10: the plain sums are exact here.
    want = [math.fsum(lr * lr for lr in late[k:]) for k in (0, 2, 4)] + [0.0]
    assert s2.tolist() == pytest.approx(want, rel=1e-9, abs=0.0)
    # A resume keeps the low-order parts: the same windows after a round trip.
    loaded = LrPrefix()
    loaded.load_state_dict(prefix.state_dict())
    assert loaded.pending(applied, t, sum_lr=False)[1].tolist() == s2.tolist()


def test_compensated_sums_match_exact_window_sums_on_random_schedules():
    rng = np.random.default_rng(3)
    # Large steps first, then lr from 1e-11 to 7e-3: late windows are tiny against S2[t].
    lrs = np.concatenate([rng.uniform(0.5, 2, 2000), np.exp(rng.uniform(-25, -5, 1000))])
    prefix = LrPrefix()
    for lr in lrs:
        prefix.append(float(lr))
    starts = torch.from_numpy(rng.integers(1500, len(lrs), size=200))
    for t in (len(lrs), len(lrs) - 7):
        a = starts.clamp(max=t)
        s1, s2, _ = prefix.pending(a, t)
        want2 = [math.fsum(float(x) ** 2 for x in lrs[k:t]) for k in a.tolist()]
        want1 = [math.fsum(float(x) for x in lrs[k:t]) for k in a.tolist()]
        assert s2.tolist() == pytest.approx(want2, rel=1e-13, abs=0.0)
        assert s1.tolist() == pytest.approx(want1, rel=1e-13, abs=0.0)


def test_a_rebased_run_resumes_and_a_corrupt_decay_state_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(lazy_module, "REBASE_BELOW", 0.95)  # rebases every few steps
    batches = make_batches(16, seed=6)
    with constant_noise(0.5):
        model, opt, sched, engine = build("lazydp", weight_decay=0.05, ledger_path=tmp_path / "a")
        for b in batches:
            step(model, opt, sched, b)
        full = snapshot(model)
        model, opt, sched, engine = build("lazydp", weight_decay=0.05, ledger_path=tmp_path / "b")
        for b in batches[:9]:
            step(model, opt, sched, b)
        assert next(iter(opt.lazy.values())).prefix.base > 0
        path = engine.save_checkpoint(tmp_path / "ck.pt", sched=sched.state_dict()["last_epoch"])
        model, opt, sched, engine = build("lazydp", weight_decay=0.05, ledger_path=tmp_path / "b")
        extra = engine.load_checkpoint(path)
        for _ in range(extra["sched"]):
            sched.step()
        for b in batches[9:]:
            step(model, opt, sched, b)
        resumed = snapshot(model)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], atol=2e-5, rtol=1e-5, msg=k)
    state = torch.load(path, weights_only=True)
    prefix = dict(state["lazy"]["prefixes"][0])
    prefix["p"] = -prefix["p"]
    state["lazy"]["prefixes"][0] = prefix
    torch.save(state, tmp_path / "bad.pt")
    model, opt, sched, engine = build("lazydp", weight_decay=0.05, ledger_path=tmp_path / "b")
    with pytest.raises(PrivacyError, match="decay products"):
        engine.load_checkpoint(tmp_path / "bad.pt")
    prefix = dict(state["lazy"]["prefixes"][0])  # a low-order part that is no rounding error
    prefix["p"], prefix["s2_lo"] = -prefix["p"], prefix["s2_lo"] - 1e-3
    state["lazy"]["prefixes"][0] = prefix
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(PrivacyError, match="s2_lo"):
        engine.load_checkpoint(tmp_path / "bad.pt")


@pytest.mark.parametrize(
    ("momentum", "nesterov", "weight_decay", "window"),
    [(0.9, False, 0.0, None), (0.8, True, 0.05, None), (0.9, False, 0.02, 3)],
)
def test_lazy_equals_eager_with_momentum(momentum, nesterov, weight_decay, window, monkeypatch):
    """A row and its velocity caught up together (one joint Gaussian): equal to eager DP-SGD
    with torch's momentum buffer, under constant noise, a decaying LR and evaluations in the
    middle. ``window``: a momentum window capped at 3 steps (a full flush every few steps)."""
    if window is not None:
        monkeypatch.setattr(lazy_momentum, "MAX_WINDOW", window)
    batches = make_batches(30, seed=8)
    _, opt, (pending, base) = _lazy_equals_eager(
        batches, weight_decay, atol=5e-5, momentum=momentum, nesterov=nesterov
    )
    assert isinstance(next(iter(opt.lazy.values())).prefix, lazy_momentum.MomentumPrefix)
    assert (base > 0) == (window is not None)
    assert pending > 0 or window is not None  # a capped window flushes


def _momentum_variance(lrs, mu, wd, nesterov):
    """(Phi11, Sigma11) of W over the steps, by the 2x2 recursion written out independently."""
    phi, sigma = np.eye(2), np.zeros((2, 2))
    for lr in lrs:
        if nesterov:
            a = np.array([[1 - lr * (1 + mu) * wd, -lr * mu * mu], [wd, mu]])
            b = np.array([-lr * (1 + mu), 1.0])
        else:
            a, b = np.array([[1 - lr * wd, -lr * mu], [wd, mu]]), np.array([-lr, 1.0])
        phi, sigma = a @ phi, a @ sigma @ a.T + np.outer(b, b)
    return phi[0, 0], sigma[0, 0]


@pytest.mark.parametrize(("nesterov", "read_at"), [(False, ()), (True, ()), (False, (7, 13))])
def test_untouched_rows_with_momentum_get_the_dp_sgd_variance(nesterov, read_at):
    """Never-trained rows end at Phi11 W_0 plus one Gaussian of variance s^2 Sigma11 (their
    velocity starts at 0); KS accepts it and rejects 0.8x and 1.25x sigma. ``read_at``: rows
    caught up twice on the way, so their velocity's own noise (the joint Gaussian's second
    factor) carries into the end values: the law must be the same."""
    steps, mu, wd = 20, 0.9, 0.05
    lr_fn = lambda s: 0.95**s  # noqa: E731
    lrs = [0.5 * lr_fn(s) for s in range(steps)]
    phi11, var = _momentum_variance(lrs, mu, wd, nesterov)
    std = 1.3 * 0.7 / 8.0 * math.sqrt(var)
    init, final = untouched_rows(
        lr_fn, steps, seed=13, read_at=read_at, weight_decay=wd, momentum=mu, nesterov=nesterov
    )
    z = (final - phi11 * init).flatten()
    assert stats.kstest(z / std, "norm").pvalue > 1e-3
    assert stats.kstest(z / (0.8 * std), "norm").pvalue < 1e-6
    assert stats.kstest(z / (1.25 * std), "norm").pvalue < 1e-6
    # Without the velocity's share the variance is far smaller: that model is rejected.
    _, plain = _momentum_variance(lrs, 0.0, wd, False)
    assert stats.kstest(z / (1.3 * 0.7 / 8.0 * math.sqrt(plain)), "norm").pvalue < 1e-6


def test_momentum_switched_on_or_off_mid_run_is_refused():
    for start, later in ((0.0, 0.9), (0.9, 0.0)):
        model, opt, sched, engine = build("lazydp", momentum=start)
        step(model, opt, sched, make_batches(1)[0])
        opt.param_groups[-1]["momentum"] = later
        refused_uncharged(model, opt, engine, "momentum")


@pytest.mark.parametrize("damage", ["phi", "velocity", "kind"])
def test_a_damaged_momentum_state_is_refused_before_anything_loads(tmp_path, damage):
    model, opt, sched, engine = build("lazydp", momentum=0.9, ledger_path=tmp_path / "l")
    for b in make_batches(3):
        step(model, opt, sched, b)
    path = engine.save_checkpoint(tmp_path / "ck.pt")
    state = torch.load(path, weights_only=True)
    if damage == "phi":
        state["lazy"]["prefixes"][0]["phi"] = state["lazy"]["prefixes"][0]["phi"][:-1]
    elif damage == "velocity":
        del state["lazy"]["tables"][0]["velocity"]
    else:
        state["lazy"]["prefixes"][0] = {
            "s1": torch.zeros(4).double(),
            "s2": torch.zeros(4).double(),
        }
    torch.save(state, tmp_path / "bad.pt")
    model, opt, sched, engine = build("lazydp", momentum=0.9, ledger_path=tmp_path / "l")
    before = snapshot(model)
    with pytest.raises(PrivacyError, match="momentum prefix|velocity"):
        engine.load_checkpoint(tmp_path / "bad.pt")
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("mode", ["dpsgd_b", "dpsgd_f"])
def test_eager_modes_stream_momentum_tables_in_torchs_own_buffer(mode):
    """No table-sized gradient: the tables' velocity is torch's momentum buffer, updated in
    place by the streaming pass (so optimizer.state_dict() carries it)."""
    model, opt, sched, engine = build(mode, momentum=0.9)
    for b in make_batches(3):
        step(model, opt, sched, b)
    tables = opt.originals[-1]
    for weight in (model.bag.weight, model.emb.weight):
        assert weight.grad is None
        buffer = tables.state[weight]["momentum_buffer"]
        assert buffer.shape == weight.shape and bool(buffer.abs().sum() > 0)
    assert "momentum_buffer" in str(tables.state_dict()["state"][0].keys())


@pytest.mark.parametrize("damage", ["shape", "nan"])
def test_a_damaged_momentum_buffer_in_a_checkpoint_is_refused(tmp_path, damage):
    """dpsgd_f keeps the tables' velocity in torch's momentum buffer: a wrong one would fail
    inside the next step, after the charge, so loading refuses it."""
    model, opt, sched, engine = build("dpsgd_f", momentum=0.9, ledger_path=tmp_path / "l")
    for b in make_batches(2):
        step(model, opt, sched, b)
    path = engine.save_checkpoint(tmp_path / "ck.pt")
    state = torch.load(path, weights_only=True)
    buffers = state["optimizer"]["optimizers"][-1]["state"][0]
    buffers["momentum_buffer"] = (
        buffers["momentum_buffer"][:-1]
        if damage == "shape"
        else buffers["momentum_buffer"] * float("nan")
    )
    torch.save(state, tmp_path / "bad.pt")
    model, opt, sched, engine = build("dpsgd_f", momentum=0.9, ledger_path=tmp_path / "l")
    with pytest.raises(PrivacyError, match="momentum_buffer"):
        engine.load_checkpoint(tmp_path / "bad.pt")


def test_a_momentum_too_small_for_the_rows_dtype_is_refused_before_the_charge(tmp_path):
    # The velocity holds each step's gradient scaled by 1 / momentum: at 1e-40 that overflowed
    # float32 inside the update, after the step was charged (and every retry charged again).
    model, opt, sched, engine = build("lazydp", momentum=1e-40, ledger_path=tmp_path / "l")
    before = snapshot(model)
    for _ in range(2):
        with pytest.raises(ConfigError, match="too small"):
            step(model, opt, sched, make_batches(1, seed=2)[0])
    assert engine.ledger.steps == 0
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    build("lazydp", momentum=1e-3)  # an ordinary small momentum is accepted


def test_the_optimizers_state_is_the_loaded_one_after_a_resume(tmp_path):
    """optimizer.state after load_checkpoint is the loaded state, not the one from before: a
    view cached at make_private went stale and kept the old momentum buffers (as large as the
    tables) alive for the rest of the run."""
    model, opt, sched, engine = build("dpsgd_f", momentum=0.9, ledger_path=tmp_path / "l")
    for b in make_batches(2):
        step(model, opt, sched, b)
    path = engine.save_checkpoint(tmp_path / "ck.pt")
    old = [v for s in opt.state.values() for v in s.values()]  # held: their ids stay unique
    engine.load_checkpoint(path)
    assert opt.state is opt.originals[0].state
    new = [v for s in opt.state.values() for v in s.values()]
    assert old and new and not {id(v) for v in old} & {id(v) for v in new}


def test_a_checkpoint_writes_the_rows_velocity_without_a_copy(tmp_path, monkeypatch):
    """save_checkpoint hands torch.save each table's live velocity (a clone held a second
    table's worth of memory while the checkpoint was written), and resumes the same."""
    from lazydp import engine as engine_module

    model, opt, sched, engine = build("lazydp", momentum=0.9, ledger_path=tmp_path / "l")
    for b in make_batches(3):
        step(model, opt, sched, b)
    saved = {}
    save = engine_module.atomic_save
    monkeypatch.setattr(
        engine_module, "atomic_save", lambda obj, path, **kw: saved.update(obj) or save(obj, path)
    )
    path = engine.save_checkpoint(tmp_path / "ck.pt")
    tables = list(opt.lazy.values())
    for table, state in zip(tables, saved["lazy"]["tables"]):
        assert state["velocity"].data_ptr() == table.velocity.data_ptr()
    velocities = [t.velocity.clone() for t in tables]
    model, opt, sched, engine = build("lazydp", momentum=0.9, ledger_path=tmp_path / "l")
    engine.load_checkpoint(path)
    for table, v in zip(opt.lazy.values(), velocities):
        assert bool(v.abs().sum() > 0) and torch.equal(table.velocity, v)
