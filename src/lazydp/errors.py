"""Error types raised at lazydp's boundaries.

Every error says what was wrong, the value seen, and what to do instead. They derive from
ValueError/TypeError so that callers who catch the builtin ones keep working.
"""

from __future__ import annotations


class LazyDPError(Exception):
    """Base class of every error lazydp raises on purpose."""


class ConfigError(LazyDPError, ValueError):
    """An argument or configuration value is invalid (names the argument, the value and the fix)."""


class UnsupportedLayerError(LazyDPError, TypeError):
    """A layer has no exact per-example gradient norm in the chosen mode (or mixes examples)."""


class UnsupportedOptimizerError(LazyDPError, TypeError):
    """The optimizer (or one of its settings) cannot be made private exactly in the chosen mode."""


class InputError(LazyDPError, ValueError):
    """A batch is malformed: out-of-range ids, NaN/Inf values, wrong shapes."""


class PrivacyError(LazyDPError, RuntimeError):
    """The privacy ledger or a checkpoint is missing, corrupt or inconsistent."""


class DataError(LazyDPError, ValueError):
    """A data file is malformed (names the file and line) or a data directory is incomplete."""


class StorageError(LazyDPError, OSError):
    """A file could not be written (disk full, no permission, a directory in the way)."""


#: Every error type above, in the order this file defines them (each rank of a distributed run
#: sends a refused step's error type as its index here: the same on every rank).
ERROR_TYPES: tuple[type[LazyDPError], ...] = tuple(LazyDPError.__subclasses__())
