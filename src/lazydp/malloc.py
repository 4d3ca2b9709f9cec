"""glibc malloc settings for training processes: reuse freed memory instead of faulting it in anew.

Why: a training step allocates and frees the same tens of MB of activations and gradients every
step. glibc's defaults hand large freed blocks back to the OS (``munmap`` above a dynamic
threshold, heap trimming above 128 KiB of free top), so the next step page-faults and the kernel
zeroes those pages again. With many GB of embedding tables resident that cost grew erratic here:
lazydp on mlperf with 14 GB of tables took 250-410 ms a step (median ~330) with the defaults,
and a steady 250-300 ms (median ~262) with the settings below; sgd's median went from ~220 to
~204 ms (24-step runs; benchmarks/RESULTS.md).

What it sets (process-wide, Linux glibc only; elsewhere it does nothing and returns False):
* ``M_MMAP_THRESHOLD`` = 32 MiB, glibc's maximum: blocks below it come from the reusable heap;
  tables and other large tensors keep their own mappings.
* ``M_TRIM_THRESHOLD`` = 256 MiB: up to that much free memory at the heap's top is kept for the
  next step instead of being returned (peak memory is unchanged: it is memory the step used).

The ``lazydp`` command calls it at start; library users call it once before training:

    >>> import lazydp
    >>> isinstance(lazydp.tune_malloc(), bool)
    True
"""

from __future__ import annotations

import ctypes

from lazydp._libc import libc_function

__all__ = ["tune_malloc"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20


def tune_malloc() -> bool:
    """Apply the settings above; True if glibc accepted both, False where not applicable."""
    mallopt = libc_function("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)
    if mallopt is None:  # not Linux, or not glibc (e.g. musl has no mallopt)
        return False
    # Order matters: a trim threshold alone switches off glibc's dynamic mmap threshold and
    # leaves it at 128 KiB, which measured far slower (every activation its own mapping).
    mmap_ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return mmap_ok and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
