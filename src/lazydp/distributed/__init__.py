"""Distributed private training on torch.distributed (gloo on CPU, NCCL on GPU).

* :class:`DistributedPrivacyEngine` -- the PrivacyEngine API inside a process group: per-rank
  Poisson shards at the global rate, per-example clipping before one bucketed all-reduce, noise
  added once from a shared stream, LazyDP catch-up on the union of rows read.
* :class:`ShardedEmbeddingBag` -- a table split row-wise over the ranks (all-to-all lookups,
  per-owner history tables and independent noise streams).
* :func:`launch` / :func:`init_from_env` -- ``lazydp train --nproc-per-node N`` through torchrun,
  with checkpoints and restarts that never lower the privacy ledger.
"""

from lazydp.distributed.engine import DistributedPrivacyEngine
from lazydp.distributed.launch import init_from_env, launch
from lazydp.distributed.sharded import ShardedEmbeddingBag

__all__ = ["DistributedPrivacyEngine", "ShardedEmbeddingBag", "init_from_env", "launch"]
