"""Embedding tables on transparent huge pages (Linux): fewer TLB misses on random row access.

Why: a training step reads and writes a few thousand random rows of every table (the lookup, the
LazyDP catch-up, the history table, the row update). With 4 KiB pages each of those rows sits on
its own page, so every access also misses the TLB and walks page tables that are cold themselves
(a 1M x 32 float32 table spans 32k pages). On 2 MiB pages the same table is 64 pages. Measured
here on 10 tables of 1M x 32, batch 2048, pooling 1 (``benchmarks/huge_pages.py``, three runs):
LazyDP's row update went from 4.1-4.6 to 3.1-3.3 ms a step, sgd's sparse update from 5.9-6.4
to 4.6-5.0 ms (benchmarks/RESULTS.md, seventh session).

Linux's transparent huge pages default to ``madvise`` on many machines (this one included): only
regions that ask get them, and only pages first touched after asking. So :func:`empty` allocates,
asks (``madvise(MADV_HUGEPAGE)``) and returns untouched memory; the caller fills it. Elsewhere
(other systems, GPU tensors, small tensors, ``LAZYDP_HUGE_PAGES=0``) it is ``torch.empty``.
It is advice: the kernel may still use small pages (fragmented memory), values are unaffected.
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch import Tensor

from lazydp._libc import libc_function

__all__ = ["advise", "empty", "enabled"]

HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE = 14  # linux/mman.h


_MADVISE = libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int)


def enabled() -> bool:
    """Whether tables go on huge pages (Linux, and ``LAZYDP_HUGE_PAGES`` not set to 0)."""
    return _MADVISE is not None and os.environ.get("LAZYDP_HUGE_PAGES", "1") != "0"


def advise(t: Tensor) -> bool:
    """Ask for huge pages under the whole 2 MiB pages inside ``t``'s memory; True if asked.

    Pages already touched keep their size (the kernel may merge them later); pages touched
    after this call come as huge pages where the kernel can.

    >>> advise(torch.empty(4))  # far below one huge page: nothing to ask
    False
    """
    if not enabled() or t.device.type != "cpu" or t.nbytes < HUGE_PAGE:
        return False
    start = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (t.data_ptr() + t.nbytes) // HUGE_PAGE * HUGE_PAGE
    assert _MADVISE is not None
    return end > start and _MADVISE(start, end - start, _MADV_HUGEPAGE) == 0


def empty(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None = None
) -> Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``, on huge pages where possible (fill
    it before use, as after torch.empty).

    >>> empty((3, 2), torch.float32).shape
    torch.Size([3, 2])
    """
    out = torch.empty(shape, dtype=dtype, device=device)
    advise(out)
    return out
