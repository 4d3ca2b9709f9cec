"""Bad input to ``lazydp train`` / ``lazydp bench`` is refused up front with one clear line.

Every case here is refused before any data is read, any step is charged to a ledger, or any
benchmark runs: nothing is trained, so the file stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lazydp.cli import build_parser, main
from lazydp.cli.train import config_from_args
from lazydp.errors import ConfigError
from lazydp.train_config import TrainConfig, check_output_dir


def refused(argv: list[str], capsys) -> str:
    """Run the CLI in-process; assert it failed cleanly (exit 1, one ``error:`` line)."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"lazydp {argv[0]}: error: "), err
    return lines[0]


# --- lazydp train: flags ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--lr", "-1"], "lr must be a finite number > 0"),
        (["--lr", "0"], "spend privacy budget"),
        (["--lr", "inf"], "lr must be a finite number > 0"),
        (["--dense-lr", "-1"], "dense_lr must be a finite number > 0"),
        (["--dense-lr", "0"], "--dense-lr 0.003"),
        (["--max-steps", "0"], "max_steps (--max-steps) must be an integer >= 1"),
        (["--data", "somewhere"], "give one"),  # beside --dataset acs: one would be ignored
        (["--max-steps", "-3"], "max_steps (--max-steps) must be an integer >= 1"),
        (["--checkpoint-every", "-1"], "checkpoint_every (--checkpoint-every) must be an integer"),
        (["--epochs", "0"], "epochs must be a finite number > 0"),
        (["--epochs", "nan"], "epochs must be a finite number > 0"),
        (["--embedding-dim", "0"], "embedding_dim must be a positive integer"),
        (["--seed", "-1"], "seed (--seed) must be an integer >= 0"),
        (["--model-seed", "-1"], "model_seed (--model-seed) must be an integer >= 0"),
        (["--noise-multiplier", "1", "--target-epsilon", "2"], "give one"),
        (["--mode", "sgd", "--target-epsilon", "2"], "target_epsilon would be ignored"),
        (["--mode", "sgd", "--noise-multiplier", "1"], "noise_multiplier would be ignored"),
        (["--nproc-per-node", "0"], "--nproc-per-node=0 must be >= 1"),
        (["--nproc-per-node", "-2"], "--nproc-per-node=-2 must be >= 1"),
        (["--max-restarts", "2"], "only apply to a distributed run"),
        (["--rdzv-endpoint", "host:1234"], "only apply to a distributed run"),
        (["--nproc-per-node", "2", "--max-restarts", "-1"], "--max-restarts=-1 >= 0"),
    ],
)
def test_bad_train_flags_are_refused_before_training(tmp_path, capsys, flags, fragment):
    out = tmp_path / "run"
    line = refused(["train", "--dataset", "acs", "--out", str(out), *flags], capsys)
    assert fragment in line
    assert not out.exists()  # nothing written, no ledger: no privacy spent


def test_tables_that_would_not_fit_in_memory_are_refused_before_allocating(tmp_path, capsys):
    # It used to end in torch's "can't allocate memory" traceback from inside the model.
    out = tmp_path / "run"
    line = refused(
        ["train", "--dataset", "acs", "--embedding-dim", "100000000", "--out", str(out)], capsys
    )
    assert "the embedding tables need" in line and "--embedding-dim" in line
    assert not (out / "ledger.jsonl").exists()


# --- lazydp train: --config files ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("epochs: [1\nlr: 2\n", "is not valid YAML: expected ',' or ']'"),
        ("epochs: abc\n", "epochs must be a finite number > 0"),
        ("epochs: 5\nlr: 2\nepochs: 6\n", "key 'epochs' is given twice"),
        ("max-steps: 3\nmax_steps: 4\n", "key 'max_steps' is given twice"),
        ("epochs: .inf\n", "epochs must be a finite number > 0"),
        ("lr: abc\n", "lr must be a finite number > 0"),
        ("dense_lr: 0\n", "dense_lr must be a finite number > 0"),
        ("hidden: abc\n", "hidden must be a list of MLP layer widths"),
        ("hidden: 64\n", "hidden must be a list of MLP layer widths"),
        ("hidden: [64, 0]\n", "hidden[1] must be a positive integer"),
        ("hidden: [64, 2.5]\n", "hidden[1] must be a positive integer"),
        ("out: 5\n", "out (--out) must be a non-empty path; got 5 of type int"),
        ("out: ''\n", "out (--out) must be a non-empty path"),
        ("eval_batch_size: 0\n", "eval_batch_size must be a positive integer"),
        ("batch_size: 2.5\n", "batch_size must be a positive integer"),
        ("max_grad_norm: '4'\n", "max_grad_norm must be a finite number > 0"),
        ("resume: maybe\n", "resume must be true or false"),
        ("progress: 1\n", "progress must be true or false"),
        ("seed: abc\n", "seed (--seed) must be an integer >= 0"),
        ("max_steps: 0\n", "max_steps (--max-steps) must be an integer >= 1"),
        ("checkpoint_every: -1\n", "checkpoint_every (--checkpoint-every)"),
        ("dataset: foo\n", "dataset must be one of 'movielens', 'acs'"),
        ("mode: fast\n", "mode must be one of"),
        ("data: 5\n", "data (--data) must be a non-empty path"),
        ("target_epsilon: abc\n", "target_epsilon must be a finite number > 0"),
        ("noise_multiplier: 1\ntarget_epsilon: 2\n", "both noise_multiplier and target_epsilon"),
        ("- epochs\n", "must hold a mapping of option: value"),
        ("1: 2\n", "option names must be text"),
        ("epochz: 1\n", "unknown option(s) ['epochz']"),
    ],
)
def test_bad_config_files_are_refused(tmp_path, capsys, text, fragment):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    out = tmp_path / "run"
    out_flag = [] if text.startswith("out:") else ["--out", str(out)]  # the flag would win
    line = refused(["train", "--config", str(cfg), *out_flag], capsys)
    assert fragment in line
    assert not out.exists()


def test_missing_data_directory_is_refused_before_out_is_created(tmp_path, capsys):
    out = tmp_path / "run"
    line = refused(["train", "--data", str(tmp_path / "nope"), "--out", str(out)], capsys)
    assert "is not a directory" in line and "lazydp preprocess" in line
    assert not out.exists()


def test_config_that_is_a_directory_or_missing(tmp_path, capsys):
    assert "is a directory" in refused(["train", "--config", str(tmp_path)], capsys)
    assert "does not exist" in refused(["train", "--config", str(tmp_path / "no.yaml")], capsys)


def test_config_file_that_is_not_text(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"\xff\xfe\x00bad")
    assert "--config" in refused(["train", "--config", str(cfg)], capsys)


def _config(argv: list[str]) -> TrainConfig:
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_a_noise_flag_beats_the_files_other_noise_setting(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"noise_multiplier: 2.0\nout: {tmp_path / 'r'}\n")
    cfg = _config(["--config", str(cfg_file), "--target-epsilon", "1"])
    assert cfg.noise_multiplier is None and cfg.target_epsilon == 1.0
    cfg_file.write_text(f"target_epsilon: 2.0\nout: {tmp_path / 'r'}\n")
    cfg = _config(["--config", str(cfg_file), "--noise-multiplier", "1.5"])
    assert cfg.noise_multiplier == 1.5 and cfg.target_epsilon is None


def test_valid_configs_still_pass(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("dataset: acs\nepochs: 2\nhidden: [16]\nlr: 0.5\ncheckpoint_every: 0\n")
    cfg = _config(["--config", str(cfg_file), "--out", str(tmp_path / "r"), "--max-steps", "1"])
    assert cfg.hidden == [16] and cfg.epochs == 2 and cfg.max_steps == 1
    TrainConfig(out=str(tmp_path / "r")).validate()  # the defaults
    TrainConfig(hidden=[], seed=0, out=str(tmp_path / "r")).validate()
    assert not (tmp_path / "r").exists()  # validation creates nothing


# --- output directories ------------------------------------------------------------------------


def test_train_out_under_a_file_is_refused_before_training(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ["train", "--dataset", "acs", "--max-steps", "1"]
    line = refused([*base, "--out", str(afile / "sub")], capsys)
    assert f"cannot create it, {afile} is a file" in line
    line = refused([*base, "--out", str(afile)], capsys)
    assert "exists and is not a directory" in line


def test_check_output_dir(tmp_path):
    assert check_output_dir(tmp_path) == tmp_path
    assert check_output_dir(tmp_path / "a" / "b" / "c") == tmp_path / "a" / "b" / "c"
    afile = tmp_path / "f"
    afile.write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        check_output_dir(afile / "a" / "b")
    with pytest.raises(ConfigError, match="--where .* not a directory"):
        check_output_dir(afile, "--where")
    (tmp_path / "link").symlink_to(tmp_path / "missing")
    with pytest.raises(ConfigError, match="not a directory"):
        check_output_dir(tmp_path / "link")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_check_output_dir_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="not writable"):
            check_output_dir(ro / "sub")
    finally:
        ro.chmod(0o755)


# --- lazydp bench ------------------------------------------------------------------------------

TINY = ["--config", "rmc1", "--scale", "1e-5", "--batch-size", "16", "--pooling", "3",
        "--iterations", "3", "--measure-last", "2", "--no-progress", "--modes", "sgd"]  # fmt: skip


@pytest.fixture
def no_benchmark(monkeypatch):
    """Fail the test if a benchmark would actually run."""
    import lazydp.bench.suite as suite

    def boom(*args, **kwargs):
        raise AssertionError("the benchmark ran; the input should have been refused first")

    monkeypatch.setattr(suite, "run_suite", boom)


def test_bench_out_under_a_file_is_refused_before_running(tmp_path, capsys, no_benchmark):
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = refused(["bench", *TINY, "--out", str(afile / "sub")], capsys)
    assert "cannot create it" in line and "is a file" in line


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--scale", "1e300"], "scale must be a finite number in (0, 1e+06]"),
        (["--scale", "inf"], "scale must be a finite number"),
        (["--scale", "0"], "scale must be a finite number"),
        (["--opacus-iterations", "0"], "opacus_iterations must be a positive integer"),
        (["--iterations", "0"], "iterations must be a positive integer"),
    ],
)
def test_bad_bench_flags(tmp_path, capsys, no_benchmark, flags, fragment):
    out = tmp_path / "b"
    assert fragment in refused(["bench", *TINY, *flags, "--out", str(out)], capsys)
    assert not out.exists()


def test_huge_scale_gets_the_memory_advice_not_an_overflow(tmp_path, capsys, no_benchmark):
    line = refused(["bench", *TINY, "--scale", "1e6", "--out", str(tmp_path / "b")], capsys)
    assert "lower --scale to <=" in line


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("scale: [0.0001\nmodes: lazydp\n", "is not valid YAML"),
        ("- a\n- b\n", "must hold a mapping of option"),
        ("1: 2\n", "option names must be text"),
        ("scale: []\n", "['scale'] are empty lists"),
        ("compare: foo\n", "compare='foo': expected one or more of ['opacus']"),
        ("interleave: 5\n", "interleave=5: expected mode names"),
        ("interleave: foo\n", "interleave='foo': ['foo'] not known"),
        ("modes: [sgd, 3]\n", "expected mode names"),
        ("opacus_iterations: abc\n", "opacus_iterations must be a positive integer"),
        ("scale: abc\n", "scale must be a finite number"),
        ("batch_size: 2.5\n", "batch_size must be a positive integer"),
    ],
)
def test_bad_sweep_files(tmp_path, capsys, no_benchmark, text, fragment):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(text)
    out = tmp_path / "b"
    line = refused(["bench", "--sweep", str(sweep), "--no-progress", "--out", str(out)], capsys)
    assert fragment in line
    assert not out.exists()


def test_sweep_that_is_a_directory(tmp_path, capsys, no_benchmark):
    assert "is a directory" in refused(["bench", "--sweep", str(tmp_path)], capsys)


def test_bench_write_failure_after_running_is_one_line(tmp_path, capsys, monkeypatch):
    """Belt and braces: if the directory breaks while the benchmark runs, still no traceback."""
    import lazydp.bench.report as report
    import lazydp.bench.suite as suite

    monkeypatch.setattr(suite, "run_suite", lambda *a, **k: suite.SuiteResult([], []))
    monkeypatch.setattr(suite, "summarise", lambda s: {})

    def fail(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(Path(args[-1])))

    monkeypatch.setattr(report, "write_all", fail)
    line = refused(["bench", *TINY, "--out", str(tmp_path / "b")], capsys)
    assert "cannot write the results" in line and "Permission denied" in line


def test_a_reader_that_goes_away_gives_no_traceback():
    # `lazydp epsilon ... | head -1`: head exits after its line, and the rest of the output
    # met a closed pipe, which Python reported as a BrokenPipeError traceback.
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "lazydp", "epsilon", "--sample-rate", "0.04"]
    cmd += ["--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the command prints
    err = proc.stderr.read().decode()
    assert proc.wait() == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_a_dataset_without_id_columns_is_refused_in_the_users_words(tmp_path, capsys):
    """It failed deep in the DLRM ("table_rows is empty") instead of saying what to do."""
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "d"
    table = pa.table({"label": pa.array(np.arange(40) % 2, pa.float32()), "x": np.ones(40)})
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        pq.write_table(table, root / split / "part-00000.parquet")
    meta = {"rows": {"train": 40, "test": 40}, "schema": {"dense": ["x"], "categorical": []}}
    (root / "metadata.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    err = refused(["train", "--data", str(root), "--out", str(out), "--no-progress"], capsys)
    assert "no categorical (id) columns" in err and "Python API" in err
    assert not (out / "ledger.jsonl").exists()
