"""Shared set-up of the multi-process tests: W CPU ranks on gloo through a FileStore."""

from __future__ import annotations

import datetime
import gc
import os
import sys
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


def leave(tolerate_broken: bool = False) -> None:
    """End a spawned rank once its results are on disk: barrier, destroy the group, then exit
    without the interpreter's finalization. Gloo's worker threads can still hold tensors of
    finished work there, whose release takes the GIL of an interpreter being torn down: a
    SIGABRT ("terminate called without an active exception") after the rank's work was done
    and saved (seen once in a clean-clone run of test_distributed.py's half-precision test, and
    in CI in test_distributed_consistency.py; never reproduced alone). ``tolerate_broken``: a
    group a refusal broke cannot pass the barrier; the results are saved anyway."""
    try:
        dist.barrier()
    except Exception:  # noqa: BLE001 -- only when the caller expects a broken group
        if not tolerate_broken:
            raise
    dist.destroy_process_group()
    gc.collect()  # while the interpreter is whole: drop every reference to the finished work
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the results are on disk; the parent reads them
