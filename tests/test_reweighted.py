"""dpsgd_r's second pass must compute the clipped sum of the first: random forwards are replayed,
and models whose second pass would differ are refused before anything is charged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lazydp import ConfigError, UnsupportedLayerError
from lazydp.testing import zero_noise
from tests.test_engine_errors import private
from tests.test_model_edge_cases import _private as edge_private


class Dropped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.drop = nn.Dropout(0.5)
        self.b = nn.Linear(16, 1)

    def forward(self, x):
        return self.b(torch.relu(self.drop(self.a(x)))).squeeze(1)


class TwoHeads(Dropped):
    def forward(self, x):
        h = self.a(x)
        return self.b(h).squeeze(1), h


class AuxLoss(Dropped):
    """Keeps an intermediate activation the loss also uses (a common auxiliary-loss pattern)."""

    def forward(self, x):
        self.hidden = self.a(x)
        return self.b(self.hidden).squeeze(1)


class Drifting(Dropped):
    """Its forward depends on how often it ran: a second run is a different function."""

    calls = 0

    def forward(self, x):
        Drifting.calls += 1
        return self.b(self.a(x) * Drifting.calls).squeeze(1)


def _private(model, mode):
    return edge_private(model, mode, max_grad_norm=0.05)  # small: every example is clipped


@zero_noise()
def test_dropout_masks_are_replayed_so_dpsgd_r_equals_dpsgd_b():
    x = torch.randn(8, 6)
    after, rng_after = {}, {}
    for mode in ("dpsgd_b", "dpsgd_r"):
        torch.manual_seed(1)
        model, opt, _ = _private(Dropped(), mode)
        torch.manual_seed(2)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        after[mode] = [p.detach().clone() for p in model.parameters()]
        rng_after[mode] = torch.rand(3)  # the replay leaves the user's RNG stream as it was
    for b, r in zip(after["dpsgd_b"], after["dpsgd_r"]):
        torch.testing.assert_close(r, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(rng_after["dpsgd_b"], rng_after["dpsgd_r"])


def test_a_model_returning_a_tuple_is_refused_under_dpsgd_r():
    model, _, _ = _private(TwoHeads(), "dpsgd_r")
    with pytest.raises(UnsupportedLayerError, match="must return one Tensor.*tuple"):
        model(torch.randn(4, 6))


@pytest.mark.parametrize(
    ("model", "loss", "match"),
    [
        (AuxLoss, lambda m, out: out.pow(2).mean() + m.hidden.pow(2).mean(), "did not reproduce"),
        (Drifting, lambda m, out: out.pow(2).mean(), "different output"),
    ],
)
def test_a_second_pass_that_differs_is_refused_before_the_charge(model, loss, match):
    module, opt, engine = _private(model(), "dpsgd_r")
    before = [p.detach().clone() for p in module.parameters()]
    out = module(torch.randn(8, 6))
    loss(module, out).backward()
    with pytest.raises(ConfigError, match=match):
        opt.step()
    assert engine.ledger.steps == 0
    assert all(torch.equal(p.detach(), b) for p, b in zip(module.parameters(), before))
    # dpsgd_b clips the same loss, whatever path its gradient takes
    module, opt, engine = _private(model(), "dpsgd_b")
    out = module(torch.randn(8, 6))
    loss(module, out).backward()
    opt.step()
    assert engine.ledger.steps == 1


class Cancelling(nn.Module):
    """An activation penalty whose gradient cancels example i's main gradient at ``a``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(1, 1, bias=False)
        self.b = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.a.weight.fill_(0.1)
            self.b.weight.fill_(1.0)

    def forward(self, x):
        self.hidden = self.a(x)
        return self.b(self.hidden).squeeze(1)


def test_one_large_example_cannot_loosen_the_check_for_another():
    # Example i's first-pass gradient is <= C (the penalty cancels it), its second-pass one ~10 C;
    # example j has a huge output gradient but a tiny input. A batch-wide tolerance let i pass
    # next to j (an audit measured 9.85 C); the released sum is now the per-example one anyway.
    x = torch.tensor([[9.9], [1e-8]])
    y = torch.tensor([0.99 + 0.5 * 0.99, 1e4])
    model, opt, _, engine = private("dpsgd_r", Cancelling(), loss_reduction="sum")
    ((model(x) - y).pow(2).sum() + 0.5 * model.hidden.pow(2).sum()).backward()
    with pytest.raises(ConfigError, match="did not reproduce"):
        opt.step()
    assert engine.ledger.steps == 0


class Counting(Dropped):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen += len(x)
        return super().forward(x)


class CountingSecond(Dropped):
    """Counts the examples of every other call in a buffer (a Python counter says which)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls % 2 == 0:
            self.seen += len(x)
        return super().forward(x)


def test_the_second_pass_puts_back_a_buffer_it_writes():
    # The training pass leaves the buffer alone (one it wrote is refused, below); the second
    # pass's write is undone.
    model, opt, engine = _private(CountingSecond(), "dpsgd_r")
    model(torch.randn(8, 6)).sum().backward()
    opt.step()
    assert model.calls == 2 and float(model.seen) == 0 and engine.ledger.steps == 1


def test_the_second_pass_leaves_an_edited_output_alone():
    model, opt, engine = _private(Dropped(), "dpsgd_r")
    out = model(torch.randn(8, 6))
    out.sigmoid_()  # the caller edits the returned tensor in place
    out.sum().backward()
    opt.step()
    assert engine.ledger.steps == 1


def test_a_buffer_the_training_forward_writes_is_refused_before_the_second_pass():
    # A count of the examples seen is data (under Poisson sampling the batch size is private):
    # refused at the step, nothing charged, and the second pass never runs to count twice.
    model, opt, engine = _private(Counting(), "dpsgd_r")
    model(torch.randn(8, 6)).sum().backward()
    with pytest.raises(ConfigError, match=r"buffer\(s\) \['seen'\] changed"):
        opt.step()
    assert engine.ledger.steps == 0 and float(model.seen) == 8


def test_a_scalar_output_is_refused_under_dpsgd_r():
    class Summed(Dropped):
        def forward(self, x):
            return super().forward(x).sum()

    model, _, _ = _private(Summed(), "dpsgd_r")
    with pytest.raises(UnsupportedLayerError, match="batch in dimension 0"):
        model(torch.randn(4, 6))


class Transposed(nn.Module):
    """A Linear on a transposed (non-contiguous) 3-D input: torch's F.linear rounds it one ulp
    differently when the weight requires grad (dpsgd_r's second pass) than detached."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        return self.lin(x.transpose(1, 2)).sum(1)


def test_a_second_pass_that_differs_by_rounding_only_is_accepted_and_equals_dpsgd_b():
    finals = {}
    for mode in ("dpsgd_b", "dpsgd_r"):
        torch.manual_seed(0)
        model, opt, _, _ = private(mode, model=Transposed())
        x = torch.randn(4, 8, 6, generator=torch.Generator().manual_seed(1))
        with zero_noise():
            model(x).pow(2).sum(1).mean().backward()
            opt.step()
        finals[mode] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(*finals.values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
