"""The ``lazydp`` command: one entry point, one module per subcommand.

Each subcommand module defines ``add_parser(subparsers)`` (which registers itself and sets
``func`` to its ``run(args) -> dict``). ``run`` returns a JSON-serialisable summary; with
``--json`` that summary is printed as the last line of output, for scripts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

from lazydp.errors import LazyDPError
from lazydp.malloc import tune_malloc

# Order here is the order in `lazydp --help`.
SUBCOMMANDS = ["train", "epsilon", "preprocess", "bench", "env"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazydp",
        description="Differentially private training (DP-SGD, LazyDP) for PyTorch models.",
        epilog="Example: lazydp train   (private DLRM on MovieLens, about a minute on 2 cores)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"lazydp.cli.{name}")
        except ModuleNotFoundError as exc:  # a subcommand whose optional deps are missing
            if exc.name and exc.name.startswith("lazydp.cli"):
                continue
            raise
        module.add_parser(sub)
    return parser


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tune_malloc()  # training and benchmarks reuse freed memory (lazydp/malloc.py)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result: dict[str, Any] = args.func(args)
    except LazyDPError as exc:
        print(f"lazydp {args.command}: error: {exc}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"error": str(exc), "type": type(exc).__name__}))
        return 1
    if getattr(args, "json", False):
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
