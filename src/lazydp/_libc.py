"""glibc functions through ctypes (Linux only): one loader for malloc.py and huge_pages.py."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any


def _libc() -> ctypes.CDLL | None:
    # Looked up on each call (callers resolve once: at import, or once per tune_malloc).
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def libc_function(name: str, argtypes: list[Any], restype: Any) -> Any | None:
    """The C library's ``name`` with its signature set, or None (not Linux, or not in this
    libc: musl has no ``mallopt``)."""
    lib = _libc()
    fn = getattr(lib, name, None) if lib is not None else None
    if fn is not None:
        fn.argtypes, fn.restype = argtypes, restype
    return fn
