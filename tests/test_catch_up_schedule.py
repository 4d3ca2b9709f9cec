"""benchmarks/catch_up_schedule.py: its lookahead prototype stays the same algorithm as lazydp's
read-time catch-up (else its timing compares different things), and its check can fail."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "catch_up_schedule.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("catch_up_schedule", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("pooling", [1, 20])
def test_lookahead_prototype_equals_read_time(pooling: int) -> None:
    load_script().check_equal(pooling)  # raises SystemExit if the tables differ


def test_check_catches_a_lookahead_that_loses_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lookahead that marks rows caught up without adding their noise must be refused."""
    script = load_script()
    real_update = script.Lookahead.update

    def update_without_noise(self, ids, grads, next_ids):  # type: ignore[no-untyped-def]
        std, self.table.noise_std = self.table.noise_std, 0.0
        try:
            real_update(self, ids, grads, next_ids)
        finally:
            self.table.noise_std = std

    monkeypatch.setattr(script.Lookahead, "update", update_without_noise)
    with pytest.raises(SystemExit, match="differs"):
        script.check_equal(1)
