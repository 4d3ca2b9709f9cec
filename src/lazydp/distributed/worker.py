"""One torchrun worker of ``lazydp train``: ``python -m lazydp.distributed.worker CONFIG.json``.

Joins the process group from torchrun's environment, resumes after a restart (never at epsilon
0), and runs :func:`lazydp.training.run` with :class:`DistributedPrivacyEngine`.

Test-only fault injection: ``LAZYDP_TEST_KILL_ONCE=RANK:STEP:MARKER`` makes worker RANK exit
abruptly (``os._exit(1)``, as a crash would) when it is about to run step STEP, once: MARKER is
created first, and an existing MARKER disarms it. It changes no privacy mechanism.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

from lazydp.distributed.engine import DistributedPrivacyEngine
from lazydp.distributed.launch import init_from_env, prepare_restart

KILL_ENV = "LAZYDP_TEST_KILL_ONCE"


class _WorkerEngine(DistributedPrivacyEngine):
    """DistributedPrivacyEngine plus the optional test-only crash (see module docstring)."""

    def make_private(self, **kwargs: Any) -> Any:  # type: ignore[override]
        out = super().make_private(**kwargs)
        spec = os.environ.get(KILL_ENV)
        if spec and self.optimizer is not None:
            rank, step, marker = spec.split(":", 2)
            opt, inner = self.optimizer, self.optimizer.step
            me = dist.get_rank() if dist.is_initialized() else 0

            def step_or_crash(*args: Any, **kw: Any) -> Any:
                if me == int(rank) and self.ledger.steps >= int(step) and not Path(marker).exists():
                    Path(marker).touch()
                    os._exit(1)
                return inner(*args, **kw)

            opt.step = step_or_crash  # type: ignore[method-assign]
        return out


def main(argv: list[str] | None = None) -> int:
    from lazydp import training
    from lazydp.train_config import TrainConfig

    argv = sys.argv[1:] if argv is None else argv
    cfg = TrainConfig(**json.loads(Path(argv[0]).read_text()))
    rank, world_size = init_from_env()
    prepare_restart(cfg, rank)
    try:
        training.run(cfg, rank=rank, world_size=world_size, engine_cls=_WorkerEngine)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
