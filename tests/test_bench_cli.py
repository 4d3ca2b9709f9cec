"""``lazydp bench`` end to end: CSV layout, JSON with peak memory, PNG files, sweeps, refusals."""

from __future__ import annotations

import csv
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from lazydp.bench.harness import BREAKDOWN_ROWS
from lazydp.cli import main
from lazydp.cli.bench import build_specs, load_sweep
from lazydp.errors import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--config", "rmc1", "--scale", "1e-5", "--batch-size", "16", "--pooling", "3",
        "--iterations", "3", "--measure-last", "2", "--no-progress", "--json"]  # fmt: skip


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_isolated_writes_csv_json_png(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["bench", *TINY, "--modes", "sgd,lazydp", "--out", str(out)]) == 0
    summary = _last_json(capsys)
    assert summary["out"] == str(out)
    with open(out / "breakdown.csv") as f:
        table = list(csv.reader(f))
    label = "rmc1 s=1e-05 B=16 L=3"
    assert table[0] == ["row (ms)", f"{label} sgd", f"{label} lazydp"]
    assert [r[0] for r in table[1:]] == list(BREAKDOWN_ROWS)
    assert all(float(x) >= 0 for x in table[-1][1:])  # totals
    doc = json.loads((out / "bench.json").read_text())
    assert doc["machine"]["cpu_count"] >= 1 and "torch" in doc["machine"]["versions"]
    for r in doc["results"]:
        assert r["status"] == "ok" and r["isolated"]
        # Measured in its own process: peak covers at least the tables it allocated.
        assert r["peak_rss_bytes"] >= r["baseline_rss_bytes"] + r["table_bytes"] > 0
    (work,) = doc["summary"]["workloads"]
    ms = work["step_ms"]
    assert work["lazydp_over_sgd"] == pytest.approx(ms["lazydp"] / ms["sgd"])
    assert work["noise_floor_ms"] > 0
    assert (out / "breakdown.png").read_bytes()[:8] == PNG_MAGIC
    assert not (out / "scaling.png").exists()  # one scale only


def _tiny_sweep(path, extra: str):
    """A sweep file of two tiny rmc1 scales, plus ``extra`` lines."""
    path.write_text(
        "# lazydp bench --sweep sweep.yaml\nconfig: rmc1\nbatch_size: 16\npooling: 2\n"
        "iterations: 2\nmeasure_last: 1\n" + extra
    )
    return path


def test_bench_sweep_over_scale_draws_the_scaling_plot(tmp_path, capsys):
    sweep = _tiny_sweep(tmp_path / "sweep.yaml", "scale: [1.0e-5, 2.0e-5]\nmodes: [sgd, dpsgd_f]\n")
    out = tmp_path / "sweep"
    argv = ["bench", "--sweep", str(sweep), "--out", str(out), "--interleave", "--no-progress"]
    assert main([*argv, "--json"]) == 0
    summary = _last_json(capsys)["summary"]
    assert [w["scale"] for w in summary["workloads"]] == [1e-5, 2e-5]
    assert all("dpsgd_f_over_sgd" in w for w in summary["workloads"])
    results = json.loads((out / "bench.json").read_text())["results"]
    assert results and all(r["isolated"] for r in results)  # each workload in its own process
    header = next(csv.reader(open(out / "breakdown.csv")))
    assert len(header) == 1 + 4
    assert (out / "scaling.png").read_bytes()[:8] == PNG_MAGIC
    # One scale into the same --out: the earlier run's plot must not stay beside its results.
    assert main(["bench", *TINY, "--modes", "sgd", "--no-isolate", "--out", str(out)]) == 0
    assert "scaling_png" not in _last_json(capsys)["files"]
    assert not (out / "scaling.png").exists()


def test_bench_sweep_interleaving_scales_reports_each_modes_growth(tmp_path, capsys):
    sweep = _tiny_sweep(
        tmp_path / "growth.yaml",
        "scale: [1.0e-5, 3.0e-5]\nmodes: [sgd, lazydp]\ninterleave_scales: true\n",
    )
    out = tmp_path / "growth"
    assert main(["bench", "--sweep", str(sweep), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "lazydp: " in printed and "(in one process, interleaved)" in printed
    doc = json.loads((out / "bench.json").read_text())
    growth = doc["summary"]["growth"]
    assert [(g["mode"], g["side_by_side"]) for g in growth] == [("sgd", True), ("lazydp", True)]
    # One child process per mode, holding both table sizes.
    for r in doc["results"]:
        assert r["isolated"] and len(r["timed_with"]) == 1 and r["mode"] in r["timed_with"][0]
    _tiny_sweep(sweep, "scale: [1.0e-5, 3.0e-5]\ninterleave_scales: yes please\n")
    assert main(["bench", "--sweep", str(sweep), "--out", str(out), "--no-progress"]) == 1
    assert "expected true or false" in capsys.readouterr().err


def test_interleaving_scales_without_two_scales_is_refused(tmp_path, capsys):
    # Every mode then ran alone and no growth was reported, without a word.
    sweep = _tiny_sweep(tmp_path / "s.yaml", "scale: [1.0e-5]\nmodes: [sgd]\n")
    sweep.write_text(sweep.read_text() + "interleave_scales: true\n")
    out = tmp_path / "o"
    assert main(["bench", "--sweep", str(sweep), "--no-progress", "--out", str(out)]) == 1
    assert "no workload is swept over two or more scales" in capsys.readouterr().err
    assert not out.exists()


def test_bench_refuses_a_config_that_does_not_fit(tmp_path, capsys):
    code = main(["bench", "--config", "mlperf", "--scale", "50", "--out", str(tmp_path), "--json"])
    assert code == 1
    captured = capsys.readouterr()
    assert "needs" in captured.err and "lower --scale" in captured.err
    # Every default mode's own advice (sgd, dpsgd_f, lazydp fit different scales), not the first.
    assert captured.err.count("lower --scale") == 3 and "for mode lazydp" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["type"] == "ConfigError"
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_bench_rejects_unknown_modes_and_sweep_keys(tmp_path, capsys):
    assert main(["bench", *TINY, "--modes", "sgd,fast"]) == 1
    assert "fast" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("scales: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"unknown keys \['scales'\]"):
        load_sweep(str(bad))


def test_bench_refuses_a_mode_named_twice(tmp_path, capsys):
    # It was timed once and reported twice: two equal columns, two results in bench.json.
    out = tmp_path / "o"
    assert main(["bench", *TINY, "--modes", "sgd,lazydp,sgd", "--out", str(out)]) == 1
    assert "['sgd'] named more than once" in capsys.readouterr().err
    assert not out.exists()
    sweep = _tiny_sweep(tmp_path / "s.yaml", "scale: 1.0e-5\nmodes: [sgd, lazydp]\n")
    sweep.write_text(sweep.read_text() + "interleave: [lazydp, lazydp]\n")
    assert main(["bench", "--sweep", str(sweep), "--no-progress", "--out", str(out)]) == 1
    assert "interleave=['lazydp', 'lazydp']" in capsys.readouterr().err


def test_a_sweep_file_takes_the_flag_name_mlp_only(tmp_path):
    sweep = tmp_path / "mlp.yaml"
    sweep.write_text("config: mlperf\nmlp_only: [false, true]\nscale: 0.001\n")
    options = load_sweep(str(sweep))
    assert options == {"config": "mlperf", "dense_only": [False, True], "scale": 0.001}
    assert [s.dense_only for s in build_specs(options)] == [False, True]
    sweep.write_text("mlp_only: true\ndense_only: false\n")
    with pytest.raises(ConfigError, match="mlp_only and dense_only are the same option"):
        load_sweep(str(sweep))


def test_a_sweep_file_reads_exponent_notation_as_numbers(tmp_path):
    # YAML 1.1 wants a dot (1.0e-5): `scale: 1e-5` was the text '1e-5', refused as not a number.
    sweep = tmp_path / "s.yaml"
    sweep.write_text("scale: [1e-5, 2.5E-5, +1e-4]\nlr: 1e-3\nlocality: zipf:1e0\nseed: 1_0\n")
    options = load_sweep(str(sweep))
    assert options == {
        "scale": [1e-5, 2.5e-5, 1e-4],
        "lr": 1e-3,
        "locality": "zipf:1e0",
        "seed": 10,
    }
    assert [s.scale for s in build_specs(options)] == [1e-5, 2.5e-5, 1e-4]


def test_build_specs_is_the_product_of_list_options():
    specs = build_specs({"config": "rmc1", "scale": [0.001, 0.01], "batch_size": [1024, 2048]})
    assert [(s.scale, s.batch_size) for s in specs] == [
        (0.001, 1024),
        (0.001, 2048),
        (0.01, 1024),
        (0.01, 2048),
    ]


def test_help_shows_an_example_with_output(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    assert "$ lazydp bench --config mlperf" in text and "lazydp/sgd" in text


@pytest.mark.parametrize(
    "path", sorted(str(p) for p in Path(__file__).parents[1].glob("configs/bench_*.yaml"))
)
def test_shipped_sweep_files_are_valid(path):
    """Every benchmark config the README and benchmarks/*.py name parses into workloads, modes
    and round robins (nothing is timed)."""
    from lazydp.bench.suite import _round_robins
    from lazydp.cli.bench import _flag, _interleave, _modes

    options = load_sweep(path)
    modes = _modes(options.pop("modes", "sgd,dpsgd_f,lazydp"))
    interleave = _interleave(options.pop("interleave", False))
    scales = _flag("interleave_scales", options.pop("interleave_scales", False))
    options.pop("compare", None)
    options.pop("opacus_iterations", None)
    if options.get("placement") == "split" and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):  # the GPU headline's sweep
            build_specs(options)
        return
    specs = build_specs(options)
    assert specs
    groups = _round_robins(specs, modes, interleave, scales)
    if scales:  # each mode across the scales of its workload, one process each
        assert groups and all(len({m for _, m in g}) == 1 and len(g) > 1 for g in groups)


# --- audit fixes: distinct columns, scaling lines, refusals and exit codes, targets.py ---


def test_sweep_over_a_field_outside_the_label_reports_each_point(tmp_path, capsys):
    sweep = _tiny_sweep(tmp_path / "seeds.yaml", "scale: 1.0e-5\nseed: [0, 1]\nmodes: [sgd]\n")
    out = tmp_path / "seeds"
    assert main(["bench", "--sweep", str(sweep), "--out", str(out), "--no-isolate",
                 "--no-progress"]) == 0  # fmt: skip
    header = next(csv.reader(open(out / "breakdown.csv")))
    assert header[1:] == ["rmc1 s=1e-05 B=16 L=2 seed=0 sgd", "rmc1 s=1e-05 B=16 L=2 seed=1 sgd"]


def test_scaling_lines_follow_the_scale_groups():
    """Points that differ in locality or dim (not only scale) are separate lines."""
    from lazydp.bench.harness import ModeResult
    from lazydp.bench.report import scaling_lines
    from lazydp.bench.suite import SuiteResult
    from lazydp.bench.workload import BenchSpec

    specs, results = [], []
    for extra in ({}, {"locality": "zipf:1.2"}, {"embedding_dim": 8}, {"lr": 0.5}):
        for scale, ms in ((1e-5, 1.0), (2e-5, 2.0)):
            spec = BenchSpec("rmc1", scale, 16, pooling=2, **extra)
            specs.append(spec)
            results.append(ModeResult(spec.label, "sgd", breakdown_ms={"total": ms},
                                      table_bytes=spec.table_bytes(), spec=spec.to_dict()))  # fmt: skip
    lines = scaling_lines(SuiteResult(specs, ["sgd"], results))
    assert sorted(lines) == [
        "rmc1 B=16 L=2 d=8 sgd",
        "rmc1 B=16 L=2 sgd lr=0.01",
        "rmc1 B=16 L=2 sgd lr=0.5",
        "rmc1 B=16 L=2 zipf:1.2 sgd",
    ]
    assert all(len(points) == 2 for points in lines.values())


def test_a_sweep_where_nothing_ran_exits_non_zero(tmp_path, capsys):
    sweep = tmp_path / "huge.yaml"
    sweep.write_text("config: mlperf\nscale: [50, 60]\nmodes: [sgd, lazydp]\n")
    out = tmp_path / "huge"
    assert main(["bench", "--sweep", str(sweep), "--out", str(out), "--no-progress"]) == 1
    assert "no measurement succeeded" in capsys.readouterr().err
    assert (out / "bench.json").exists()  # the reasons are written all the same


def _targets_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "targets.py"
    spec = importlib.util.spec_from_file_location("bench_targets", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_targets_script_names_the_known_targets(monkeypatch):
    script = _targets_script()
    with pytest.raises(ConfigError, match="known targets: pooling1, rmc"):
        script.run("bogus")
    ran: list[str] = []
    monkeypatch.setattr(script, "run", ran.append)
    with pytest.raises(SystemExit, match="unknown target \\['bogus'\\]"):
        script.main(["rmc", "bogus"])
    assert ran == []  # refused before the first target's minutes


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_targets_script_help_prints_the_usage(monkeypatch, capsys, flag):
    script = _targets_script()
    ran: list[str] = []
    monkeypatch.setattr(script, "run", ran.append)
    script.main([flag])
    out = capsys.readouterr().out
    assert ran == []
    for name in script.TARGETS:  # every target, with what it measures
        assert f"python benchmarks/targets.py {name} " in out
    assert "target 4: 8 x 100k model against Opacus" in out


def test_dpsgd_f_over_sgd_is_printed_without_lazydp(tmp_path, capsys):
    # The README's "dpsgd_f on MLPs only" ratio: a run without lazydp printed "no ratios
    # (modes missing)" although bench.json held it.
    argv = ["bench", *TINY[:-1], "--mlp-only", "--modes", "sgd,dpsgd_f", "--no-isolate"]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "dpsgd_f/sgd " in out and "no ratios" not in out


def test_interleaving_lazydp_with_dpsgd_f_gets_a_note(tmp_path, capsys):
    # dpsgd_f's model in lazydp's process slowed lazydp's steps 20-30% (RESULTS): say so.
    sweep = _tiny_sweep(tmp_path / "s.yaml", "scale: 1.0e-5\nmodes: [sgd, dpsgd_f, lazydp]\n")
    argv = ["bench", "--sweep", str(sweep), "--no-progress", "--out"]
    assert main([*argv, str(tmp_path / "o"), "--interleave"]) == 0
    assert "interleaved with a dpsgd_* mode" in capsys.readouterr().err
    sweep.write_text(sweep.read_text() + "interleave: [sgd, lazydp]\n")
    assert main([*argv, str(tmp_path / "o2")]) == 0
    assert "interleaved with a dpsgd_* mode" not in capsys.readouterr().err


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_bench_and_its_child_process(tmp_path, capsys, monkeypatch, signum):
    # SIGTERM ended the parent alone: the child measuring a mode ran on, orphaned, and the
    # temporary directory of its result stayed behind.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ours: list[int] = []
    # Children of this test process from earlier tests (a Spark JVM) are not the bench's.
    earlier = set(_children(os.getpid()))

    def signal_once_the_child_runs() -> None:
        deadline = time.monotonic() + 120
        while not ours and time.monotonic() < deadline:
            ours.extend(set(_children(os.getpid())) - earlier)
            time.sleep(0.05)
        os.kill(os.getpid(), signum)  # the child is still importing torch: long before its end

    def carry_on(signum: int, frame: object) -> None:  # without the fix: the run goes on
        pass

    previous = signal.signal(signum, carry_on)
    try:
        threading.Thread(target=signal_once_the_child_runs, daemon=True).start()
        args = ["bench", *TINY, "--iterations", "2000", "--modes", "sgd"]
        code = main([*args, "--out", str(tmp_path / "o")])
        restored = signal.getsignal(signum)
    finally:
        signal.signal(signum, previous)
    err = capsys.readouterr().err
    assert code == 128 + signum, err
    assert f"stopped by {signal.Signals(signum).name}" in err and "Traceback" not in err
    assert ours and not any(Path(f"/proc/{pid}").exists() for pid in ours)  # killed, reaped
    assert not list(tmp_path.glob("lazydp-bench-*")) and not (tmp_path / "o").exists()
    assert restored is carry_on
