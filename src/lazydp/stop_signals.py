"""Stop a training run at a step boundary on Ctrl-C or SIGTERM, with a checkpoint.

Why: every step a run takes is charged to its privacy ledger before its noise is drawn. A run
killed mid-way (a scheduler's SIGTERM, Ctrl-C) with ``--checkpoint-every 0`` used to leave a
ledger of spent budget and nothing to resume from. Stopping in the middle of a step is not
safe either (a charged step half applied). So the first signal only asks: the loop finishes the
step it is in, writes a checkpoint and raises :class:`StoppedBySignal`, and ``--resume``
continues from there. A second signal interrupts at once (KeyboardInterrupt), as before.
Once training is over, a signal waits for model.pt the same way (``after`` says so).

Only in the main thread of a single-process run: under torchrun each rank would stop at its own
step and the others would wait in a collective for ever; there the launcher's own handling and
``--checkpoint-every`` apply.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["StopRequest", "StoppedBySignal", "handling", "stop_on_signals"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
Handler = Callable[[int, FrameType | None], Any]


class StoppedBySignal(KeyboardInterrupt):
    """The run stopped at a step boundary after a signal; ``str()`` says where it left things."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process ended by that signal


class StopRequest:
    """Set by the first SIGINT/SIGTERM while installed; polled between steps."""

    def __init__(self, after: str = "this step and writing a checkpoint") -> None:
        self.signum: int | None = None
        self.after = after  # what the run still does before it stops, for the notice

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second signal: stop now, and say what is left
            print(
                f"\nlazydp: {signal.Signals(signum).name} again: stopping now, without "
                "finishing the step; the ledger holds every charged step. Continue from the "
                "last checkpoint with the same command and --resume.",
                file=sys.stderr,
            )
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\nlazydp: {signal.Signals(signum).name} received: stopping after {self.after} "
            "(send it again to stop at once).",
            file=sys.stderr,
        )


@contextmanager
def stop_on_signals(
    enabled: bool = True, after: str = "this step and writing a checkpoint"
) -> Iterator[StopRequest]:
    """Install the handlers for the block (main thread only; elsewhere a no-op request);
    ``after`` says what the run finishes before it stops."""
    request = StopRequest(after)
    with handling(request._handle, _SIGNALS if enabled else ()):
        yield request


@contextmanager
def handling(handler: Handler, signums: Iterable[int]) -> Iterator[None]:
    """``handler`` for ``signums`` during the block, the previous handlers restored after it.
    Python runs signal handlers in the main thread only, so elsewhere nothing is installed.

    Example: ``with handling(lambda s, f: print(s), [signal.SIGUSR1]): ...``.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
