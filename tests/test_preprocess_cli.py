"""`lazydp preprocess` through lazydp.cli.main."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lazydp.cli import main
from lazydp.errors import ConfigError
from lazydp.preprocess.pipeline import parse_buckets

FIX = Path(__file__).parent / "fixtures"


def test_cli_writes_output_and_json_summary(tmp_path, capsys):
    out = tmp_path / "ml"
    rc = main(["preprocess", "--format", "movielens", "--input", str(FIX / "movielens_small.csv"),
               "--output", str(out), "--buckets", "4096,genres=64", "--test-fraction", "0.25",
               "--no-progress", "--json"])  # fmt: skip
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    sizes = {c["name"]: c["table_size"] for c in summary["schema"]["categorical"]}
    assert sizes == {"userId": 4096, "movieId": 4096, "genres": 64}
    assert summary["rows"]["train"] + summary["rows"]["test"] == 12
    assert pq.read_table(out / "train").column("genres").type.value_type.bit_width == 64


def test_cli_bad_row_exit_code_and_message(tmp_path, capsys):
    rc = main(["preprocess", "--format", "criteo", "--input", str(FIX / "criteo_bad.tsv"),
               "--output", str(tmp_path / "o"), "--no-progress", "--json"])  # fmt: skip
    assert rc == 1
    captured = capsys.readouterr()
    assert "criteo_bad.tsv, line 3" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["type"] == "DataError"
    rc = main(["preprocess", "--format", "criteo", "--input", str(FIX / "criteo_bad.tsv"),
               "--output", str(tmp_path / "o"), "--on-bad-row", "skip", "--no-progress"])  # fmt: skip
    assert rc == 0 and "4 bad rows" in capsys.readouterr().out


def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["preprocess", "--help"])
    text = capsys.readouterr().out
    assert "$ lazydp preprocess --format criteo" in text and "wrote out/criteo" in text


def test_parse_buckets():
    assert parse_buckets("1048576,C3=1000") == (1048576, {"C3": 1000})
    assert parse_buckets(None) == (None, {})
    with pytest.raises(ConfigError, match="not N or name=N"):
        parse_buckets("C3=lots")


def test_cli_refuses_an_empty_test_split_up_front(tmp_path, capsys):
    out = tmp_path / "ml"
    rc = main(["preprocess", "--format", "movielens", "--input", str(FIX / "movielens_small.csv"),
               "--output", str(out), "--test-fraction", "0", "--no-progress"])  # fmt: skip
    assert rc == 1 and not out.exists()
    assert "--test-fraction 0.1" in capsys.readouterr().err


def test_cli_warns_when_no_row_fell_into_the_test_split(tmp_path, capsys):
    rc = main(["preprocess", "--format", "movielens", "--input", str(FIX / "movielens_small.csv"),
               "--output", str(tmp_path / "ml"), "--test-fraction", "0.000001",
               "--no-progress"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0 and "test 0 rows" in captured.out
    assert "warning: no row" in captured.err


def test_cli_refuses_a_vocab_seed_with_a_backslash_cleanly(tmp_path, capsys):
    # The seed goes into an SQL string literal, which refuses backslashes (Spark would unescape
    # them); it used to escape as a bare ValueError traceback after the input was read.
    rc = main(["preprocess", "--format", "movielens", "--input", str(FIX / "movielens_small.csv"),
               "--output", str(tmp_path / "o"), "--vocabulary", "dp", "--vocab-epsilon", "1",
               "--vocab-delta", "1e-6", "--vocab-seed", "a\\b", "--no-progress"])  # fmt: skip
    assert rc == 1
    assert "vocab_seed='a\\\\b' must not contain a backslash" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_says_a_seeded_vocabulary_is_not_private(tmp_path, capsys):
    # --vocab-seed makes the noise known: say so where the vocabulary is made, not only in a
    # later training report (the vocabulary directory can be shared without training on it).
    args = ["preprocess", "--format", "movielens", "--input", str(FIX / "movielens_small.csv"),
            "--vocabulary", "dp", "--vocab-epsilon", "30", "--vocab-delta", "0.3",
            "--test-fraction", "0.25", "--no-progress"]  # fmt: skip
    assert main([*args, "--output", str(tmp_path / "s"), "--vocab-seed", "1"]) == 0
    assert "NOT PRIVATE" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "r")]) == 0
    assert "NOT PRIVATE" not in capsys.readouterr().err


def modules_after(argv: list[str]) -> dict[str, bool]:
    """Whether torch and dp_accounting were imported by ``main(argv)``, in a fresh process."""
    import subprocess
    import sys

    code = (
        "import contextlib, json, sys; from lazydp.cli import main\n"
        "with contextlib.redirect_stdout(sys.stderr):\n"
        "    try: assert main(sys.argv[1:]) == 0\n"
        "    except SystemExit as exc: assert exc.code == 0  # --help\n"
        "print(json.dumps({m: m in sys.modules for m in ('torch', 'dp_accounting')}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True
    )
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_commands_import_only_what_they_run_on(tmp_path):
    # Every command built every subcommand's parser, and `import lazydp` imported the engine:
    # 2 of the 3 s a small `lazydp preprocess` took went to imports it never used.
    argv = ["preprocess", "--format", "movielens", "--input", str(FIX / "movielens_small.csv"),
            "--output", str(tmp_path / "ml"), "--no-progress", "--json"]  # fmt: skip
    assert modules_after(argv) == {"torch": False, "dp_accounting": False}
    argv = ["epsilon", "--sample-rate", "0.04", "--noise-multiplier", "1", "--steps", "10",
            "--delta", "1e-5", "--json"]  # fmt: skip
    assert modules_after(argv) == {"torch": False, "dp_accounting": True}
    assert modules_after(["train", "--help"]) == {"torch": False, "dp_accounting": False}


def test_sigterm_removes_the_temporary_output_and_says_so(tmp_path):
    # SIGTERM (kill, `timeout`, a scheduler's time limit) ended the process at once: DIR.tmp-*
    # (up to a whole output, DuckDB's spill files included) stayed until a later run for the
    # same DIR. It now unwinds as Ctrl-C does; the exit status stays 143.
    import subprocess
    import sys

    code = (
        "import os, signal, sys\n"
        "from lazydp.cli import main\n"
        "from lazydp.preprocess.embedded import EmbeddedEngine\n"
        "EmbeddedEngine.write_parquet = lambda *a: os.kill(os.getpid(), signal.SIGTERM)\n"
        "sys.exit(main(sys.argv[1:]))"
    )
    argv = ["preprocess", "--format", "criteo", "--input", str(FIX / "criteo_small.tsv"),
            "--output", str(tmp_path / "o"), "--no-progress"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert proc.returncode == 143
    assert "interrupted" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []
