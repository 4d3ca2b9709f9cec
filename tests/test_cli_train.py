"""`lazydp train` end to end through the CLI (small runs on the built-in real datasets and a
preprocessed fixture)."""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from lazydp.cli import _one_line_warnings, main

FIXTURES = Path(__file__).parent / "fixtures"


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_train_acs_json_reports_privacy_and_metrics(tmp_path, capsys):
    code, out = run_cli(
        [
            "train",
            "--dataset",
            "acs",
            "--epochs",
            "2",
            "--target-epsilon",
            "2",
            "--out",
            str(tmp_path / "run"),
            "--json",
        ],
        capsys,
    )
    assert code == 0, out.err
    result = last_json(out.out)
    assert result["privacy"]["epsilon"] <= 2.0 + 1e-9
    assert result["privacy"]["private"] is True
    assert result["privacy"]["delta"] == 1e-4  # ~1.4k rows: 1/N rounded down to a power of ten
    assert 0.0 <= result["test"]["accuracy"] <= 1.0
    assert (tmp_path / "run" / "model.pt").exists()
    ledger = (tmp_path / "run" / "ledger.jsonl").read_text().splitlines()
    assert sum('"step"' in line for line in ledger) == result["steps"]


def test_train_movielens_dlrm_few_steps(tmp_path, capsys):
    code, out = run_cli(
        [
            "train",
            "--max-steps",
            "3",
            "--batch-size",
            "512",
            "--noise-multiplier",
            "1.0",
            "--out",
            str(tmp_path / "run"),
            "--json",
        ],
        capsys,
    )
    assert code == 0, out.err
    result = last_json(out.out)
    assert result["steps"] == 3 and result["mode"] == "lazydp"
    assert result["test"]["rows"] > 9000


def test_warnings_are_one_plain_line_and_only_inside_the_command(tmp_path, capsys):
    shown_before = warnings.showwarning
    args = ["train", "--dataset", "acs", "--batch-size", "200000", "--max-steps", "1"]
    code, out = run_cli([*args, "--out", str(tmp_path / "r"), "--no-progress"], capsys)
    assert code == 0, out.err
    lines = [line for line in out.err.splitlines() if "warning" in line.lower()]
    assert len(lines) == 1, out.err  # no file path, no source line, no UserWarning
    assert lines[0].startswith("lazydp train: warning: batch_size=200000 exceeds the "), lines
    assert lines[0].endswith("Use a batch size well below the data set size."), lines
    assert warnings.showwarning is shown_before  # library users keep Python's warnings
    buf = io.StringIO()  # another category is named; a wrapped message is joined into one line
    _one_line_warnings("bench")("torch says\n  this", FutureWarning, "x.py", 3, file=buf)
    assert buf.getvalue() == "lazydp bench: warning: FutureWarning: torch says this\n"


def test_one_sgd_step_is_one_step_and_sgd_names_its_empty_ledger(tmp_path, capsys):
    args = ["train", "--dataset", "acs", "--mode", "sgd", "--max-steps", "1", "--no-progress"]
    code, out = run_cli([*args, "--out", str(tmp_path / "r")], capsys)
    assert code == 0, out.err
    assert "no steps in the privacy ledger (sgd is not private)" in out.out
    assert "(1 step, " in out.out and "1 steps" not in out.out and "0 steps" not in out.out


def test_report_of_a_run_on_data_names_the_directory_not_a_builtin_dataset(tmp_path, capsys):
    from lazydp.preprocess import preprocess

    data = tmp_path / "data"
    preprocess("criteo", [FIXTURES / "criteo_small.tsv"], data, buckets=64, progress=False)
    args = ["train", "--data", str(data), "--max-steps", "1", "--batch-size", "4", "--no-progress"]
    code, out = run_cli([*args, "--out", str(tmp_path / "r")], capsys)
    assert code == 0, out.err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["dataset"] == str(data)
    assert report["config"]["data"] == str(data) and report["config"]["dataset"] is None


def test_an_undefined_auc_is_null_in_report_json_and_the_json_line(tmp_path, capsys):
    # A test split of one class has no AUC (NaN): json.dumps wrote ``NaN``, which is no JSON,
    # and strict parsers (JavaScript, Go) could not read report.json or the --json line.
    from lazydp.preprocess import preprocess
    from lazydp.preprocess.reference import is_test

    lines = []
    for i, line in enumerate((FIXTURES / "criteo_small.tsv").read_text().splitlines()):
        negative, positive = "0\t" + line.split("\t", 1)[1], "1\t" + line.split("\t", 1)[1]
        # Every test row negative; the train rows keep both classes.
        lines.append(positive if i % 2 and not is_test(positive, 0.1) else negative)
    assert any(is_test(line, 0.1) for line in lines)
    (tmp_path / "one_class.tsv").write_text("\n".join(lines) + "\n")
    data = tmp_path / "data"
    preprocess("criteo", [tmp_path / "one_class.tsv"], data, buckets=64, progress=False)
    args = ["train", "--data", str(data), "--max-steps", "1", "--batch-size", "4", "--json"]
    code, out = run_cli([*args, "--out", str(tmp_path / "r")], capsys)
    assert code == 0, out.err
    assert "AUC is undefined" in out.out
    for text in ((tmp_path / "r" / "report.json").read_text(), out.out.strip().splitlines()[-1]):
        report = json.loads(text, parse_constant=pytest.fail)
        assert report["test"]["auc"] is None and report["test"]["rows"] > 0


def test_a_diverged_model_is_not_given_an_accuracy_or_called_one_class():
    # A last step that blows the weights up makes every test score NaN: accuracy counted NaN
    # as a negative prediction (the share of negative labels), and the NaN AUC was blamed on a
    # test split of one class.
    from types import SimpleNamespace

    from lazydp.training import evaluate, undefined_metrics_note

    labels = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0])

    def rows(idx):
        n = len(idx)
        return SimpleNamespace(dense=torch.ones(n, 1), sparse=[], label=labels[idx])

    test = SimpleNamespace(num_rows=len(labels), batch=rows)

    class Scores(torch.nn.Module):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = value

        def forward(self, dense, sparse):
            return torch.full((dense.shape[0],), self.value)

    metrics = evaluate(Scores(float("nan")), test, batch_size=2)
    assert metrics["nan_scores"] == metrics["rows"] == 5
    assert math.isnan(metrics["accuracy"]) and math.isnan(metrics["logloss"])
    note = undefined_metrics_note(metrics)
    assert note is not None and "diverged" in note and "same class" not in note
    fine = evaluate(Scores(1.0), test, batch_size=2)
    assert fine["nan_scores"] == 0 and fine["accuracy"] == 0.6 and fine["auc"] == 0.5
    one_class = dict(fine, auc=float("nan"))
    assert "same class" in (undefined_metrics_note(one_class) or "")


def test_config_file_then_flags(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: acs\nepochs: 1\nmode: dpsgd_f\nnoise_multiplier: 2.0\n")
    code, out = run_cli(
        ["train", "--config", str(cfg), "--mode", "lazydp", "--out", str(tmp_path / "r"), "--json"],
        capsys,
    )
    assert code == 0, out.err
    result = last_json(out.out)
    assert result["mode"] == "lazydp"  # the flag wins over the file
    assert result["noise_multiplier"] == 2.0  # the file wins over the default


def test_ledger_is_never_reset_and_resume_continues(tmp_path, capsys):
    args = [
        "train",
        "--dataset",
        "acs",
        "--epochs",
        "1",
        "--noise-multiplier",
        "2.0",
        "--out",
        str(tmp_path / "r"),
        "--checkpoint-every",
        "2",
        "--json",
    ]
    assert run_cli(args, capsys)[0] == 0
    code, out = run_cli(args, capsys)
    assert code == 1 and "--resume" in out.err  # an existing ledger is never overwritten
    code, out = run_cli([*args, "--resume", "--epochs", "2"], capsys)
    assert code == 0, out.err
    result = last_json(out.out)
    ledger = (tmp_path / "r" / "ledger.jsonl").read_text()
    assert ledger.count('"step"') >= result["steps"]


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--noise-multiplier", "-1"], "noise_multiplier"),
        (["--target-epsilon", "0"], "epsilon"),
        (["--batch-size", "0"], "batch_size"),
        (["--weight-decay", "-1"], "weight_decay"),
        (["--weight-decay", "1"], "below 1 / lr = 0.5"),  # acs: lr 2, so 1 flips every row
        (["--momentum", "1"], "momentum"),
    ],
)
def test_bad_flags_give_clean_errors(tmp_path, capsys, flags, match):
    code, out = run_cli(["train", "--dataset", "acs", "--out", str(tmp_path / "r"), *flags], capsys)
    assert code == 1
    assert match in out.err and "Traceback" not in out.err


def test_unknown_config_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochz: 1\n")
    code, out = run_cli(["train", "--config", str(cfg)], capsys)
    assert code == 1 and "epochz" in out.err


@pytest.mark.slow
def test_default_movielens_model_is_calibrated_and_clipping_norm_one_is_not(tmp_path, capsys):
    """The main job's defaults (clipping norm 4) give test log-loss below the base rate's
    (ln 2 = 0.693 for balanced labels) while still ranking; clipping norm 1 does not (overconfident
    logits), which shows that this check can fail."""
    results = {}
    for norm in ("4", "1"):
        code, out = run_cli(
            ["train", "--seed", "1", "--max-grad-norm", norm, "--no-progress"]
            + ["--out", str(tmp_path / norm), "--json"],
            capsys,
        )
        assert code == 0, out.err
        results[norm] = last_json(out.out)["test"]
    assert results["4"]["logloss"] < 0.66 and results["4"]["auc"] > 0.72
    assert results["1"]["logloss"] > 0.8


def test_table_weight_decay_and_momentum_train_lazily(tmp_path, capsys):
    out = {}
    for name, flags in (
        ("plain", []),
        ("wd", ["--weight-decay", "0.05"]),
        ("mu", ["--momentum", "0.9"]),
    ):
        args = ["train", "--dataset", "acs", "--max-steps", "4", "--noise-multiplier", "1.0"]
        args += [*flags, "--seed", "3", "--out", str(tmp_path / name), "--json"]
        code, res = run_cli(args, capsys)
        assert code == 0, res.err
        assert last_json(res.out)["mode"] == "lazydp"
        out[name] = torch.load(tmp_path / name / "model.pt", weights_only=True)
    tables = [k for k in out["plain"] if "emb" in k or "bag" in k]
    for name in ("wd", "mu"):
        assert tables and any(not torch.equal(out["plain"][k], out[name][k]) for k in tables)


def test_a_ledger_left_by_a_refused_start_does_not_block_the_corrected_run(tmp_path, capsys):
    """A run refused before its first step leaves a ledger with no charged step (and no
    checkpoint): the corrected command starts without --resume and continues that file."""
    from lazydp.ledger import PrivacyLedger

    out_dir = tmp_path / "r"
    PrivacyLedger(out_dir / "ledger.jsonl").close()  # what the refused start left: a header
    args = ["train", "--dataset", "acs", "--max-steps", "2", "--noise-multiplier", "2.0"]
    code, out = run_cli([*args, "--out", str(out_dir), "--json"], capsys)
    assert code == 0, out.err
    ledger = PrivacyLedger(out_dir / "ledger.jsonl")
    assert ledger.steps == 2
    ledger.close()
    code, out = run_cli([*args, "--out", str(out_dir), "--json"], capsys)
    assert code == 1 and "--resume" in out.err  # now it holds charged steps: never reset


def test_distributed_shuffle_is_refused_before_any_worker_starts(tmp_path, capsys):
    out_dir = tmp_path / "r"
    code, out = run_cli(
        [
            "train",
            "--dataset",
            "acs",
            "--nproc-per-node",
            "2",
            "--sampler",
            "shuffle",
            "--out",
            str(out_dir),
        ],
        capsys,
    )
    assert code != 0 and "single-process only" in out.err
    assert not out_dir.exists() or not list(out_dir.glob("ledger*"))


def test_the_shown_epsilon_is_refreshed_by_its_cost_and_at_the_last_step():
    # A PLD figure costs 0.05-0.3 s; the default run refreshed it 8 times (1.8 s of 8.8 s).
    from lazydp.training import _ShownEpsilon

    clock = [0.0]

    class Engine:  # each figure costs 0.1 s of the (simulated) clock and counts the calls
        calls = 0

        def get_epsilon(self, delta: float) -> float:
            clock[0] += 0.1
            Engine.calls += 1
            return float(Engine.calls)

    shown = _ShownEpsilon(Engine(), 1e-5, False, clock=lambda: clock[0])  # type: ignore[arg-type]
    assert Engine.calls == 0  # nothing spent yet: nothing to account
    for _ in range(100):  # 10 s of steps of 0.1 s
        clock[0] += 0.1
        shown.at(False)
    # refreshed on the first step, then once 2 s (20 x 0.1 s) have passed since each refresh
    assert 4 <= Engine.calls <= 6
    before = Engine.calls
    assert shown.at(True) == before + 1  # the last step always shows the final figure
    assert _ShownEpsilon(Engine(), 1e-5, True, clock=lambda: clock[0]).value == before + 2


def test_a_config_key_named_after_the_no_progress_flag_is_read(tmp_path):
    # The help says config keys are the flags' names with underscores; no_progress: true
    # (--no-progress) was refused as an unknown key (the option is called progress).
    from lazydp.cli import build_parser
    from lazydp.cli.train import config_from_args
    from lazydp.errors import ConfigError

    cfg = tmp_path / "c.yaml"
    for text, progress in (("no_progress: true\n", False), ("no_progress: false\n", True)):
        cfg.write_text(f"dataset: acs\n{text}")
        args = build_parser(["train"]).parse_args(["train", "--config", str(cfg)])
        assert config_from_args(args).progress is progress
    cfg.write_text("dataset: acs\nno_progress: maybe\n")
    args = build_parser(["train"]).parse_args(["train", "--config", str(cfg)])
    with pytest.raises(ConfigError, match="no_progress"):
        config_from_args(args)


@pytest.mark.parametrize("dataset", ["acs", "movielens"])
def test_the_released_model_is_rebuilt_from_the_run_directory(tmp_path, capsys, dataset):
    # model.pt held the weights, but nothing said how to rebuild the model around them: the
    # table sizes were only in the data's metadata and the builder was private.
    from lazydp.errors import DataError
    from lazydp.training import load_trained

    out = tmp_path / "r"
    args = ["train", "--dataset", dataset, "--max-steps", "2", "--out", str(out), "--json"]
    assert run_cli(args, capsys)[0] == 0
    model = load_trained(out)
    released = torch.load(out / "model.pt", weights_only=True)
    assert set(model.state_dict()) == set(released)
    for key, t in model.state_dict().items():
        assert torch.equal(t, released[key]), key
    assert not model.training
    spec = json.loads((out / "report.json").read_text())["model"]
    assert spec["kind"] == ("acs" if dataset == "acs" else "dlrm")
    dense = torch.zeros(3, max(spec["num_dense"], 1))
    sparse = [(torch.zeros(3, dtype=torch.long), torch.arange(3)) for _ in spec["table_rows"]]
    assert model(dense, sparse).shape[0] == 3
    (out / "report.json").write_text("{}")
    with pytest.raises(DataError, match='no "model" entry'):
        load_trained(out)


def test_a_second_run_on_a_busy_out_is_refused_before_it_charges(tmp_path, capsys):
    # A --resume while the first run trained was refused only at its first charge, and the
    # first run, the one that lost the race to the ledger, stopped mid-run.
    from lazydp.run_lock import run_lock

    out = tmp_path / "r"
    args = ["train", "--dataset", "acs", "--epochs", "1", "--noise-multiplier", "2.0"]
    args += ["--out", str(out), "--json"]
    out.mkdir()
    with run_lock(out):  # the live run, as another process would hold it
        code, result = run_cli(args, capsys)
        assert code == 1 and "in use by another lazydp train (pid" in result.err
        assert not (out / "ledger.jsonl").exists()  # nothing charged, nothing read
    assert run_cli(args, capsys)[0] == 0  # released at the end of the block
    assert not (out / ".lazydp-train.lock").exists()  # a finished run leaves none behind


def test_the_run_lock_of_a_killed_process_is_gone(tmp_path):
    import subprocess
    import sys

    from lazydp.run_lock import run_lock

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from lazydp.run_lock import run_lock; l = run_lock(Path(sys.argv[1])); "
         "l.__enter__(); print('held', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(Exception, match="in use"), run_lock(tmp_path):
            pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait()
    with run_lock(tmp_path):  # the kernel dropped it with the process
        pass


def test_the_run_lock_refuses_an_unwritable_out_and_runs_where_locks_are_missing(
    tmp_path, monkeypatch
):
    import errno

    from lazydp import run_lock as lock_module
    from lazydp.errors import ConfigError

    real_open = lock_module.os.open

    def refused(path, flags, *args):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(lock_module.os, "open", refused)
    with pytest.raises(ConfigError, match="Permission denied.*give a writable --out"):
        with lock_module.run_lock(tmp_path):
            pass
    monkeypatch.setattr(lock_module.os, "open", real_open)

    def no_locks(fd, op):  # an NFS mount without a lock daemon
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_module.fcntl, "flock", no_locks)
    with lock_module.run_lock(tmp_path):  # unlocked, as the ledger's lock is there
        pass


def test_a_lock_file_removed_under_a_starting_run_is_taken_again(tmp_path, monkeypatch):
    # A finishing run removes its lock file; one that opened it just before holds a lock on a
    # file no one else can open, and must take the file now at the path instead.
    from lazydp import run_lock as lock_module

    real_flock, calls = lock_module.fcntl.flock, []

    def finishing_run_removes_it(fd, op):
        calls.append(fd)
        if len(calls) == 1:
            (tmp_path / lock_module.LOCK_NAME).unlink()
        return real_flock(fd, op)

    monkeypatch.setattr(lock_module.fcntl, "flock", finishing_run_removes_it)
    with lock_module.run_lock(tmp_path):
        assert len(calls) == 2 and (tmp_path / lock_module.LOCK_NAME).exists()
        monkeypatch.setattr(lock_module.fcntl, "flock", real_flock)
        with pytest.raises(Exception, match="in use"), lock_module.run_lock(tmp_path):
            pass  # the file at the path is the one held
