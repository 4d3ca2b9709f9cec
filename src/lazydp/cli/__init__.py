"""The ``lazydp`` command: one entry point, one module per subcommand.

Each subcommand module defines ``add_parser(subparsers)`` (which registers itself and sets
``func`` to its ``run(args) -> dict``). ``run`` returns a JSON-serialisable summary; with
``--json`` that summary is printed as the last line of output, for scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import yaml

from lazydp.errors import ConfigError, LazyDPError
from lazydp.malloc import tune_malloc
from lazydp.report import json_text
from lazydp.stop_signals import StoppedBySignal

# Order here is the order in `lazydp --help`.
SUBCOMMANDS = ["train", "epsilon", "preprocess", "bench", "audit", "env"]


class _UsageError(Exception):
    """A command line argparse refused: raised instead of argparse's exit, so that ``main``
    can end a ``--json`` run with its JSON object too (argparse printed none)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is raised (subparsers are made of the same class)."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self, message)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``lazydp`` parser; for a command line that starts with a subcommand (``argv[0]``),
    with that subcommand alone: each module imports what its command runs on (train: torch,
    epsilon: dp_accounting), 2 s that `lazydp preprocess` or `lazydp epsilon` spent importing
    the others'. Help and errors for the subcommand read the same either way."""
    parser = _Parser(
        prog="lazydp",
        description="Differentially private training (DP-SGD, LazyDP) for PyTorch models.",
        epilog="Example: lazydp train   (private DLRM on MovieLens, about 12 seconds on 2 quiet "
        "cores, plus 1-2 s of preprocessing the first time)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = [argv[0]] if argv and argv[0] in SUBCOMMANDS else SUBCOMMANDS
    for name in wanted:
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


def yaml_problem(exc: Exception) -> str:
    """One line for a YAML parse error: what the parser disliked and where (line, column)."""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())


class _UniqueKeys(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML keeps the last silently,
    so `epochs: 5` further down would quietly override the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            norm = key.replace("-", "_") if isinstance(key, str) else key
            try:
                hash(norm)
            except TypeError:  # an unhashable key: safe_load's own error says so below
                continue
            if norm in seen:
                raise yaml.constructor.ConstructorError(
                    problem=f"key {key!r} is given twice (the first would be silently ignored)",
                    problem_mark=key_node.start_mark,
                )
            seen.add(norm)
        return super().construct_mapping(node, deep=deep)


# PyYAML follows YAML 1.1, where a float needs a dot: `scale: 1e-5` was read as the text '1e-5'
# and refused ("got '1e-5'") though it is the number everyone means (YAML 1.2 reads it so).
_UniqueKeys.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml_mapping(path_text: str, flag: str) -> dict[str, Any]:
    """The option: value mapping in the YAML file a ``flag`` names (keys normalised to
    underscores); ConfigError if it is missing, a directory, unreadable, not YAML, or not a
    mapping of text keys."""
    path = Path(path_text)
    if not path.exists():
        raise ConfigError(f"{flag} {path} does not exist; pass a YAML file of options")
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; pass a YAML file of options")
    try:
        loaded = yaml.load(path.read_text(), Loader=_UniqueKeys) or {}  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{flag} {path} is not valid YAML: {yaml_problem(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{flag} {path} cannot be read: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{flag} {path} must hold a mapping of option: value (e.g. `epochs: 5`); got a "
            f"{type(loaded).__name__}"
        )
    bad_keys = [k for k in loaded if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"{flag} {path}: option names must be text; got {bad_keys!r}")
    return {k.replace("-", "_"): val for k, val in loaded.items()}


def _one_line_warnings(command: str) -> Callable[..., None]:
    """A ``warnings.showwarning`` for the command line: ``lazydp CMD: warning: ...``, one line
    on stderr, like its errors. The Python form (file path and source line) points into lazydp,
    which is no use to someone who ran a command; library users keep it."""

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        kind = "" if issubclass(category, UserWarning) else f"{category.__name__}: "
        text = " ".join(str(message).split())
        print(f"lazydp {command}: warning: {kind}{text}", file=file or sys.stderr)

    return show


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:  # as argparse reports it, plus the JSON line scripts read
        exc.parser.print_usage(sys.stderr)
        print(f"{exc.parser.prog}: error: {exc}", file=sys.stderr)
        if "--json" in argv:
            print(json.dumps({"error": f"{exc.parser.prog}: {exc}", "type": "UsageError"}))
        return 2
    tune_malloc()  # training and benchmarks reuse freed memory (lazydp/malloc.py)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        # Scoped to the command: the previous showwarning is back once it returns.
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(args.command)
            result: dict[str, Any] = args.func(args)
    except LazyDPError as exc:
        print(f"lazydp {args.command}: error: {exc}", file=sys.stderr)
        _json_error(args, str(exc), exc)
        return 1
    except StoppedBySignal as exc:  # stopped at a step boundary, with a checkpoint
        print(f"lazydp {args.command}: {exc}", file=sys.stderr)
        _json_error(args, str(exc), exc)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        message = _INTERRUPTED.get(args.command, "interrupted.")
        print(f"lazydp {args.command}: {message}", file=sys.stderr)
        _json_error(args, message, exc)
        return 130
    except BrokenPipeError:
        return _reader_gone()
    if getattr(args, "json", False):
        try:
            print(json_text(result))
        except BrokenPipeError:
            return _reader_gone()
    return 0


#: What a Ctrl-C left behind, per command (others: nothing to say).
_INTERRUPTED = {
    # Every charged step is already in the ledger (written before its noise was drawn).
    "train": "interrupted. The privacy ledger holds every step charged so far; the run "
    "continues from its last checkpoint with --resume.",
    # Its output is built in a temporary directory and renamed into place only when complete.
    "preprocess": "interrupted. An output is renamed into place only once complete, so the "
    "output directory holds the earlier output (if any) or the finished new one, never a part "
    "of one; run the command again for a new one.",
}


def _json_error(args: argparse.Namespace, message: str, exc: BaseException) -> None:
    """With --json, the one JSON object a failed or stopped command ends its output with:
    scripts read the last line, and a run stopped by a scheduler's SIGTERM printed none."""
    if getattr(args, "json", False):
        print(json.dumps({"error": message, "type": type(exc).__name__}))


def _reader_gone() -> int:
    """Exit status for stdout's reader going away (``lazydp epsilon ... | head -1``): no
    traceback. stdout is pointed at /dev/null so that Python's flush at exit cannot raise
    again. Everything a command writes to disk (ledger lines, model.pt) is written before it
    prints, so nothing is lost."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, as a shell reports a process that the signal stopped


if __name__ == "__main__":
    sys.exit(main())
