"""Gaussian noise throughput: torch's single-generator ``normal_`` vs lazydp's GaussianNoise.

    python benchmarks/noise_throughput.py [--sizes 1M,16M,64M] [--repeats 5] [--threads N]

Prints samples/s (best of ``--repeats``) for float32 tensors, and the ratio to torch measured
side by side in the same run (so background load affects both alike). Not a test.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch

from lazydp.noise import GaussianNoise

_UNITS = {"K": 1 << 10, "M": 1 << 20}


def parse_size(text: str) -> int:
    """``"16M"`` -> 16777216.

    >>> parse_size("1M"), parse_size("300")
    (1048576, 300)
    """
    text = text.strip().upper()
    return int(text[:-1]) * _UNITS[text[-1]] if text[-1] in _UNITS else int(text)


def best_rates(
    fills: dict[str, Callable[[], object]], numel: int, repeats: int
) -> dict[str, float]:
    """Samples/s of the fastest of ``repeats`` calls of each fill, timed in interleaved rounds.

    Interleaving means a burst of background load hits every contender, not just one.
    """
    best = dict.fromkeys(fills, float("inf"))
    for round_ in range(repeats + 1):
        for name, fill in fills.items():
            start = time.perf_counter()
            fill()
            if round_:  # round 0 is the warm-up (thread pool, scratch buffers, page faults)
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: numel / seconds for name, seconds in best.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,16M,64M", help="comma-separated element counts")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--threads", type=int, default=None, help="GaussianNoise threads")
    args = parser.parse_args(argv)

    print(f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, float32")
    header = f"{'elements':>10} {'torch normal_':>14} {'lazydp normal_':>15} {'ratio':>6}"
    print(header + f" {'lazydp add_normal_':>19} {'ratio':>6}   (M samples/s)")
    for numel in (parse_size(s) for s in args.sizes.split(",")):
        out = torch.empty(numel)
        gen = torch.Generator().manual_seed(0)
        noise = GaussianNoise(threads=args.threads)  # unseeded: the production path
        rates = best_rates(
            {
                "torch": partial(out.normal_, generator=gen),
                "normal_": partial(noise.normal_, out),
                "add_normal_": partial(noise.add_normal_, out, 1.0),
            },
            numel,
            args.repeats,
        )
        base, fill, add = rates["torch"], rates["normal_"], rates["add_normal_"]
        print(
            f"{numel:>10} {base / 1e6:>14.0f} {fill / 1e6:>15.0f} {fill / base:>6.2f}"
            f" {add / 1e6:>19.0f} {add / base:>6.2f}"
        )


if __name__ == "__main__":
    main()
