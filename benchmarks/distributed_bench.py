"""Per-rank step time and bytes sent per step, W = 1 and 2 gloo ranks, replicated vs sharded tables.

    python benchmarks/distributed_bench.py [--rows 1000000] [--tables 4] [--batch 2048]

A DLRM-ish model: bottom MLP 13-64-16, ``--tables`` EmbeddingBag(rows, 16, sum) with pooling 4,
top MLP 80-64-1; global batch ``--batch`` split evenly over the ranks; uniform ids. Modes
``lazydp`` and ``dpsgd_f`` (eager noise on every row: the case where sharding divides the work).
Timing: ``--steps`` steps, mean of the last half. Bytes: payload this rank sends per step.
Not a test; numbers go to benchmarks/RESULTS_distributed.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lazydp.distributed import DistributedPrivacyEngine, ShardedEmbeddingBag
from lazydp.distributed._comm import COMM_BYTES

DIM, POOL = 16, 4


class Model(nn.Module):
    def __init__(self, rows: int, tables: int, sharded: bool) -> None:
        super().__init__()
        self.bottom = nn.Sequential(nn.Linear(13, 64), nn.ReLU(), nn.Linear(64, DIM))
        make = (
            (lambda: ShardedEmbeddingBag(rows, DIM))
            if sharded
            else (lambda: nn.EmbeddingBag(rows, DIM, mode="sum"))
        )
        self.tables = nn.ModuleList(make() for _ in range(tables))
        self.top = nn.Sequential(nn.Linear(DIM * (tables + 1), 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        pooled = [t(ids[:, k]) for k, t in enumerate(self.tables)]
        return self.top(torch.cat([self.bottom(dense), *pooled], 1)).squeeze(1)


def _run(rank: int, world: int, store: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(max(1, 2 // world))
    if world > 1:
        dist.init_process_group(
            "gloo", store=dist.FileStore(store, world), rank=rank, world_size=world
        )
    rows: list[str] = []
    for sharded in (False, True):
        for mode in ("lazydp", "dpsgd_f"):
            torch.manual_seed(0)
            model = Model(args.rows, args.tables, sharded)
            tables = [p for n, p in model.named_parameters() if n.startswith("tables.")]
            dense = [p for n, p in model.named_parameters() if not n.startswith("tables.")]
            opt = [torch.optim.SGD(dense, lr=0.1), torch.optim.SGD(tables, lr=0.1)]
            n = args.batch * 100
            loader = DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=args.batch)
            engine = DistributedPrivacyEngine()
            model, dp_opt, _ = engine.make_private(
                module=model,
                optimizer=opt,
                data_loader=loader,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                mode=mode,
            )
            local = args.batch // world
            g = torch.Generator().manual_seed(rank)
            times, sent = [], []
            for _ in range(args.steps):
                dense_x = torch.rand(local, 13, generator=g)
                ids = torch.randint(0, args.rows, (local, args.tables, POOL), generator=g)
                y = (torch.rand(local, generator=g) < 0.5).float()
                if world > 1:
                    dist.barrier()
                before = COMM_BYTES["sent"]
                start = time.perf_counter()
                dp_opt.zero_grad()
                loss = nn.functional.binary_cross_entropy_with_logits(model(dense_x, ids), y)
                loss.backward()
                dp_opt.step()
                times.append(time.perf_counter() - start)
                sent.append(COMM_BYTES["sent"] - before)
            half = args.steps // 2
            ms = 1000 * sum(times[half:]) / len(times[half:])
            mb = sum(sent[half:]) / len(sent[half:]) / 2**20
            kind = "sharded" if sharded else "replicated"
            rows.append(f"| {world} | {kind} | {mode} | {rank} | {ms:.1f} | {mb:.2f} |")
    Path(out, f"w{world}r{rank}.txt").write_text("\n".join(rows))
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--tables", type=int, default=4)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    print(f"# rows={args.rows} tables={args.tables} dim={DIM} pooling={POOL} batch={args.batch}")
    print("| W | tables | mode | rank | step ms | MiB sent/step |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        _run(0, 1, "", args, tmp)
        mp.spawn(_run, args=(2, str(Path(tmp, "store")), args, tmp), nprocs=2, join=True)
        for name in ("w1r0", "w2r0", "w2r1"):
            print(Path(tmp, f"{name}.txt").read_text())


if __name__ == "__main__":
    main()
