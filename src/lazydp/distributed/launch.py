"""``lazydp train --nproc-per-node N``: launch the training job through torchrun, restart on failure.

Contract:
* :func:`launch` runs ``python -m torch.distributed.run`` (torchrun) with ``--nproc-per-node``,
  ``--nnodes``, ``--max-restarts`` and either ``--standalone`` or a c10d rendezvous at
  ``--rdzv-endpoint``; every worker runs :mod:`lazydp.distributed.worker` on the same config.
  Backend: NCCL when CUDA is available, gloo otherwise.
* A worker that dies makes torchrun stop and restart ALL workers (up to ``--max-restarts``);
  they resume from the last complete checkpoint (checkpoints are written atomically, so a
  partial one never exists). Steps after that checkpoint run again and are charged again: the
  ledger only grows. On a restart a missing ledger stops the run with a PrivacyError (the run
  would otherwise restart at epsilon 0) unless nothing was charged yet (no checkpoint, no step
  in any rank's ledger: the attempt died in its set-up); a corrupt one already does
  (PrivacyLedger).
* Multi-node runs need ``--out`` on a file system every node sees (checkpoint and ledgers).
* SIGINT / SIGTERM / SIGHUP to ``lazydp train`` reach torchrun (run in a session of its own, so
  a terminal's Ctrl-C arrives once, from here), which stops the workers; the launcher waits for
  that and exits 128 + the signal (see :func:`_run_forwarding_signals`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lazydp.errors import ConfigError, LazyDPError, PrivacyError
from lazydp.ledger import PrivacyLedger, ledger_path
from lazydp.run_lock import run_lock
from lazydp.stop_signals import StoppedBySignal

#: What the launcher passes on to torchrun (torchrun stops its workers on each of them).
_FORWARDED = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ... env vars).

    Returns (rank, world_size); (0, 1) with no torchrun environment. Idempotent. This is the one
    line a training entry point needs: ``rank, world_size = init_from_env()``.

    >>> init_from_env() if "WORLD_SIZE" not in os.environ else (0, 1)
    (0, 1)
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        rank = int(os.environ["RANK"])
        # Under torchrun the agent hosts the store and keeps it across restarts; gloo would then
        # read the crashed attempt's stale addresses and fail to connect. A prefix per attempt
        # gives every restart fresh keys.
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            size,
            is_master=rank == 0 and not agent_store,
            timeout=timedelta(minutes=5),
        )
        prefixed = dist.PrefixStore(f"lazydp/attempt{restart_count()}", store)
        dist.init_process_group(backend, store=prefixed, rank=rank, world_size=size)
    return dist.get_rank(), dist.get_world_size()


def restart_count() -> int:
    """How many times torchrun has restarted this job (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def prepare_restart(cfg: Any, rank: int) -> None:
    """After a torchrun restart: continue the run (``cfg.resume``), never restart at epsilon 0."""
    if restart_count() == 0:
        return
    ledger = ledger_path(cfg.out, rank)
    if not ledger.exists() and _charged_before(Path(cfg.out)):
        raise PrivacyError(
            f"restart {restart_count()} of a distributed run, but the privacy ledger {ledger} is "
            "missing: resuming would restart at epsilon 0. Restore the ledger file of this run "
            "(it is the record of the privacy spent), then resume with --resume."
        )
    cfg.resume = True


def _charged_before(out: Path) -> bool:
    """Whether an earlier attempt of the job may have charged a step: it left a checkpoint, or
    a step in some rank's ledger (or a ledger that cannot be read). No rank charges before
    every rank has opened its ledger (make_private starts with a collective), so a ledger
    missing while none holds a step was never created: that attempt died in its set-up, and
    the restart that torchrun makes for it spends nothing twice (it used to be refused, with
    advice to restore a file that never existed)."""
    if (out / "checkpoint.pt").exists():
        return True
    for rank in range(int(os.environ.get("WORLD_SIZE", "1"))):
        path = ledger_path(out, rank)
        if not path.exists():
            continue
        try:
            ledger = PrivacyLedger(path)
        except (PrivacyError, OSError, ValueError):
            return True
        try:
            if ledger.steps:
                return True
        finally:
            ledger.close()
    return False


def torchrun_command(args: argparse.Namespace, config_file: Path) -> list[str]:
    """The torchrun command line for ``args`` (nproc_per_node, nnodes, rdzv_endpoint, max_restarts).

    >>> ns = argparse.Namespace(nproc_per_node=2, nnodes=1, rdzv_endpoint=None, max_restarts=3)
    >>> torchrun_command(ns, Path("cfg.json"))[3:6]
    ['--nproc-per-node=2', '--nnodes=1', '--max-restarts=3']
    """
    nproc, nnodes = int(args.nproc_per_node), int(getattr(args, "nnodes", 1) or 1)
    restarts = int(getattr(args, "max_restarts", 0) or 0)
    if nproc < 1 or nnodes < 1 or restarts < 0:
        raise ConfigError(
            f"--nproc-per-node={nproc}, --nnodes={nnodes}, --max-restarts={restarts}: the first "
            "two must be >= 1 and restarts >= 0."
        )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--nnodes={nnodes}",
        f"--max-restarts={restarts}",
    ]
    endpoint = getattr(args, "rdzv_endpoint", None)
    if endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}"]
    elif nnodes > 1:
        raise ConfigError(
            f"--nnodes={nnodes} needs --rdzv-endpoint HOST:PORT (the same on every node)."
        )
    else:
        cmd.append("--standalone")
    return [*cmd, "-m", "lazydp.distributed.worker", str(config_file)]


def launch(args: argparse.Namespace, cfg: Any) -> dict[str, Any]:
    """Run ``lazydp train`` as ``args.nproc_per_node`` torchrun workers; return rank 0's report.

    Example::

        $ lazydp train --data out/criteo --nproc-per-node 2 --max-restarts 3 --checkpoint-every 50
    """
    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out):  # refused here, before the live run's launch_config.json is replaced
        pass  # (the workers' rank 0 takes the lock for the run itself)
    if getattr(args, "json", False):
        cfg.progress = False
    if int(getattr(args, "max_restarts", 0) or 0) > 0 and not cfg.checkpoint_every:
        # The time-based default checkpoint (CHECKPOINT_SECONDS) is written here too: a restart
        # goes back to it, or to step 0 before the first.
        from lazydp.training import CHECKPOINT_SECONDS

        minutes = CHECKPOINT_SECONDS / 60
        print(
            f"lazydp train: --max-restarts without --checkpoint-every restarts from the last "
            f"checkpoint, written only every {minutes:g} minutes of training (a shorter run "
            "restarts from step 0; the ledger keeps every charged step)",
            file=sys.stderr,
        )
    config_file = out / "launch_config.json"
    config_file.write_text(json.dumps(asdict(cfg), indent=2))
    returncode, signum = _run_forwarding_signals(torchrun_command(args, config_file))
    if signum is not None and returncode != 0:
        raise StoppedBySignal(
            f"stopped by {signal.Signals(signum).name}: torchrun stopped the workers in the "
            f"step they were in (under torchrun no checkpoint is written at a signal). The "
            f"ledgers in {out} hold every step charged; the same command with --resume "
            "continues from the last checkpoint (--checkpoint-every N writes one every N steps).",
            signum,
        )
    if returncode != 0:
        raise LazyDPError(
            f"distributed training failed (torchrun exit code {returncode}) after at most "
            f"{getattr(args, 'max_restarts', 0)} restarts; the workers' errors are printed above. "
            f"The ledger in {out} records every step charged so far."
        )
    report = out / "report.json"
    return json.loads(report.read_text()) if report.exists() else {}


def _run_forwarding_signals(cmd: list[str]) -> tuple[int, int | None]:
    """Run ``cmd`` (torchrun) to its end; return its exit code and the first signal forwarded.

    Why: torchrun starts its workers in sessions of their own and stops them only when it is
    signalled itself. The launcher used to die at once on SIGTERM (torchrun and the workers
    went on training, orphaned) and, on SIGINT, SIGKILL torchrun 0.25 s later (subprocess.run's
    cleanup) before it had stopped them: either way the command returned, saying the run was
    interrupted, while the workers kept charging the ledger and wrote model.pt later. Now each
    signal is passed on and the launcher waits until torchrun has stopped the workers. torchrun
    runs in a session of its own, so a terminal's Ctrl-C reaches it once, from here."""
    proc = subprocess.Popen(cmd, start_new_session=True)
    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, forward) for s in _FORWARDED}
    try:
        returncode = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:  # an exception here (not a signal): leave no torchrun behind
            proc.terminate()
            proc.wait()
    return returncode, (received[0] if received else None)
