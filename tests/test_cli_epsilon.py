"""`lazydp epsilon` through the real dispatcher: text output, --json, calibration, errors."""

from __future__ import annotations

import json

import pytest

from lazydp.accounting import MechanismCount, compute_epsilon
from lazydp.cli import main

GOLDEN = ["epsilon", "--sample-rate", "0.04", "--noise-multiplier", "1.5", "--steps", "2250",
          "--delta", "1e-5"]  # fmt: skip


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_epsilon_text(capsys):
    code, out, _ = run(capsys, GOLDEN)
    assert code == 0
    assert "epsilon 6.769 (PLD), 7.329 (RDP) at delta 1e-05" in out
    assert "2250 steps (90 epochs)" in out


def test_epsilon_json_last_line(capsys):
    code, out, _ = run(capsys, GOLDEN + ["--json"])
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert round(result["epsilon_rdp"], 4) == 7.3293
    assert result["epsilon_pld"] == pytest.approx(6.77, abs=0.02)
    assert result["steps"] == 2250 and result["noise_multiplier"] == 1.5


def test_an_infinite_epsilon_is_null_in_the_json_line(capsys):
    # Python wrote ``Infinity``, which is no JSON: strict parsers (JavaScript, Go) refused the line.
    argv = ["epsilon", "--sample-rate", "0.1", "--noise-multiplier", "0", "--steps", "10",
            "--delta", "1e-5", "--json"]  # fmt: skip
    code, out, _ = run(capsys, argv)
    assert code == 0 and "epsilon inf (PLD)" in out
    result = json.loads(out.strip().splitlines()[-1], parse_constant=pytest.fail)
    assert result["epsilon_pld"] is None and result["epsilon_rdp"] is None


def test_calibration_with_epochs(capsys):
    argv = ["epsilon", "--target-epsilon", "3", "--sample-rate", "0.04", "--epochs", "90",
            "--delta", "1e-5", "--json"]  # fmt: skip
    code, out, _ = run(capsys, argv)
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result["steps"] == 2250  # ceil(90 / 0.04) without floating-point creep
    sigma = result["noise_multiplier"]
    assert result["epsilon_pld"] <= 3.0
    assert compute_epsilon([MechanismCount(0.04, sigma, 2250)], 1e-5) == result["epsilon_pld"]
    assert f"noise_multiplier {sigma!r} reaches epsilon" in out


def test_the_printed_calibrated_noise_multiplier_stays_within_the_target(capsys):
    # Printed to 4 digits, 1.35546875 read 1.355, and --noise-multiplier 1.355 gives epsilon
    # 5.0026 > 5: the number a user copies must be the one that meets the target.
    argv = ["epsilon", "--target-epsilon", "5", "--sample-rate", "0.04", "--steps", "1000",
            "--delta", "1e-5"]  # fmt: skip
    code, out, _ = run(capsys, argv)
    assert code == 0
    printed = float(out.split("noise_multiplier ", 1)[1].split()[0])
    assert compute_epsilon([MechanismCount(0.04, printed, 1000)], 1e-5) <= 5.0


def test_shuffle_shows_both_figures(capsys):
    code, out, _ = run(capsys, GOLDEN + ["--sampler", "shuffle", "--json"])
    result = json.loads(out.strip().splitlines()[-1])
    assert result["epsilon_pld"] > 40  # 90 unamplified Gaussian releases
    assert result["epsilon_pld_as_if_poisson"] == pytest.approx(6.77, abs=0.02)
    assert "no amplification" in out


@pytest.mark.parametrize(
    "flag,value,named",
    [("--delta", "2", "--delta"), ("--sample-rate", "0", "--sample-rate"),
     ("--steps", "0", "--steps"), ("--noise-multiplier", "nan", "--noise-multiplier")],
)  # fmt: skip
def test_bad_input_is_a_clean_error(capsys, flag, value, named):
    argv = list(GOLDEN)
    argv[argv.index(flag) + 1] = value
    code, out, err = run(capsys, argv + ["--json"])
    assert code == 1
    assert err.startswith("lazydp epsilon: error:") and named in err and "Traceback" not in err
    assert json.loads(out.strip().splitlines()[-1])["type"] == "ConfigError"


def test_impossible_target(capsys):
    argv = ["epsilon", "--target-epsilon", "1e-4", "--sample-rate", "1", "--steps", "100",
            "--delta", "1e-5"]  # fmt: skip
    code, _, err = run(capsys, argv)
    assert code == 1 and "noise_multiplier > 1000" in err


def test_noise_and_target_are_exclusive(capsys):
    assert main(GOLDEN + ["--target-epsilon", "3"]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_a_usage_error_with_json_still_ends_with_a_json_object(capsys):
    # argparse exits 2 without it; scripts read the last line of every --json run.
    assert main(["epsilon", "--steps", "x", "--json"]) == 2
    res = capsys.readouterr()
    last = json.loads(res.out.strip().splitlines()[-1])
    assert last["type"] == "UsageError" and "invalid int value: 'x'" in last["error"]
    assert "usage: lazydp epsilon" in res.err and "invalid int value" in res.err


def test_help_shows_an_example_and_its_output(capsys):
    with pytest.raises(SystemExit) as info:
        main(["epsilon", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "$ lazydp epsilon --sample-rate 0.04 --noise-multiplier 1.5" in out
    assert "epsilon 6.769 (PLD), 7.329 (RDP)" in out


def test_epochs_are_counted_as_the_loaders_run_them(capsys):
    # q = 0.03: an epoch is round(1/q) = 33 Poisson steps (ceil(10 / q) = 334 was one more
    # step per epoch than lazydp train runs) and floor(1/q) = 33 shuffled batches.
    for sampler in ("poisson", "shuffle"):
        args = ["epsilon", "--sample-rate", "0.03", "--noise-multiplier", "1", "--epochs", "10"]
        assert main([*args, "--delta", "1e-5", "--sampler", sampler, "--json"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 330


def test_shuffled_epochs_are_shown_as_the_passes_the_accounting_counts(capsys):
    args = ["epsilon", "--sample-rate", "0.3", "--noise-multiplier", "1", "--epochs", "10"]
    assert main([*args, "--delta", "1e-5", "--sampler", "shuffle", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["steps"], result["epochs"]) == (30, 10)  # showed 9: steps x q


def test_a_figure_that_is_rdps_is_not_labelled_pld(capsys):
    # Below delta 1e-10 (and past 2M steps) the "pld" figure is RDP's: printed as "(PLD)" it
    # claimed the tighter accountant.
    from lazydp.cli import main

    argv = ["epsilon", "--sample-rate", "0.04", "--noise-multiplier", "1.5", "--steps", "2250"]
    assert main([*argv, "--delta", "1e-12"]) == 0
    assert "(RDP, PLD out of range)" in capsys.readouterr().out
    assert main([*argv, "--delta", "1e-5"]) == 0
    assert "6.769 (PLD)" in capsys.readouterr().out


def test_pld_label_calls_a_zero_epsilon_pld():
    # No steps (or delta 0.5 at sigma 50): both accountants say 0.0, which was labelled
    # "RDP, PLD out of range".
    from lazydp.accounting import MechanismCount, epsilon_report, pld_label

    r = epsilon_report([MechanismCount(0.01, 50.0, 1)], 0.5)
    assert (r.pld, r.rdp) == (0.0, 0.0)
    assert pld_label(r.pld, r.rdp) == "PLD"
    assert pld_label(0.0, 0.0) == "PLD"
