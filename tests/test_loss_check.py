"""check_per_example_loss: a per-example loss passes (sum or mean), a coupled one is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import default_collate

from lazydp import ConfigError, PrivacyError, check_per_example_loss


class TwoTower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.user = nn.Embedding(20, 4)
        self.item = nn.Embedding(30, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, users, items):
        return self.drop(self.user(users)), self.item(items)


def _examples(n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randint(0, 20, (), generator=g), torch.randint(0, 30, (), generator=g),
         torch.randint(0, 30, (3,), generator=g))
        for _ in range(n)
    ]  # fmt: skip


def in_batch_softmax(model, batch):
    users, items, _ = batch
    qu, qi = model(users, items)
    return F.cross_entropy(qu @ qi.T, torch.arange(len(users)))


def own_negatives(model, batch, reduction="mean"):
    # Each example scores its positive against negatives of its own: a per-example loss.
    users, items, negatives = batch
    qu, qi = model(users, items)
    qn = model.item(negatives)  # (B, 3, d)
    logits = torch.cat([(qu * qi).sum(1, keepdim=True), torch.einsum("bd,bkd->bk", qu, qn)], 1)
    return F.cross_entropy(logits, torch.zeros(len(users), dtype=torch.long), reduction=reduction)


def test_a_per_example_loss_passes_and_names_its_reduction():
    model = TwoTower()
    assert check_per_example_loss(model, own_negatives, _examples()) == "mean"
    summed = lambda m, b: own_negatives(m, b, "sum")  # noqa: E731
    assert check_per_example_loss(model, summed, _examples()) == "sum"
    assert model.training  # its mode is given back (dropout was off for the check)
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated


def test_in_batch_negatives_are_refused():
    with pytest.raises(PrivacyError, match="couples the examples"):
        check_per_example_loss(TwoTower(), in_batch_softmax, _examples())


def test_a_weighted_mean_normalised_by_the_batch_is_refused():
    model = nn.Linear(3, 1)
    data = [(torch.randn(3), torch.randn(1), torch.rand(())) for _ in range(5)]

    def weighted(m, batch):
        x, y, w = batch
        per = (m(x) - y).pow(2).squeeze(1)
        return (w * per).sum() / w.sum()  # the batch's weights: couples the examples

    with pytest.raises(PrivacyError, match="couples the examples"):
        check_per_example_loss(model, weighted, data)


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="at least 2"):
        check_per_example_loss(nn.Linear(3, 1), lambda m, b: m(b[0]).sum(), [(torch.randn(3),)])
    with pytest.raises(ConfigError, match="scalar"):
        check_per_example_loss(nn.Linear(3, 1), lambda m, b: m(b[0]), [(torch.randn(3),)] * 2)


def test_a_sparse_embedding_gradient_is_compared():
    # nn.Embedding(sparse=True) has a sparse gradient: reshape raised RuntimeError.
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(4, 1))
    data = [(torch.randint(0, 10, (1,)), torch.randn(1)) for _ in range(4)]
    loss = lambda m, b: F.mse_loss(m(b[0]).squeeze(1), b[1].squeeze(1))  # noqa: E731
    assert check_per_example_loss(model, loss, data) == "mean"


def test_a_model_fitted_to_its_examples_passes():
    # At the least-squares fit of these examples their gradients cancel: the batch's gradient
    # is float32 rounding noise, and it was compared relative to the (tiny) sum's norm.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 20, generator=g, dtype=torch.float64)
    y = x @ torch.randn(20, 1, generator=g, dtype=torch.float64)
    y = y + torch.randn(64, 1, generator=g, dtype=torch.float64)
    fit = torch.linalg.lstsq(torch.cat([x, torch.ones(64, 1, dtype=torch.float64)], 1), y).solution
    model = nn.Linear(20, 1)
    with torch.no_grad():
        model.weight.copy_(fit[:20].T)
        model.bias.copy_(fit[20])
    data = [(x[i].float(), y[i].float()) for i in range(64)]
    loss = lambda m, b: F.mse_loss(m(b[0]), b[1])  # noqa: E731
    # Not refused (it was, as coupling); with a sum ~0 the sum and the mean are alike.
    assert check_per_example_loss(model, loss, data) in ("sum", "mean")


def test_nan_or_all_zero_gradients_are_not_a_verdict():
    # NaN was refused as coupling; all-zero gradients passed as "sum" without comparing anything.
    model = nn.Linear(3, 1)
    data = [(torch.randn(3), torch.randn(1)) for _ in range(3)]
    data.append((torch.full((3,), float("nan")), torch.randn(1)))
    mse = lambda m, b: F.mse_loss(m(b[0]), b[1])  # noqa: E731
    with pytest.raises(ConfigError, match="not finite"):
        check_per_example_loss(model, mse, data)
    with pytest.raises(ConfigError, match="every gradient is zero"):
        check_per_example_loss(model, lambda m, b: 0 * m(b[0]).sum(), data[:3])


def test_a_random_collate_is_named_not_refused_as_coupling():
    # Negatives drawn in the collate_fn (as the refusal advised) differ between the batch and
    # the single examples: refused as "couples the examples".
    model = nn.Linear(3, 1)
    data = [(torch.randn(3), torch.randn(1)) for _ in range(4)]

    def collate(examples):
        x, y = default_collate(examples)
        return x, y, torch.randn(len(examples), 3)  # random negatives

    def loss(m, b):
        x, y, negatives = b
        return F.mse_loss(m(x), y) + F.softplus(m(negatives)).mean()

    with pytest.raises(ConfigError, match="another gradient each time"):
        check_per_example_loss(model, loss, data, collate)
