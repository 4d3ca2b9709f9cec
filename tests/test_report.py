"""The privacy report states exactly the ledger's composed guarantee."""

from __future__ import annotations

from pathlib import Path

import pytest

from lazydp.accounting import MechanismCount, compute_epsilon
from lazydp.ledger import PrivacyLedger, StepEvent
from lazydp.optim.dp_optimizer import PrivacyParams
from lazydp.report import PrivacyReport, build_report


def test_external_cost_adds_to_epsilon_and_delta():
    ledger = PrivacyLedger()
    for t in range(50):
        ledger.charge(StepEvent(t, 0.01, 1.2, 1.0, "lazydp", "poisson"))
    ledger.charge_external("vocabulary", epsilon=0.5, delta=2e-5)  # delta larger than requested
    params = PrivacyParams(1.2, 1.0, 0.01, 100.0, "lazydp", "poisson")
    report = build_report(ledger, 1e-5, params, seeded=False, override=None)
    training = compute_epsilon([MechanismCount(0.01, 1.2, 50)], 1e-5)
    assert report.epsilon == pytest.approx(training + 0.5)
    assert report.delta == pytest.approx(3e-5)  # never silently stated at the requested 1e-5
    assert report.epsilon == pytest.approx(ledger.epsilon(1e-5))


def test_step_counts_read_as_sentences_and_sgd_says_its_ledger_is_empty():
    ledger = PrivacyLedger()
    ledger.charge(StepEvent(0, 0.01, 1.2, 1.0, "lazydp", "poisson"))
    params = PrivacyParams(1.2, 1.0, 0.01, 100.0, "lazydp", "poisson")
    text = str(build_report(ledger, 1e-5, params, seeded=False, override=None))
    assert ", 1 step," in text and "1 steps" not in text
    # sgd charges nothing: its "0 steps" read as if training had not run.
    text = str(build_report(PrivacyLedger(), 1e-5, None, seeded=False, override=None))
    assert "no steps in the privacy ledger (sgd is not private)" in text
    assert "0 steps" not in text


def test_the_help_and_readme_show_the_report_as_printed():
    """`lazydp train --help` and the README quote the default run's privacy lines verbatim."""
    from lazydp.cli.train import EPILOG

    report = PrivacyReport(
        delta=1e-5,
        epsilon=2.999,
        epsilon_rdp=3.29,
        steps=440,
        mode="lazydp",
        sampler="poisson",
        noise_multiplier=1.55859375,
        max_grad_norm=4.0,
        sample_rate=0.045411709923833386,
    )
    head, settings = str(report).splitlines()
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert f"\n{head}\n{settings}\n" in readme
    assert f"  {head}\n  {settings.split(', sample rate')[0]}, ...\n" in EPILOG
