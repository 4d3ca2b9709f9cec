"""lazydp.tune_malloc: glibc settings applied where glibc is, a no-op elsewhere."""

from __future__ import annotations

import ctypes
import sys

import pytest

import lazydp
from lazydp import malloc


def test_tune_malloc_applies_both_settings_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    calls: list[tuple[int, int]] = []

    class FakeLibc:
        @staticmethod
        def mallopt(param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: FakeLibc())
    assert lazydp.tune_malloc() is True
    # The mmap threshold first: a trim threshold alone would pin the mmap threshold at 128 KiB.
    assert calls == [(-3, malloc.MMAP_THRESHOLD), (-1, malloc.TRIM_THRESHOLD)]


def test_tune_malloc_is_a_no_op_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert malloc.tune_malloc() is False
    monkeypatch.setattr(sys, "platform", "linux")

    def no_libc(*a: object, **k: object) -> None:
        raise OSError("no libc")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert malloc.tune_malloc() is False


def test_tune_malloc_on_this_machine_is_accepted_or_refused_cleanly() -> None:
    assert isinstance(malloc.tune_malloc(), bool)
