"""The names a sweep's points are reported under, and which points form one scale series.

Contract:
* A point's results are keyed by its whole ``BenchSpec``; ``BenchSpec.label`` names only what
  usually varies (config, scale, batch, pooling, dim, locality). ``labels_of`` gives every point
  of a sweep a distinct label: the spec's own, plus `` field=value`` for each field that differs
  between the points sharing it (a sweep over ``lr`` or ``iterations``). Two different points
  are never reported under one name; the same point twice is refused.
* ``scale_key``: specs with equal keys differ in scale alone (one line of scaling.png, one
  group of ``suite.scale_groups``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

from lazydp.bench.workload import BenchSpec
from lazydp.errors import ConfigError


def distinct_names(names: Sequence[str], dicts: Sequence[dict[str, Any]]) -> list[str]:
    """``names``, each one that several different ``dicts`` share suffixed with `` key=value``
    for every key whose value differs among those dicts (keys in dict order).

    Example: ``distinct_names(["a", "a"], [{"lr": 0.1}, {"lr": 0.2}]) == ["a lr=0.1", "a lr=0.2"]``.
    """
    sharing: dict[str, list[dict[str, Any]]] = {}
    for name, d in zip(names, dicts, strict=True):
        sharing.setdefault(name, []).append(d)
    out = []
    for name, d in zip(names, dicts):
        group = sharing[name]
        differ = [k for k in d if any(o.get(k) != d[k] for o in group)]
        out.append(name + "".join(f" {k}={d[k]}" for k in differ))
    return out


def labels_of(specs: Sequence[BenchSpec]) -> dict[BenchSpec, str]:
    """Spec -> the label its results are reported under: ``spec.label``, made distinct where
    two specs share it (``distinct_names``). ConfigError for the same point twice.

    Example: ``labels_of([BenchSpec(seed=0), BenchSpec(seed=1)])[BenchSpec(seed=1)]`` ends with
    ``" seed=1"``.
    """
    twice = [s.label for s, n in Counter(specs).items() if n > 1]
    if twice:
        raise ConfigError(f"the sweep lists the same point more than once: {twice}; list it once")
    names = distinct_names([s.label for s in specs], [s.to_dict() for s in specs])
    if len(set(names)) < len(names):  # values that print alike (1 and "1"): never merge them
        raise ConfigError(f"two different points would be reported as one: {names}")
    return dict(zip(specs, names))


def scale_key(spec: dict[str, Any]) -> str:
    """What specs of one scale group share: every field of the spec (as a dict) but ``scale``."""
    return json.dumps({k: v for k, v in spec.items() if k != "scale"}, sort_keys=True)
