"""An empty batch in the form the user's collate function builds: Poisson sampling draws empty
batches, and most collate functions cannot build one from an empty list.

We collate example 0 once and twice and walk both results together: whatever grows with the
number of examples (dimension 0 of a tensor or array, the length of a list) is per-example and is
cut to zero; whatever stays the same (a constant tag, a per-batch scalar) is kept. That keeps
shapes and dtypes right for ragged per-example lists and concatenating collates too. A part that
changes in any other way is refused: returned as it is, it might still hold the example, and an
"empty" step would train on it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from lazydp.errors import ConfigError


def empty_batch(one: Any, two: Any) -> Any:
    """``one`` (example 0 collated alone) cut to zero examples, ``two`` being it collated twice.

    >>> empty_batch({"x": torch.ones(1, 3), "tag": "a"}, {"x": torch.ones(2, 3), "tag": "a"})
    {'x': tensor([], size=(0, 3)), 'tag': 'a'}
    """
    if isinstance(one, (torch.Tensor, np.ndarray)):
        return _cut_array(one, two)
    if isinstance(one, tuple) and hasattr(one, "_fields"):  # namedtuple: fields, never examples
        return type(one)(*(empty_batch(a, b) for a, b in zip(one, two, strict=True)))
    if isinstance(one, (list, tuple)) and type(two) is type(one):
        if one and len(two) == 2 * len(one):
            return type(one)()  # a per-example list (strings, ragged id lists)
        if len(two) == len(one):
            return type(one)(empty_batch(a, b) for a, b in zip(one, two))
    elif isinstance(one, Mapping) and isinstance(two, Mapping) and set(one) == set(two):
        cut = {k: empty_batch(one[k], two[k]) for k in one}
        try:
            out = copy.copy(one)  # keeps a dict subclass (defaultdict, OrderedDict) as it is
            out.update(cut)  # type: ignore[attr-defined]
            return out
        except (AttributeError, TypeError):
            return cut
    elif dataclasses.is_dataclass(one) and not isinstance(one, type) and type(two) is type(one):
        fields = [f.name for f in dataclasses.fields(one) if f.init]
        return dataclasses.replace(
            one, **{n: empty_batch(getattr(one, n), getattr(two, n)) for n in fields}
        )
    elif _same(one, two):
        return one  # per batch, not per example
    raise _refused(one)


def _cut_array(one: Any, two: Any) -> Any:
    if type(two) is type(one) and one.ndim >= 1 and two.ndim == one.ndim:
        if one.shape[0] >= 1 and two.shape[0] == 2 * one.shape[0]:
            return one[:0]
    if _same(one, two):
        return one
    raise _refused(one)


def _same(a: Any, b: Any) -> bool:
    try:
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            return a.shape == b.shape and bool(torch.equal(a, b))
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
            return a.shape == b.shape and bool(np.array_equal(a, b))
        return type(a) is type(b) and bool(a == b)
    except Exception:  # an object without a usable ==
        return False


def _refused(part: Any) -> ConfigError:
    return ConfigError(
        f"Poisson sampling drew an empty batch, and lazydp cannot tell how to cut the collated "
        f"batch's {type(part).__name__} to zero examples: it neither grows with the examples "
        "(dimension 0, list length) nor stays the same. Have collate_fn return tensors, arrays, "
        "lists, tuples, mappings or dataclasses of them, or give the dataset a "
        "__getitems__(indices) that builds a batch for any list of indices, empty included."
    )
