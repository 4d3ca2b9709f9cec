"""lazydp: fast differentially private training (DP-SGD and LazyDP) for PyTorch.

Example:
    >>> from lazydp import PrivacyEngine
    >>> engine = PrivacyEngine()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lazydp.errors import (
    ConfigError,
    DataError,
    InputError,
    LazyDPError,
    PrivacyError,
    StorageError,
    UnsupportedLayerError,
    UnsupportedOptimizerError,
)
from lazydp.malloc import tune_malloc

if TYPE_CHECKING:
    from lazydp.engine import MODES, PrivacyEngine
    from lazydp.loss_check import check_per_example_loss
    from lazydp.report import PrivacyReport

__version__ = "0.1.0"

# Imported on first use, not with the package: every `lazydp` command imports this package
# (lazydp.cli is inside it), and the engine pulls in torch and dp_accounting, 2 s of imports
# that `lazydp preprocess` and `lazydp epsilon` have no use for.
_LAZY = {
    "MODES": "lazydp.engine",
    "PrivacyEngine": "lazydp.engine",
    "check_per_example_loss": "lazydp.loss_check",
    "PrivacyReport": "lazydp.report",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        return _submodule(name)
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # looked up once
    return value


def _submodule(name: str) -> Any:
    """``lazydp.huge_pages`` (any submodule) after a bare ``import lazydp``: the package used to
    import the engine, which imported most of them, so ``lazydp.huge_pages.empty`` (as the
    README names it) worked -- and now it would depend on whether PrivacyEngine was used yet."""
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":  # the submodule exists; its import failed
                raise
    raise AttributeError(f"module 'lazydp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, "__version__"})


__all__ = [
    "MODES",
    "ConfigError",
    "DataError",
    "InputError",
    "LazyDPError",
    "PrivacyEngine",
    "PrivacyError",
    "StorageError",
    "PrivacyReport",
    "UnsupportedLayerError",
    "UnsupportedOptimizerError",
    "__version__",
    "check_per_example_loss",
    "tune_malloc",
]
