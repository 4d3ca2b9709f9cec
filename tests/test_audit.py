"""The canary audit (lazydp/audit.py): every DP mode passes it, and planted bugs fail it.

The audit is a statistical test of the whole training path against the run's own claim, so a
pass alone would prove little; each planted bug below (noise too small, clipping too loose,
LazyDP's flush without noise, a sampler that takes more than q, an accountant that claims too
little epsilon) makes it fail. Seeds are fixed (auditor and noise), so these are deterministic;
the margins they pass and fail by are recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from lazydp.audit import canary_audit, response
from lazydp.audit_stats import audit_points, claimed_tradeoff, spec_findings
from lazydp.engine import PrivacyEngine
from lazydp.errors import ConfigError
from lazydp.planted import planted_bug

POISSON = dict(sample_rate=0.25, steps=16, noise_multiplier=1.0)


def _audit(mode: str, **kw):
    return canary_audit(mode, seed=1, noise_seed=2, **kw)


def _gdp_claim(mu: float) -> list[tuple[float, float]]:
    """(delta, epsilon) pairs of the mu-GDP Gaussian mechanism (Dong, Roth, Su), closed form."""

    def delta_of(eps: float) -> float:
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(
            -eps / mu - mu / 2
        )

    return [
        (d, optimize.brentq(lambda e, d=d: delta_of(e) - d, 0.0, 50.0))
        for d in np.logspace(-9, math.log10(0.3), 28)
    ]


# -- the statistics alone, on scores drawn from a Gaussian mechanism --------------------------
def test_the_tradeoff_curve_is_the_tightest_of_the_claimed_pairs():
    f = claimed_tradeoff([(1e-5, 1.0), (0.1, 0.2)])
    assert f(0.0) == pytest.approx(1 - 1e-5)
    # at alpha = 0.3 the (0.1, 0.2) pair binds: max(1 - 0.1 - e^0.2 * 0.3, e^-0.2 * 0.6)
    assert f(0.3) == pytest.approx(max(0.9 - math.exp(0.2) * 0.3, math.exp(-0.2) * 0.6))
    assert f(1.0) == 0.0
    assert claimed_tradeoff([(1e-5, math.inf)])(0.01) == 0.0  # an infinite epsilon claims nothing


def test_the_statistics_accept_a_true_claim_and_refute_a_false_one():
    rng = np.random.default_rng(0)
    absent, present = rng.standard_normal(10_000), 1.0 + rng.standard_normal(10_000)
    honest = audit_points(absent, present, _gdp_claim(1.0), confidence=0.999)
    assert not any(p.violates for p in honest)
    # The same scores against the claim of a mechanism with 25% more noise (mu 0.8): refuted.
    optimistic = audit_points(absent, present, _gdp_claim(0.8), confidence=0.999)
    assert any(p.violates for p in optimistic)


def test_the_bounds_hold_together_at_the_stated_confidence():
    # 200 honest audits of a mu=1 Gaussian mechanism at confidence 0.9: at most 10% may
    # (falsely) fail; with the Bonferroni split the true rate is far lower.
    rng = np.random.default_rng(1)
    claim = _gdp_claim(1.0)
    failures = sum(
        any(
            p.violates
            for p in audit_points(
                rng.standard_normal(2000), 1 + rng.standard_normal(2000), claim, 0.9
            )
        )
        for _ in range(200)
    )
    assert failures <= 20


# -- the real training path -----------------------------------------------------------------
MOMENTUM = dict(lr=0.5, momentum=0.9)
NESTEROV_DECAY = dict(lr=0.5, momentum=0.5, weight_decay=0.05, nesterov=True)


@pytest.mark.parametrize(
    "mode, layer, kw",
    [
        ("dpsgd_b", "embedding", {}),
        ("dpsgd_r", "embedding", {}),
        ("dpsgd_f", "embedding", {}),
        ("lazydp", "embedding", {}),
        ("lazydp", "embedding_bag", {}),
        ("dpsgd_f", "linear", {}),
        ("lazydp", "linear", {}),
        ("dpsgd_f", "embedding", MOMENTUM),
        ("lazydp", "embedding", MOMENTUM),
        ("lazydp", "embedding", dict(NESTEROV_DECAY, **POISSON)),
        ("lazydp", "embedding", dict(lr_gamma=0.7)),
        ("dpsgd_f", "embedding", dict(resume_at=2)),
        ("lazydp", "embedding", dict(resume_at=2)),
        ("lazydp", "embedding", dict(NESTEROV_DECAY, lr_gamma=0.9, resume_at=5, **POISSON)),
        ("dpsgd_f", "embedding", dict(loss_reduction="mean")),
        ("dpsgd_b", "mixed", {}),  # two layers per canary, one of them a bag reading it twice
        ("lazydp", "mixed", dict(loss_reduction="mean", **POISSON)),
        ("lazydp", "embedding_bag", dict(loss_reduction="mean", **POISSON)),
    ],
)
def test_every_dp_mode_passes_the_canary_audit(mode, layer, kw):
    r = _audit(mode, layer=layer, canaries=4000 if layer == "linear" else 20_000, **kw)
    assert not r.refuted, r.to_dict()["points"]
    assert r.findings == [] and r.passed
    assert 0 < r.epsilon_lower < r.epsilon
    # The scores are what the claim assumes: an absent canary's is N(0, 1) (the noise is the
    # stated size, not more), a present one's is shifted by q sum(a) / (sigma |a|).
    n_absent = r.canaries - r.present
    assert abs(r.score_mean_absent) < 4 / math.sqrt(n_absent)
    assert abs(r.score_std_absent - 1) < 4 / math.sqrt(2 * n_absent)
    spread = 1 + (r.sample_rate < 1)  # the number of times sampled adds to the spread
    assert abs(r.score_mean_present - r.expected_shift) < 4 * spread / math.sqrt(r.present)


def test_lazydp_with_poisson_batches_passes_the_canary_audit():
    # q < 1: present canaries' rows are read at random steps, so they are caught up over
    # pending runs of every length, and absent ones get all T steps at the final flush.
    r = _audit("lazydp", **POISSON)
    assert r.passed and r.steps == 16 and r.sample_rate == pytest.approx(0.25, rel=1e-3)
    assert abs(r.score_std_absent - 1) < 0.05


@pytest.mark.parametrize(
    "mode, kind, factor, kw",
    [
        ("dpsgd_f", "noise", 0.7, {}),
        ("lazydp", "noise", 0.7, {}),
        ("lazydp", "noise", 0.7, POISSON),
        ("dpsgd_f", "clip", 1.4, {}),
        ("lazydp", "clip", 1.4, {}),
        ("lazydp", "flush", None, {}),
        ("dpsgd_f", "sample", 2.0, POISSON),
        ("lazydp", "sample", 2.0, POISSON),
        ("lazydp", "catch_up", None, dict(lr_gamma=0.7)),
        ("lazydp", "velocity", None, MOMENTUM),
        ("lazydp", "momentum_noise", 0.7, MOMENTUM),
        ("lazydp", "epsilon", 0.5, {}),
        ("lazydp", "epsilon", 0.5, POISSON),
        ("dpsgd_f", "roll", None, {}),  # clip factors one example off: the sizes differ
        ("lazydp", "roll", None, {}),
        ("dpsgd_f", "clip", -2.0, {}),  # a sign flip: only the lower tail sees it
        ("lazydp", "clip", -2.0, {}),
    ],
)
def test_the_privacy_test_fails_a_planted_bug(mode, kind, factor, kw):
    with planted_bug(kind, factor):
        r = _audit(mode, **kw)
    assert r.refuted, f"the audit missed: {kind}={factor} {kw} (margin {r.margin:+.4f})"
    assert r.margin < 0 and not r.passed


@pytest.mark.parametrize(
    "mode, kind, factor, found",
    [
        ("dpsgd_f", "noise", 0.95, "noise is 0.9"),  # too small for the privacy test
        ("lazydp", "noise", 0.95, "noise is 0.9"),
        ("lazydp", "clip", -1.0, "present canaries moved -"),  # as private, but wrong
        ("dpsgd_f", "reuse", None, "correlated"),
        ("lazydp", "reuse", None, "correlated"),
    ],
)
def test_the_specification_test_fails_a_planted_bug(mode, kind, factor, found):
    with planted_bug(kind, factor):
        r = _audit(mode)
    assert any(found in f for f in r.findings), r.findings
    assert not r.passed


def test_the_specification_test_on_synthetic_releases():
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((10_000, 4))
    absent = rows @ np.full(4, 0.5)
    present = 1.0 + rng.standard_normal(10_000)
    assert spec_findings(absent, present, 1.0, rows, 0.999) == []
    assert "noise is 0.9" in spec_findings(0.95 * absent, present, 1.0, rows, 0.999)[0]
    assert "moved" in spec_findings(absent, present + 0.1, 1.0, rows, 0.999)[0]
    twins = rows.copy()
    twins[1::2] = 3.0 * twins[0::2]  # each odd row a scaled copy of the row before
    assert any(
        "5000 absent rows are scaled copies" in f
        for f in spec_findings(absent, present, 1.0, twins, 0.999)
    )
    mixed = rows.copy()
    mixed[:, 3] = 0.1 * mixed[:, 0] + mixed[:, 3]  # coordinates 0 and 3 share a little noise
    assert any("coordinates" in f for f in spec_findings(absent, present, 1.0, mixed, 0.999))


def test_the_audit_refuses_what_it_cannot_audit():
    with pytest.raises(ConfigError, match="no privacy claim"):
        canary_audit("sgd")
    with pytest.raises(ConfigError, match="too few"):
        canary_audit("lazydp", canaries=10)
    with pytest.raises(ConfigError, match="infinite"):
        canary_audit("lazydp", noise_multiplier=0.0)
    with pytest.raises(ConfigError, match="confidence"):
        canary_audit("lazydp", confidence=1.0)
    with pytest.raises(ConfigError, match="one-hot"):
        canary_audit("lazydp", layer="linear", canaries=50_000)
    with pytest.raises(ConfigError, match="lr must be"):
        canary_audit("lazydp", lr=-1.0)
    with pytest.raises(ConfigError, match="momentum must be"):
        canary_audit("lazydp", momentum=1.5)
    with pytest.raises(ConfigError, match="weight_decay must be"):
        canary_audit("lazydp", lr=2.0, weight_decay=0.5)
    with pytest.raises(ConfigError, match="resume_at must be"):
        canary_audit("lazydp", steps=4, resume_at=4)
    with pytest.raises(ConfigError, match="lr_gamma must be"):
        canary_audit("lazydp", lr_gamma=1.5)
    with pytest.raises(ConfigError, match="DistributedPrivacyEngine"):
        canary_audit("lazydp", layer="sharded_bag")
    with pytest.raises(ConfigError, match="unused PrivacyEngine"):
        canary_audit("lazydp", engine=object())
    with pytest.raises(ConfigError, match="layer"):
        canary_audit("lazydp", layer="conv")
    # noise_seed with an engine of another seed was recorded in the result, never used.
    with pytest.raises(ConfigError, match="draws its noise with its own seed"):
        canary_audit("lazydp", noise_seed=4, engine=PrivacyEngine())


def test_the_audit_records_the_seed_its_noise_was_drawn_with():
    seeded = canary_audit("lazydp", canaries=200, steps=1, engine=PrivacyEngine(seed=9))
    assert seeded.noise_seed == 9 and seeded.to_dict()["noise_seed"] == 9


# -- the command ----------------------------------------------------------------------------
def test_lazydp_audit_writes_its_report_and_fails_loudly_on_a_refuted_claim(
    tmp_path, capsys, monkeypatch
):
    from lazydp.cli import main

    # The command trains on OS-entropy noise unless --noise-seed is given: a correct run fails
    # one of its tests about 1 run in 1000 (spec test: 4 of 5000 simulated), and two runs below
    # must pass. A fixed noise seed makes them pass or fail for good.
    args = ["audit", "--canaries", "4000", "--seed", "3", "--noise-seed", "4", "--json"]
    assert main([*args, "--out", str(tmp_path / "ok")]) == 0
    out = capsys.readouterr().out
    assert "audit PASSED" in out
    first = json.loads(out.strip().splitlines()[-1])
    assert first["passed"] is True and (first["seed"], first["noise_seed"]) == (3, 4)
    # Both seeds given, the audit re-runs exactly (its scores, hence every bound).
    assert main([*args, "--out", str(tmp_path / "again")]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (again["score_mean_absent"], again["epsilon_lower"]) == (
        first["score_mean_absent"],
        first["epsilon_lower"],
    )
    for name in ("audit.json", "audit.csv", "audit.png"):
        assert (tmp_path / "ok" / name).stat().st_size > 0
    with planted_bug("noise", 0.3):  # a real bug: the audit exits 1 and says so
        assert main([*args, "--out", str(tmp_path / "bad")]) == 1
    captured = capsys.readouterr()
    assert "audit FAILED" in captured.out and "better than the run's claim" in captured.err
    assert "needs FNR >=" in captured.err and "does not match its specification" in captured.err
    assert "1-in-500 chance" in captured.err
    assert "--seed 3 --noise-seed 4 re-run it exactly" in captured.err
    assert json.loads((tmp_path / "bad" / "audit.json").read_text())["passed"] is False
    # --plant: the user asks for the bug to see the audit catch it (exit 0, named as planted)
    assert main([*args, "--plant", "flush", "--out", str(tmp_path / "plant")]) == 0
    out = capsys.readouterr().out
    assert "NOT private" in out and "the audit caught the planted bug flush" in out
    assert (tmp_path / "plant" / "audit_scores.csv").read_text().count("\n") == 4001
    saved = json.loads((tmp_path / "plant" / "audit.json").read_text())
    assert saved["planted"] == "flush" and saved["passed"] is False
    assert saved["settings"]["canaries"] == 4000 and saved["seed"] == 3
    # A plant too small to see is missed: the audit did not show what it was asked to (exit 1).
    assert main([*args, "--plant", "noise=0.999", "--out", str(tmp_path / "tiny")]) == 1
    captured = capsys.readouterr()
    assert "the audit MISSED" in captured.out and "missed the planted bug" in captured.err
    assert main([*args, "--plant", "noise", "--out", str(tmp_path / "p2")]) == 1
    assert "needs a factor" in capsys.readouterr().err
    assert main(["audit", "--mode", "sgd", "--out", str(tmp_path / "sgd")]) == 1
    assert "no privacy claim" in capsys.readouterr().err


def test_a_failed_audit_says_how_to_repeat_it():
    from types import SimpleNamespace

    from lazydp.cli.audit import _rerun_advice

    assert "--seed 3 --noise-seed 4 re-run it exactly" in _rerun_advice(
        SimpleNamespace(seed=3, noise_seed=4)
    )
    unseeded = _rerun_advice(SimpleNamespace(seed=3, noise_seed=None))
    assert "--seed 3 repeats its canaries" in unseeded and "OS entropy" in unseeded


@pytest.mark.parametrize(
    "momentum, weight_decay, nesterov",
    [(0, 0, False), (0.9, 0, False), (0, 0.3, False), (0.5, 0.2, True)],
)
def test_the_response_coefficients_are_torch_sgds(momentum, weight_decay, nesterov):
    # b_s against torch.optim.SGD itself (with a decaying lr): one scalar parameter, a unit
    # gradient at step s only.
    lrs = [0.7 * 0.8**t for t in range(5)]
    b = response(lrs, momentum, weight_decay, nesterov)
    for s in range(len(lrs)):
        w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.SGD(
            [w], lr=lrs[0], momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
        )
        for t, lr in enumerate(lrs):
            opt.param_groups[0]["lr"] = lr
            w.grad = torch.full_like(w, 1.0 if t == s else 0.0)
            opt.step()
        assert -float(w.detach()) == pytest.approx(b[s], rel=1e-12, abs=1e-12)


def test_rows_of_two_values_are_not_called_twins_by_chance():
    # float32 noise of d <= 2 repeats by chance among 10,000 rows (a birthday count): the
    # twin check starts at d = 3, where a chance repeat is ~1e-8.
    rng = np.random.default_rng(7)
    for d in (1, 2, 3):
        rows = rng.standard_normal((10_000, d)).astype(np.float32).astype(np.float64)
        absent = rows @ np.full(d, 1 / math.sqrt(d))
        present = 1.0 + rng.standard_normal(10_000)
        assert spec_findings(absent, present, 1.0, rows, 0.999) == [], d


def test_lazydp_audit_refuses_what_would_not_work_before_training(tmp_path, capsys):
    from lazydp.cli import main

    cases = [
        (["--plant", "velocity"], "--momentum > 0"),
        (["--plant", "flush", "--mode", "dpsgd_f"], "--mode lazydp"),
        (["--plant", "sample=2"], "--sample-rate < 1"),
        (["--plant", "noise=nan"], "must be finite"),
        (["--plant", "noise=-1"], ">= 0"),
        (["--nproc-per-node", "2", "--resume-at", "2"], "leave out --nproc-per-node"),
        (["--canaries", "50", "--nproc-per-node", "2"], "too few"),
        # checked only inside the audit, after "auditing ..." was printed
        (["--delta", "1"], "delta must be in (0, 1)"),
        (["--confidence", "2"], "confidence must be in [0.5, 1)"),
    ]
    for extra, said in cases:
        assert main(["audit", *extra, "--out", str(tmp_path / "x")]) == 1, extra
        out, err = capsys.readouterr()
        assert said in err and "Traceback" not in err, (extra, err)
        assert "auditing" not in out, (extra, out)
    assert not (tmp_path / "x").exists()  # nothing trained, nothing written


def test_the_epsilon_plant_keeps_the_accountant_keyword():
    engine = PrivacyEngine()
    with planted_bug("epsilon", 0.5):
        assert engine.get_epsilon(1e-5, accountant="rdp") == 0.0  # no steps yet: 0, no TypeError
