"""Collectives with variable sizes, a shared secret seed, and a byte counter (gloo or NCCL).

Contract:
* Every helper is a *collective*: every rank of ``group`` must call it, in the same order, even
  with nothing to send (a rank with an empty batch passes empty tensors). Skipping a call on one
  rank deadlocks the job -- this is why an empty Poisson batch still runs the whole step.
* Results are identical on every rank (gathers concatenate in rank order), so replicas that
  apply them stay bit-identical.
* With no process group initialised (or world size 1) every helper is a local no-op copy, so
  the same code runs in one process.
* ``COMM_BYTES`` counts the bytes *this* rank sends (payload only; the benchmark reads it).
"""

from __future__ import annotations

import math
import secrets
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

#: Bytes sent by this process through the helpers below (reset freely; benchmarks read it).
COMM_BYTES = {"sent": 0}

ProcessGroup = Any  # torch.distributed.ProcessGroup or None (the default group)


def world(group: ProcessGroup = None) -> tuple[int, int]:
    """(rank, world_size) in ``group``; (0, 1) when torch.distributed is not initialised.

    >>> world()
    (0, 1)
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _count(t: Tensor, copies: int = 1) -> None:
    COMM_BYTES["sent"] += t.numel() * t.element_size() * copies


def all_reduce_sum_(buffer: Tensor, group: ProcessGroup = None) -> Tensor:
    """Sum ``buffer`` over ranks in place (one collective)."""
    if world(group)[1] > 1:
        _count(buffer)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    return buffer


def all_gather_sizes(sizes: Tensor, group: ProcessGroup = None) -> Tensor:
    """Gather a small int64 vector from every rank: result (W, len(sizes)), row r from rank r."""
    rank, size = world(group)
    if size == 1:
        return sizes.view(1, -1).clone()
    out = [torch.empty_like(sizes) for _ in range(size)]
    _count(sizes, size - 1)
    dist.all_gather(out, sizes.contiguous(), group=group)
    return torch.stack(out)


def all_gather_varlen(t: Tensor, counts: list[int], group: ProcessGroup = None) -> Tensor:
    """Concatenate in rank order the first ``counts[r]`` rows of ``t`` from every rank r.

    ``counts`` must already be known on every rank (from :func:`all_gather_sizes`); gloo has no
    variable-size all_gather, so each rank pads to the largest count.
    """
    rank, size = world(group)
    if size == 1:
        return t[: counts[0]].clone()
    longest = max(counts)
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in range(size)]
    _count(padded, size - 1)
    dist.all_gather(out, padded, group=group)
    return torch.cat([o[:n] for o, n in zip(out, counts)])


def all_to_all_varlen(
    t: Tensor, send_counts: list[int], recv_counts: list[int], group: ProcessGroup = None
) -> Tensor:
    """Send rows ``t[sum(send_counts[:r]) : ...]`` to rank r; receive ``recv_counts[r]`` from r."""
    rank, size = world(group)
    if size == 1:
        return t.clone()
    out = t.new_empty((sum(recv_counts), *t.shape[1:]))
    row_bytes = math.prod(t.shape[1:]) * t.element_size()
    COMM_BYTES["sent"] += (sum(send_counts) - send_counts[rank]) * row_bytes
    dist.all_to_all_single(out, t.contiguous(), recv_counts, send_counts, group=group)
    return out


def exchange_counts(
    send_counts: Tensor, group: ProcessGroup = None, tag: int = 0
) -> tuple[list[int], list[int]]:
    """All-to-all of per-destination counts: returns how many rows each rank will send us,
    and each rank's ``tag`` (what kind of exchange it is in, for the caller to compare)."""
    rank, size = world(group)
    if size == 1:
        return [int(send_counts[0])], [tag]
    send = torch.stack([send_counts, torch.full_like(send_counts, tag)], 1).contiguous()
    recv = torch.empty_like(send)
    _count(send)
    dist.all_to_all_single(recv, send, group=group)
    return [int(x) for x in recv[:, 0]], [int(x) for x in recv[:, 1]]


def over_ranks(value: int, world_size: int, largest: bool = False) -> int:
    """``value`` summed (or its largest) over the ranks of the job: a collective, every rank
    gets the same answer (``value`` itself in a single-process run).

    >>> over_ranks(3, world_size=1)
    3
    """
    if world_size <= 1 or not dist.is_initialized():
        return value
    total = torch.tensor([value], dtype=torch.float64, device=comm_device(None))
    op = dist.ReduceOp.MAX if largest else dist.ReduceOp.SUM
    dist.all_reduce(total, op=op)  # NCCL needs it on the GPU: comm_device
    return int(total.item())


def comm_device(group: ProcessGroup = None) -> torch.device:
    """Where small bookkeeping tensors must live for ``group``'s backend (NCCL: the GPU)."""
    if world(group)[1] > 1 and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shared_secret_seed(group: ProcessGroup = None, device: torch.device | str = "cpu") -> int:
    """A 126-bit seed from rank 0's OS entropy, broadcast so every rank gets the same value.

    All replicas then draw *identical* noise (noise is added once, not once per rank); the seed
    never leaves the process group and is never written to a log.
    """
    rank, size = world(group)
    words = torch.tensor(
        [secrets.randbits(63), secrets.randbits(63)] if rank == 0 else [0, 0],
        dtype=torch.int64,
        device=device,
    )
    if size > 1:
        _count(words)
        dist.broadcast(words, src=dist.get_global_rank(group, 0) if group else 0, group=group)
    return (int(words[0]) << 63) | int(words[1])
