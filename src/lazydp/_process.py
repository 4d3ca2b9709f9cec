"""Whether a process of this host still runs: how lazydp tells a temporary file or directory
that a killed writer left behind (removable) from one a live writer is still filling."""

from __future__ import annotations

import os


def running(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (signal 0 probes without signalling).

    >>> running(os.getpid())
    True
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
