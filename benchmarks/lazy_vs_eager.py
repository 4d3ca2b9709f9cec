"""Issue 3's benchmark: lazydp against sgd and dpsgd_f as the embedding tables grow.

    python benchmarks/lazy_vs_eager.py        # about 15 minutes on 2 shared cores

Runs `lazydp bench --sweep configs/bench_lazy_vs_eager.yaml` (10 tables of 1M, 3M, 10M rows,
d=32, pooling 1 and 20, batch 2048; sgd and lazydp round robin in one process, on one shared set
of tables where two do not fit,
dpsgd_f in its own) and prints, per table size, lazydp / sgd
(target <= 1.3) and dpsgd_f / lazydp (the gap must widen as tables grow). Outputs land in
runs/lazy-vs-eager/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lazydp.bench.report import markdown_summary
from lazydp.cli import main

OUT = Path("runs/lazy-vs-eager")

if __name__ == "__main__":
    argv = ["bench", "--sweep", "configs/bench_lazy_vs_eager.yaml", "--out", str(OUT)]
    code = main([*argv, *sys.argv[1:]])
    if code == 0:
        summary = json.loads((OUT / "bench.json").read_text())["summary"]
        print(f"\n`lazydp {' '.join(argv)}`\n\n{markdown_summary(summary)}")
    sys.exit(code)
