"""Tables on transparent huge pages: asked for where possible, values unchanged, off by switch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lazydp import huge_pages
from lazydp.models.mlp import uniform_table
from lazydp.optim.lazy import HistoryTable

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping that holds ``address`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@linux
def test_a_large_table_asks_for_huge_pages(monkeypatch):
    monkeypatch.delenv("LAZYDP_HUGE_PAGES", raising=False)
    table = uniform_table(200_000, 16, 0.1, seed=0)  # 12.8 MB: whole huge pages inside
    assert "hg" in _vm_flags(table.data_ptr() + huge_pages.HUGE_PAGE)
    history = HistoryTable(2_000_000)
    assert "hg" in _vm_flags(history.applied.data_ptr() + huge_pages.HUGE_PAGE)
    assert int(history.applied.count_nonzero()) == 0


@linux
def test_the_switch_turns_it_off_and_values_do_not_depend_on_it(monkeypatch):
    monkeypatch.setenv("LAZYDP_HUGE_PAGES", "1")
    on = uniform_table(700_000, 16, 0.1, seed=3)  # 45 MB: its own mapping, even with tune_malloc
    monkeypatch.setenv("LAZYDP_HUGE_PAGES", "0")
    # Switched off, lazydp asks nothing. (The off table's own VmFlags cannot show it: malloc
    # may hand it heap memory that an earlier test's advised table left behind, flag and all.)
    asked: list[int] = []
    real = huge_pages._MADVISE
    assert real is not None
    monkeypatch.setattr(huge_pages, "_MADVISE", lambda *a: asked.append(a[1]) or real(*a))
    off = uniform_table(700_000, 16, 0.1, seed=3)
    assert not huge_pages.advise(off)
    assert asked == []
    assert torch.equal(on, off)


def test_small_and_non_cpu_tensors_are_left_alone():
    assert not huge_pages.advise(torch.empty(100))
    assert not huge_pages.advise(torch.empty((1 << 21) // 4 + 1, device="meta"))
    assert huge_pages.empty((5,), torch.int32).dtype == torch.int32


def test_the_benchmark_script_runs_on_a_tiny_model():
    """benchmarks/huge_pages.py end to end (seconds): it must not rot between sessions."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "huge_pages.py"), "--scale", "1e-5"]
        + ["--steps", "2", "--batch-size", "32"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert "lazydp/sgd on 4K pages:" in out and "lazydp 4K/2M:" in out


def test_reachable_as_lazydp_huge_pages_after_a_bare_import():
    """README: "allocate the weight with `lazydp.huge_pages.empty`". `import lazydp` no longer
    imports the engine (which imported huge_pages), so the submodule must load on first use,
    not only after PrivacyEngine was touched; a name that is no submodule stays an
    AttributeError."""
    code = (
        "import torch, lazydp\n"
        "assert lazydp.huge_pages.empty((4, 2), torch.float32).shape == (4, 2)\n"
        "try:\n"
        "    lazydp.no_such_name\n"
        "except AttributeError as exc:\n"
        "    assert 'no_such_name' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
