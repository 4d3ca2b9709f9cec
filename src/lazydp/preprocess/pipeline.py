"""``preprocess()``: raw files -> ``DIR/{train,test}/*.parquet`` + ``DIR/metadata.json``.

Contract:
* One logical pipeline (lazydp.preprocess.sql) runs on either engine; for the same input and
  settings both produce the same rows, values, row order (file index, line number) and schema.
* Output is atomic (lazydp.preprocess.output). Bad rows stop the run with a DataError naming the
  file and line (``on_bad_row="fail"``) or are dropped and counted (``"skip"``). A run that
  would leave the train split empty (header-only input, every row bad or filtered out, every
  row in the test split) stops with a DataError saying which; the test split may be empty
  (``test_fraction=0``, or tiny inputs), which ``metadata.json`` records as ``rows.test == 0``.
* ``metadata.json``: row counts, schema (dense names, categorical names with table sizes that
  include the reserved ids, multi-valued flags), parameters, engine, ``privacy_cost`` (what the DP
  vocabulary spent, zero for hashing), ``bad_rows``, lazydp version.
"""

from __future__ import annotations

import csv
import math
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lazydp.errors import ConfigError, DataError
from lazydp.preprocess import sql
from lazydp.preprocess.engine import Engine
from lazydp.preprocess.lines import NOT_UTF8, check_compression
from lazydp.preprocess.output import (
    SCHEMA_VERSION,
    atomic_directory,
    disk_full_named,
    write_metadata,
)
from lazydp.preprocess.spark import SPARK_WAIT_S
from lazydp.preprocess.spec import FormatSpec, get_format
from lazydp.preprocess.vocabulary import check_seed, new_seed, split_budget

ENGINES = ("embedded", "spark")
SPILL_DIR = ".spill"  # DuckDB spill files, inside the temporary output so they vanish with it


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings of one run (validated on construction; errors name the argument)."""

    format: str
    buckets: dict[str, int] = field(default_factory=dict)  # per feature; missing -> format default
    default_buckets: int | None = None  # overrides the format default for every feature
    on_bad_row: str = "fail"
    vocabulary: str = "hash"
    vocab_epsilon: float | None = None
    vocab_delta: float | None = None
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        spec = get_format(self.format)
        names = {c.name for c in spec.categorical}
        for name, b in self.buckets.items():
            if name not in names:
                raise ConfigError(
                    f"buckets: feature {name!r} is not a categorical feature of {self.format}; "
                    f"use one of {sorted(names)}"
                )
            _check_buckets(f"buckets[{name}]", b)
        if self.default_buckets is not None:
            _check_buckets("buckets", self.default_buckets)
        if self.on_bad_row not in ("fail", "skip"):
            raise ConfigError(f"on_bad_row={self.on_bad_row!r}; use 'fail' or 'skip'")
        if self.vocabulary not in ("hash", "dp"):
            raise ConfigError(f"vocabulary={self.vocabulary!r}; use 'hash' or 'dp'")
        if self.vocabulary == "dp" and (self.vocab_epsilon is None or self.vocab_delta is None):
            raise ConfigError(
                "vocabulary='dp' needs vocab_epsilon and vocab_delta (on the command line "
                "--vocab-epsilon and --vocab-delta, e.g. 1.0 and 1e-6)"
            )
        if self.vocabulary == "hash" and (self.vocab_epsilon or self.vocab_delta):
            raise ConfigError("vocab_epsilon/vocab_delta are only used with vocabulary='dp'")
        if self.vocabulary == "dp" and (self.buckets or self.default_buckets is not None):
            # The DP vocabulary sizes every table itself (the values it keeps, plus one row
            # for the rest): buckets were silently ignored, yet recorded in metadata.json.
            raise ConfigError(
                "buckets (--buckets) set the hashed tables' sizes; with vocabulary='dp' each "
                "table holds the values the private vocabulary keeps plus one row for all "
                "others. Drop buckets, or use vocabulary='hash'."
            )
        tf = self.test_fraction
        if not (isinstance(tf, (int, float)) and 0.0 <= tf < 1.0 and not math.isnan(tf)):
            raise ConfigError(f"test_fraction={tf!r} must lie in [0, 1), e.g. 0.1")

    def table_buckets(self, spec: FormatSpec) -> dict[str, int]:
        base = {
            c.name: self.default_buckets or spec.default_buckets[c.name] for c in spec.categorical
        }
        return {**base, **self.buckets}


def _check_buckets(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 2 <= value <= 2**40:
        raise ConfigError(f"{name}={value!r} must be an integer in [2, 2^40] (id 0 is reserved)")


def parse_buckets(text: str | None) -> tuple[int | None, dict[str, int]]:
    """Parse ``--buckets``: ``N`` for all features, and/or ``name=N`` overrides, comma-separated.

    Example: ``parse_buckets("4096,C1=100") == (4096, {"C1": 100})``.
    """
    default, per = None, {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, _, number = item.rpartition("=")
        try:
            value = int(number)
        except ValueError:
            raise ConfigError(
                f"buckets={text!r}: {item!r} is not N or name=N; e.g. --buckets 1048576,C3=1000"
            ) from None
        if name:
            per[name] = value
        else:
            default = value
    return default, per


def _version() -> str:
    try:
        return importlib_metadata.version("lazydp")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def _positions(spec: FormatSpec, path: str, header: str | None) -> tuple[dict[str, int], int]:
    if not spec.has_header:
        return {c: i + 1 for i, c in enumerate(spec.columns)}, len(spec.columns)
    if header is None:
        raise DataError(f"{path}: empty file; a {spec.name} file starts with a header line")
    # A byte-order mark (Excel's "CSV UTF-8") would glue itself to the first column's name.
    names = next(csv.reader([header.removeprefix("\ufeff")]))
    missing = [c for c in spec.columns if c not in names]
    if missing:
        raise DataError(
            f"{path}, line 1: header lacks column(s) {missing}; a {spec.name} header needs "
            f"{spec.columns}"
        )
    twice = sorted({c for c in spec.columns if names.count(c) > 1})
    if twice:  # which of the two holds the data? The last one would win, silently.
        raise DataError(
            f"{path}, line 1: header names column(s) {twice} more than once; a {spec.name} "
            "header names each of its columns once (rename or drop the extra one)"
        )
    return {n: i + 1 for i, n in enumerate(names)}, len(names)


def _run(
    engine: Engine, cfg: PreprocessConfig, paths: list[str], tmp: Path, seed: Any
) -> dict[str, Any]:
    spec, d = get_format(cfg.format), engine.dialect
    steps = tqdm(
        total=5,
        desc=f"preprocess[{engine.name}]",
        unit="step",
        file=sys.stderr,
        disable=not getattr(engine, "progress", True),
    )
    headers = engine.load_lines(paths)
    _check_text(engine, paths)
    for i, (path, header) in enumerate(zip(paths, headers)):
        positions, n_expected = _positions(spec, path, header)
        engine.view(f"parsed_{i}", sql.parse_file_sql(d, spec, i, positions, n_expected))
    engine.view("checked", sql.checked_sql(d, spec, len(paths)), materialize=True)
    steps.update()
    first_bad = engine.query(sql.first_bad_sql())
    n_bad = int(engine.query(sql.count_bad_sql())[0][0]) if first_bad else 0
    examples = [{"file": paths[f], "line": int(n), "reason": r} for f, n, r in first_bad]
    if first_bad and cfg.on_bad_row == "fail":
        e = examples[0]
        raise DataError(
            f"{e['file']}, line {e['line']}: {e['reason']} ({n_bad} bad row(s) in all); fix the "
            "input or pass --on-bad-row skip to drop and count them"
        )
    engine.view("prepared", sql.prepared_sql(d, spec, cfg.test_fraction), materialize=True)
    _require_train_rows(engine, spec, cfg, paths, n_bad)
    steps.update()

    dp = cfg.vocabulary == "dp"
    buckets = None if dp else cfg.table_buckets(spec)  # the DP vocabulary sizes its tables
    if buckets is None:
        table_sizes, privacy_cost = _dp_vocabulary(engine, spec, cfg, tmp, seed)
    else:
        table_sizes, privacy_cost = buckets, {"epsilon": 0.0, "delta": 0.0}
    steps.update()
    engine.view("output", sql.output_sql(d, spec, table_sizes, dp), materialize=True)
    for split in ("train", "test"):
        engine.write_parquet(sql.split_output_sql(d, spec, split == "test"), tmp / split)
    steps.update()
    counts = dict(engine.query("SELECT is_test, COUNT(*) FROM output GROUP BY is_test"))
    steps.update()
    steps.close()
    return {
        "format": cfg.format,
        "engine": engine.name,
        "rows": {"train": int(counts.get(False, 0)), "test": int(counts.get(True, 0))},
        "bad_rows": n_bad,
        "bad_row_examples": examples,
        "inputs": paths,
        "schema": {
            "label": "label",
            "identity": ["file_idx", "line_no"],
            "dense": [n for n, _ in spec.dense],
            "categorical": [
                {
                    "name": c.name,
                    "table_size": int(table_sizes[c.name]),
                    "multi_valued": c.multi_valued,
                }
                for c in spec.categorical
            ],
        },
        "parameters": {**asdict(cfg), "buckets": buckets},
        "privacy_cost": privacy_cost,
        "schema_version": SCHEMA_VERSION,
        "lazydp_version": _version(),
    }


def _require_train_rows(
    engine: Engine, spec: FormatSpec, cfg: PreprocessConfig, paths: list[str], n_bad: int
) -> None:
    """DataError when no row would reach the train split: such a directory cannot be trained on
    (``lazydp train`` samples from it) and would fail far from the cause."""
    counts = dict(engine.query("SELECT is_test, COUNT(*) FROM prepared GROUP BY is_test"))
    train, test = int(counts.get(False, 0)), int(counts.get(True, 0))
    if train:
        return
    if test:
        why = (
            f"all {test} row(s) fell into the test split (test_fraction={cfg.test_fraction}); "
            "give more rows or a smaller --test-fraction"
        )
    else:
        n_rows = int(engine.query("SELECT COUNT(*) FROM checked")[0][0])
        if n_rows == 0:
            header = " besides the header line" if spec.has_header else ""
            why = f"the input holds no data rows{header}; check --input"
        elif n_bad == n_rows:
            why = (
                f"all {n_rows} data row(s) are bad and were skipped; rerun with --on-bad-row "
                "fail to see the first bad line, and fix the input"
            )
        else:
            kept = " (acs keeps 16 < AGEP < 90 and PWGTP >= 1)" if spec.name == "acs" else ""
            why = (
                f"the {spec.name} format's row filter dropped all {n_rows - n_bad} good "
                f"row(s){kept}; check that the input is what --format {spec.name} expects"
            )
    shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    raise DataError(f"{shown}: no training rows: {why}")


def _dp_vocabulary(
    engine: Engine, spec: FormatSpec, cfg: PreprocessConfig, tmp: Path, seed: Any
) -> tuple[dict[str, int], dict[str, Any]]:
    """Select each feature's vocabulary; returns table sizes and the privacy cost."""
    d = engine.dialect
    epsilon, delta = float(cfg.vocab_epsilon or 0.0), float(cfg.vocab_delta or 0.0)
    selections = split_budget(epsilon, delta, {c.name: c.max_values for c in spec.categorical})
    key = new_seed(seed)
    table_sizes = {}
    for c in spec.categorical:
        s = selections[c.name]
        sel = sql.LaplaceSelection(s.scale, s.threshold, key)
        engine.view(f"vocab_{c.name}", sql.vocab_sql(d, c, sel), materialize=True)
        kept = int(engine.query(f"SELECT COUNT(*) FROM vocab_{c.name}")[0][0])
        table_sizes[c.name] = kept + 2  # 0 = missing, 1..V kept, V + 1 = other
        if c.multi_valued:
            engine.view(f"mapped_{c.name}", sql.mapped_multi_sql(d, c, kept + 1), materialize=True)
        engine.write_parquet(sql.vocab_output_sql(d, c.name), tmp / "vocab" / c.name)
    privacy_cost = {
        "epsilon": epsilon,
        "delta": delta,
        "mechanism": "laplace_partition_selection",
        "privacy_unit": "one raw row",
        "composition": "basic, split evenly over the categorical features",
        "per_feature": {
            n: {
                "epsilon": s.epsilon,
                "delta": s.delta,
                "max_values_per_row": s.max_values,
                "laplace_scale": s.scale,
                "threshold": s.threshold,
            }
            for n, s in selections.items()
        },
        "reproducible_seed": seed is not None,
    }
    return table_sizes, privacy_cost


def preprocess(
    format: str,
    inputs: list[str | Path],
    output: str | Path,
    *,
    engine: str = "embedded",
    spark_master: str | None = None,
    spark: Any = None,
    spark_wait_s: float = SPARK_WAIT_S,
    buckets: int | dict[str, int] | None = None,
    on_bad_row: str = "fail",
    vocabulary: str = "hash",
    vocab_epsilon: float | None = None,
    vocab_delta: float | None = None,
    vocab_seed: int | str | None = None,
    test_fraction: float = 0.1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Preprocess raw files into a training directory; returns the metadata written.

    Example::

        meta = preprocess("criteo", ["day_0.tsv"], "out/criteo", buckets=2**18)
        print(meta["rows"])  # {'train': ..., 'test': ...}
    """
    default, per = (buckets, {}) if isinstance(buckets, int) or buckets is None else (None, buckets)
    cfg = PreprocessConfig(
        format,
        dict(per),
        default,
        on_bad_row,
        vocabulary,
        vocab_epsilon,
        vocab_delta,
        test_fraction,
    )
    if engine not in ENGINES:
        raise ConfigError(f"engine={engine!r}; use one of {ENGINES}")
    _check_wait(spark_wait_s)
    check_seed(vocab_seed)  # now, not after the input is read
    if not inputs:
        raise ConfigError("inputs is empty; give at least one raw file")
    paths = [str(p) for p in inputs]
    _check_inputs(paths, engine)
    _check_output(output)
    paths = [p if "://" in p else str(Path(p).resolve()) for p in paths]
    # A full disk is named as such inside atomic_directory, which removes the partial output.
    with (
        atomic_directory(output, overwrite=overwrite, inputs=paths) as tmp,
        disk_full_named(output),
    ):
        eng = _make_engine(engine, tmp, spark_master, spark, progress, spark_wait_s)
        try:
            meta = _run(eng, cfg, paths, tmp, vocab_seed)
        finally:
            eng.close()
        shutil.rmtree(tmp / SPILL_DIR, ignore_errors=True)
        write_metadata(tmp, meta)
    return meta


def _check_text(engine: Engine, paths: list[str]) -> None:
    """DataError at the first line that is not UTF-8 or holds U+FFFD. Spark's text source
    keeps bytes that are not UTF-8 (shown as U+FFFD) where the embedded reader refuses them
    (lines.py), so the engines would hash different text; refusing both in both keeps their
    outputs the same."""
    bad = "line LIKE '%\ufffd%'"
    if engine.name == "spark":  # the embedded engine's lines are valid UTF-8 already
        bad += " OR NOT is_valid_utf8(line)"
    found = engine.query(
        f"SELECT file_idx, min(line_no) FROM lines WHERE {bad} "
        "GROUP BY file_idx ORDER BY file_idx LIMIT 1"
    )
    if found:
        file_idx, line_no = found[0]
        raise DataError(f"{paths[int(file_idx)]}, line {int(line_no)}: {NOT_UTF8}")


def _check_output(output: str | Path) -> None:
    """ConfigError for an output given as a URI (``file:///d``, ``hdfs://nn/d``). The output is
    a local directory made complete by a local rename (lazydp.preprocess.output): pathlib read
    ``file:///d`` as the relative ``./file:/d`` (metadata.json went there) while Spark wrote the
    Parquet files to ``/d.tmp-*``, and the run reported success."""
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", str(output)):
        raise ConfigError(
            f"output={str(output)!r} looks like a URI; give a local directory path (on a "
            "cluster one that every executor sees at the same path, such as a shared mount), "
            "and for a directory whose name has a ':' write it as ./NAME"
        )


def _check_inputs(paths: list[str], engine: str) -> None:
    """ConfigError for a local input that is not a file, one given twice (its records would
    count twice: in training and in a DP vocabulary, whose costs assume one record per
    person), or, on Spark, a name Spark would read otherwise than named; DataError for one
    compressed otherwise than as .gz (lazydp.preprocess.lines.check_compression)."""
    seen: dict[tuple[int, int], str] = {}
    for p in paths:
        if "://" in p:
            continue  # a URI (hdfs://, s3a://): Spark's to read
        path = Path(p)
        if not path.is_file():
            hint = f" (for the files in it, pass {p.rstrip('/')}/*)" if path.is_dir() else ""
            raise ConfigError(f"input {p!r} is not a file; check the path{hint}")
        st = path.stat()
        first = seen.get((st.st_dev, st.st_ino))
        if first is not None:
            raise ConfigError(
                f"input {p!r} is given twice (as {first!r} too, or through a link): its "
                "records would be read twice and count as two people each, in training and "
                "in a DP vocabulary. Give each file once."
            )
        seen[(st.st_dev, st.st_ino)] = p
        check_compression(path)  # both engines: Spark decompresses more than .gz
        if engine == "spark":
            # Spark is given the resolved path (links followed): check that one.
            real = path.resolve()
            odd = [c for c in "*?[]{}\\" if c in str(real)] or ":" in real.name
            if real.name.startswith(("_", ".")) or odd:
                raise ConfigError(
                    f"input {p!r} (the file {str(real)!r}): Spark reads a file whose name "
                    "starts with '_' or '.' as hidden (zero rows, no error), a path with "
                    "* ? [ ] { } or \\ as a pattern, and fails on a ':' in a file name. Copy "
                    "or rename it, or use --engine embedded."
                )


def _check_wait(wait_s: Any) -> None:
    if (
        not isinstance(wait_s, (int, float))
        or isinstance(wait_s, bool)
        or not 0 <= wait_s < math.inf
    ):
        raise ConfigError(
            f"spark_wait_s={wait_s!r} must be a number of seconds >= 0 (0 waits without limit)"
        )


def _make_engine(
    name: str, tmp: Path, master: str | None, spark: Any, progress: bool, wait_s: float
) -> Engine:
    if name == "embedded":
        from lazydp.preprocess.embedded import EmbeddedEngine

        return EmbeddedEngine(tmp / SPILL_DIR, progress=progress)
    try:
        from lazydp.preprocess.spark import SparkEngine
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError("engine='spark' needs pyspark: pip install 'lazydp[spark]'") from exc
    return SparkEngine(spark, master, progress, wait_s)
