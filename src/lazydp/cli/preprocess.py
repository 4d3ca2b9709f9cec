"""``lazydp preprocess``: raw Criteo / ACS PUMS / MovieLens files to Parquet training data.

Example:
    $ lazydp preprocess --format movielens --input ratings.csv --output out/ml --json
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from lazydp.cli import _INTERRUPTED, add_json_flag
from lazydp.errors import ConfigError
from lazydp.stop_signals import StoppedBySignal, handling

EPILOG = """\
example:
  $ lazydp preprocess --format criteo --input day_0.tsv --output out/criteo --buckets 262144
  lines: 1000000 rows [00:04, 231481.48 rows/s]
  preprocess[embedded]: 100%|██████████| 5/5 [00:12<00:00,  2.40s/step]
  wrote out/criteo: train 899,913 rows, test 100,087 rows, 0 bad rows (engine embedded)

--buckets takes N (all categorical features) and/or name=N overrides: --buckets 1048576,C3=1000.
Defaults: criteo 2^20 per feature, acs 2^12, movielens userId/movieId 2^16 and genres 2^10.
Bucket 0 is reserved for an empty value. --vocabulary dp replaces hashing by a differentially
private vocabulary (Laplace partition selection, one raw row = one privacy unit) whose
(epsilon, delta) is recorded as privacy_cost in metadata.json.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "preprocess",
        help="raw Criteo/ACS/MovieLens files to Parquet (DuckDB or Spark)",
        description="Preprocess raw files into DIR/train, DIR/test and DIR/metadata.json.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--format", required=True, choices=["criteo", "acs", "movielens"])
    p.add_argument("--input", required=True, nargs="+", metavar="PATH", help="raw file(s)")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument(
        "--engine",
        default="embedded",
        choices=["embedded", "spark"],
        help="embedded = DuckDB in-process (default); spark = PySpark",
    )
    p.add_argument(
        "--spark-master", default=None, metavar="URL", help="Spark master (default local[2])"
    )
    p.add_argument(
        "--spark-wait",
        type=float,
        default=None,
        metavar="S",
        help="seconds a Spark cluster may take to run a first task (default 120; 0: no limit)",
    )
    p.add_argument("--buckets", default=None, metavar="N|name=N,...")
    p.add_argument("--on-bad-row", default="fail", choices=["fail", "skip"])
    p.add_argument("--vocabulary", default="hash", choices=["hash", "dp"])
    p.add_argument("--vocab-epsilon", type=float, default=None, metavar="E")
    p.add_argument("--vocab-delta", type=float, default=None, metavar="D")
    p.add_argument(
        "--vocab-seed",
        default=None,
        help="fixed noise seed for the DP vocabulary (reproducible, NOT private)",
    )
    p.add_argument("--test-fraction", type=float, default=0.1, metavar="F")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lazydp.preprocess import parse_buckets, preprocess
    from lazydp.preprocess.spark import SPARK_WAIT_S

    if args.test_fraction == 0:
        # Allowed in the library (a train-only directory), but `lazydp train` evaluates on the
        # test split and refuses a directory without one: say so now, not after the work.
        raise ConfigError(
            "--test-fraction 0 leaves no test split, and `lazydp train` evaluates on it (it "
            "refuses such a directory); give e.g. --test-fraction 0.1"
        )
    default, per = parse_buckets(args.buckets)
    buckets: int | dict[str, int] | None = default
    if per:
        from lazydp.preprocess.spec import get_format

        spec = get_format(args.format)
        base = default or None
        buckets = {c.name: base or spec.default_buckets[c.name] for c in spec.categorical}
        buckets.update(per)
    with _unwind_on_sigterm():
        meta = preprocess(
            args.format,
            args.input,
            args.output,
            engine=args.engine,
            spark_master=args.spark_master,
            spark_wait_s=SPARK_WAIT_S if args.spark_wait is None else args.spark_wait,
            buckets=buckets,
            on_bad_row=args.on_bad_row,
            vocabulary=args.vocabulary,
            vocab_epsilon=args.vocab_epsilon,
            vocab_delta=args.vocab_delta,
            vocab_seed=args.vocab_seed,
            test_fraction=args.test_fraction,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    rows = meta["rows"]
    if meta["privacy_cost"].get("reproducible_seed"):
        print(
            f"warning: NOT PRIVATE: the vocabulary of {args.output} was selected with a fixed "
            "--vocab-seed, so its noise is known and the selection reveals rare values; "
            "preprocess without --vocab-seed for a private run",
            file=sys.stderr,
        )
    if rows["test"] == 0:
        print(
            f"warning: no row of {args.input} fell into the test split; `lazydp train` "
            "needs one: give more rows or a larger --test-fraction",
            file=sys.stderr,
        )
    print(
        f"wrote {args.output}: train {rows['train']:,} rows, test {rows['test']:,} rows, "
        f"{meta['bad_rows']} bad rows (engine {meta['engine']})"
    )
    return {
        "output": str(args.output),
        **{k: meta[k] for k in ("rows", "bad_rows", "engine", "privacy_cost", "schema")},
    }


@contextmanager
def _unwind_on_sigterm() -> Iterator[None]:
    """SIGTERM (``kill``, ``timeout``, a scheduler's time limit) unwinds the run as Ctrl-C does,
    so that its temporary output is removed; the exit status stays 143. Its default action
    ended the process at once and left ``DIR.tmp-*`` (up to a whole output, DuckDB's spill files
    included) until a later run for the same DIR. Main thread only, as signal handlers are."""
    received: list[int] = []

    def unwind(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        # Ctrl-C's handler: pyspark's cancels the session's jobs first (a KeyboardInterrupt
        # alone broke the Py4J connection mid-job, and pyspark's cleanup then raised from it)
        ctrl_c = signal.getsignal(signal.SIGINT)
        if callable(ctrl_c):
            ctrl_c(signal.SIGINT, frame)
        raise KeyboardInterrupt

    with handling(unwind, (signal.SIGTERM,)):
        try:
            yield
        except KeyboardInterrupt:
            if not received:
                raise
            # DuckDB turns the interrupt into its own error (re-raised as KeyboardInterrupt)
            raise StoppedBySignal(_INTERRUPTED["preprocess"], signal.SIGTERM) from None
