"""lazydp: fast differentially private training (DP-SGD and LazyDP) for PyTorch.

Example:
    >>> from lazydp import PrivacyEngine
    >>> engine = PrivacyEngine()
"""

from lazydp.engine import MODES, PrivacyEngine
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
from lazydp.loss_check import check_per_example_loss
from lazydp.malloc import tune_malloc
from lazydp.report import PrivacyReport

__version__ = "0.1.0"

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
