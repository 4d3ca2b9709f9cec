"""LazyDP with SGD's weight decay on the tables: exact against eager DP-SGD, variance, rebase,
resume, refusals. The decay of a row is deferred with its noise (optim/lazy.py, LrPrefix)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from lazydp import PrivacyError
from lazydp.optim import lazy as lazy_module
from lazydp.optim.lazy import LrPrefix
from lazydp.testing import constant_noise
from tests.test_lazy import build, snapshot, step, untouched_rows
from tests.toy import make_batches


def _train(mode, batches, weight_decay, wd_change_at=None, probe=None):
    model, opt, sched, engine = build(mode, weight_decay=weight_decay)
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


@pytest.mark.parametrize("wd_change_at", [None, 11])
def test_lazy_equals_eager_with_weight_decay(wd_change_at):
    """Constant noise, a decaying LR, rows read many times, once and never, evaluations in the
    middle: the flushed lazy tables equal eager DP-SGD's (SGD with weight decay) to float32."""
    batches = make_batches(30, seed=8)
    probe = make_batches(1, seed=98)[0]
    out = {}
    with constant_noise(0.7):
        for mode in ("dpsgd_f", "lazydp"):
            model, opt, _, evals = _train(mode, batches, 0.05, wd_change_at, probe)
            if mode == "lazydp":
                assert opt.pending_rows() > 0
                assert next(iter(opt.lazy.values())).prefix.decays
            out[mode] = (snapshot(model), evals)
    (eager, eager_evals), (lazy, lazy_evals) = out["dpsgd_f"], out["lazydp"]
    for k in eager:
        torch.testing.assert_close(lazy[k], eager[k], atol=2e-5, rtol=1e-5, msg=k)
    for a, b in zip(eager_evals, lazy_evals):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
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
