"""A small recommendation-style model with every supported layer kind, and fixed batches."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROWS = 40
DIM = 4
N = 64


class Toy(nn.Module):
    def __init__(self, rows: int = ROWS, d: int = DIM) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, d)
        self.norm = nn.LayerNorm(d)
        self.bag = nn.EmbeddingBag(rows, d, mode="sum")
        self.emb = nn.Embedding(rows, d, padding_idx=0)
        self.top = nn.Linear(3 * d, 1)

    def forward(
        self, x: torch.Tensor, bag_ids: torch.Tensor, emb_ids: torch.Tensor
    ) -> torch.Tensor:
        h = self.norm(torch.relu(self.fc1(x)))
        e1 = self.bag(bag_ids)
        e2 = self.emb(emb_ids).sum(1)
        return self.top(torch.cat([h, e1, e2], 1)).squeeze(1)


def table_params(model: Toy) -> list[nn.Parameter]:
    return [model.bag.weight, model.emb.weight]


def dense_params(model: Toy) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if not n.startswith(("bag.", "emb."))]


def make_batches(steps: int, seed: int = 0, hot_rows: int = 12) -> list[tuple[torch.Tensor, ...]]:
    """Random batches of varying size; ids from a subset of rows (others never touched), repeats."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        b = int(torch.randint(1, 12, (1,), generator=g))
        x = torch.randn(b, 3, generator=g)
        bag = torch.randint(0, hot_rows, (b, 3), generator=g)
        bag[:, 2] = bag[:, 1]  # a repeated id inside every bag
        emb = torch.randint(0, hot_rows, (b, 2), generator=g)
        y = (torch.rand(b, generator=g) < 0.5).float()
        out.append((x, bag, emb, y))
    return out


def loader(n: int = N, batch_size: int = 8) -> DataLoader:
    ds = TensorDataset(
        torch.randn(n, 3),
        torch.randint(0, ROWS, (n, 3)),
        torch.randint(0, ROWS, (n, 2)),
        (torch.rand(n) < 0.5).float(),
    )
    return DataLoader(ds, batch_size=batch_size)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(out, y)
