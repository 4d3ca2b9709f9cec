"""Shared set-up of the multi-process tests: W CPU ranks on gloo through a FileStore."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def join(rank: int, world: int, store_path: str, timeout_s: float | None = None) -> None:
    """Join the gloo group of ``world`` ranks (one torch thread each: 2 cores here)."""
    torch.set_num_threads(1)
    timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group(
        "gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world, **timeout
    )


def run_ranks(worker: Callable[..., Any], world: int, tmp: Path, *extra: Any) -> None:
    """worker(rank, world, store_path, str(tmp), *extra) on ``world`` spawned processes."""
    mp.start_processes(
        worker,
        args=(world, str(tmp / "store"), str(tmp), *extra),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
