"""Preprocessing throughput: embedded (DuckDB) vs Spark local mode vs a plain pandas baseline.

Run:  python benchmarks/preprocess_bench.py --rows 1000000   (generates the TSV once, cached)

All three run the same steps on a Criteo-format TSV (validation, log1p of 13 integer fields,
md5-hashed ids of 26 categorical fields, hash split, Parquet output). Spark's session start-up
is timed separately from its processing. Prints rows/s and the ratio to pandas.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from lazydp.preprocess import preprocess
from lazydp.preprocess.sql import SPLIT_RESOLUTION


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """Random Criteo-like rows: skewed integers (some negative), hex ids, ~10% empties."""
    rng = np.random.default_rng(seed)
    chunk = 100_000
    with open(path, "w") as f:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            cols = [rng.integers(0, 2, n).astype(str)]
            for _ in range(13):
                v = np.floor(rng.lognormal(1.5, 2.0, n)).astype(np.int64) - rng.integers(0, 2, n)
                s = v.astype(str).astype(object)
                s[rng.random(n) < 0.1] = ""
                cols.append(s)
            for _ in range(26):
                ids = rng.zipf(1.2, n) % (1 << 32)
                s = np.char.mod("%08x", ids).astype(object)
                s[rng.random(n) < 0.1] = ""
                cols.append(s)
            lines = ["\t".join(r) for r in zip(*cols)]
            f.write("\n".join(lines) + "\n")


def _h60(text: str) -> int:
    return int(hashlib.md5(text.encode()).hexdigest()[:15], 16)


def pandas_baseline(src: Path, out: Path, buckets: int, test_fraction: float = 0.1) -> int:
    """The same steps in plain pandas (single-threaded; hashing in Python)."""
    with open(src, encoding="utf-8") as f:
        lines = f.read().splitlines()
    frame = pd.Series(lines).str.split("\t", expand=True, regex=False).fillna("")
    ok = frame.notna().all(axis=1) & (frame.shape[1] == 40)
    ok &= frame[0].isin(["0", "1"])
    for i in range(1, 14):
        ok &= (frame[i] == "") | frame[i].str.fullmatch(r"-?[0-9]{1,18}")
    for i in range(14, 40):
        ok &= (frame[i] == "") | frame[i].str.fullmatch(r"[0-9a-fA-F]{1,16}")
    frame = frame[ok]
    result = pd.DataFrame({"label": frame[0].astype(np.float32)})
    for i in range(1, 14):
        x = pd.to_numeric(frame[i].replace("", "0")).clip(lower=0)
        result[f"I{i}"] = np.log(x.astype(np.float64) + 1.0).astype(np.float32)
    for i in range(14, 40):
        name = f"C{i - 13}"
        result[name] = [
            0 if v == "" else 1 + _h60(f"{name}\x1f{v}") % (buckets - 1)
            for v in frame[i].str.lower()
        ]
    threshold = round(test_fraction * SPLIT_RESOLUTION)
    test = np.array(
        [_h60(f"split\x1f{ln}") % SPLIT_RESOLUTION < threshold for ln in np.array(lines)[ok]]
    )
    out.mkdir(parents=True)
    result[~test].to_parquet(out / "train.parquet")
    result[test].to_parquet(out / "test.parquet")
    return len(result)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--buckets", type=int, default=1 << 20)
    ap.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "lazydp-bench"))
    ap.add_argument("--skip-spark", action="store_true")
    ap.add_argument("--skip-pandas", action="store_true")
    args = ap.parse_args()
    data = Path(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    src = data / f"criteo_{args.rows}.tsv"
    if not src.exists():
        t = time.perf_counter()
        generate(src, args.rows)
        print(
            f"generated {src} ({src.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f} s"
        )
    results: dict[str, float] = {}
    out = data / "out"
    shutil.rmtree(out, ignore_errors=True)

    t = time.perf_counter()
    preprocess("criteo", [src], out / "embedded", buckets=args.buckets, progress=False)
    results["embedded (DuckDB)"] = time.perf_counter() - t

    if not args.skip_spark:
        from lazydp.preprocess.spark import spark_session

        t = time.perf_counter()
        spark = spark_session("local[2]")
        spark.range(1).count()
        results["spark start-up"] = time.perf_counter() - t
        t = time.perf_counter()
        preprocess("criteo", [src], out / "spark", engine="spark", spark=spark,
                   buckets=args.buckets, progress=False)  # fmt: skip
        results["spark local[2]"] = time.perf_counter() - t
        spark.stop()
        same = all(
            pq.read_table(out / "embedded" / s).equals(
                pq.read_table(out / "spark" / s).replace_schema_metadata(None)
            )
            for s in ("train", "test")
        )
        print(f"spark output identical to embedded: {same}")
    if not args.skip_pandas:
        t = time.perf_counter()
        pandas_baseline(src, out / "pandas", args.buckets)
        results["pandas (reference)"] = time.perf_counter() - t

    base = results.get("pandas (reference)")
    print(
        f"\n{args.rows:,} Criteo rows\n{'engine':<22}{'seconds':>10}{'rows/s':>14}{'vs pandas':>11}"
    )
    for name, seconds in results.items():
        if name == "spark start-up":
            print(f"{name:<22}{seconds:>10.1f}{'':>14}{'':>11}")
            continue
        ratio = f"{base / seconds:.2f}x" if base else "-"
        print(f"{name:<22}{seconds:>10.1f}{args.rows / seconds:>14,.0f}{ratio:>11}")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
