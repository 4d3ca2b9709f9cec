"""Plain-Python reference of the pipeline's per-value functions (for tests and the pandas
baseline of the benchmark). Must agree bit for bit with lazydp.preprocess.sql.

Example::

    bucket("C1", "68fd1e64", 2**20)   # the id both engines give this value
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from lazydp.preprocess.sql import SPLIT_RESOLUTION


def hash60(text: str) -> int:
    """First 15 hex digits of md5(UTF-8 bytes) as an integer."""
    return int(hashlib.md5(text.encode("utf-8")).hexdigest()[:15], 16)


def bucket(feature: str, value: str, buckets: int) -> int:
    """Hashed id: 0 for an empty value, else 1 + hash60(feature 0x1f value) mod (buckets - 1)."""
    if value == "":
        return 0
    return 1 + hash60(f"{feature}\x1f{value}") % (buckets - 1)


def is_test(line: str, test_fraction: float) -> bool:
    """The train/test split of a raw line."""
    return hash60(f"split\x1f{line}") % SPLIT_RESOLUTION < round(test_fraction * SPLIT_RESOLUTION)


def log1p_int(text: str) -> np.float32:
    """Dense transform of an integer field: log(max(x, 0) + 1) as float32, empty -> 0."""
    if text == "":
        return np.float32(0.0)
    return np.float32(math.log(float(max(int(text), 0)) + 1.0))
