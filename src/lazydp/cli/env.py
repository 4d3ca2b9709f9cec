"""``lazydp env``: versions, cores, memory and CUDA, for bug reports.

Example:
    $ lazydp env --json
"""

from __future__ import annotations

import argparse
import os
import platform
from importlib import metadata
from typing import Any

from lazydp.cli import add_json_flag

PACKAGES = ["lazydp", "torch", "numpy", "dp-accounting", "pyarrow", "duckdb", "pyspark", "opacus"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("env", help="print versions, cores, memory, CUDA (for bug reports)")
    add_json_flag(p)
    p.set_defaults(func=run)


def _memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def collect() -> dict[str, Any]:
    import torch

    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "memory_gib": _memory_gib(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "versions": versions,
    }
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = collect()
    for key, value in info.items():
        if key == "versions":
            for name, version in value.items():
                print(f"{name:>16}: {version or 'not installed'}")
        else:
            print(f"{key:>16}: {value}")
    return info
