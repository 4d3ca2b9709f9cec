"""The paper's correctness checks across modes, and Opacus' "noise 0 + clip inf = vanilla"."""

from __future__ import annotations

import math

import pytest
import torch

from lazydp import PrivacyEngine
from lazydp.accounting import MechanismCount, compute_epsilon
from lazydp.testing import constant_noise, zero_noise
from tests.toy import Toy, loader, loss_fn, make_batches

DP_MODES = ["dpsgd_b", "dpsgd_r", "dpsgd_f", "lazydp"]


# SGD settings of every parameter: (weight decay, momentum, Nesterov).
SGD_SETTINGS = [(0.0, 0.0, False), (0.1, 0.0, False), (0.1, 0.9, False), (0.05, 0.8, True)]


# A Poisson batch that drew no example (Toy's inputs with 0 rows).
EMPTY_BATCH = (
    torch.zeros(0, 3),
    torch.zeros(0, 3, dtype=torch.long),
    torch.zeros(0, 2, dtype=torch.long),
    torch.zeros(0),
)


def _sgd(params, lr: float, sgd: tuple[float, float, bool]) -> torch.optim.SGD:
    wd, momentum, nesterov = sgd
    return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=momentum, nesterov=nesterov)


def train(
    mode: str,
    batches,
    *,
    sigma: float = 1.0,
    clip: float = 1.0,
    lr: float = 0.3,
    sgd: tuple[float, float, bool] = SGD_SETTINGS[0],
):
    torch.manual_seed(0)
    model = Toy()
    opt = _sgd(model.parameters(), lr, sgd)
    engine = PrivacyEngine(seed=1)
    model, opt, _ = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=loader(),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        mode=mode,
    )
    for x, bag, emb, y in batches:
        opt.zero_grad()
        loss_fn(model(x, bag, emb), y).backward()
        opt.step()
    engine.flush()
    return {k: t.detach().clone() for k, t in model.state_dict().items()}, engine


def assert_same(a, b, atol=1e-5):
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=f"parameter {k}")


def test_dp_modes_agree_with_noise_off():
    batches = make_batches(6)
    with zero_noise():
        ref, _ = train("dpsgd_b", batches, clip=0.5)
        for mode in ["dpsgd_r", "dpsgd_f", "lazydp"]:
            got, _ = train(mode, batches, clip=0.5)
            assert_same(ref, got)


@pytest.mark.parametrize("sgd", SGD_SETTINGS)
def test_dp_modes_agree_with_constant_noise(sgd):
    batches = make_batches(6)
    with constant_noise(0.7):
        ref, _ = train("dpsgd_f", batches, clip=0.5, sgd=sgd)
        for mode in ["dpsgd_b", "dpsgd_r", "lazydp"]:
            got, _ = train(mode, batches, clip=0.5, sgd=sgd)
            assert_same(ref, got)


def _fixed_batch(size: int, seed: int) -> tuple[torch.Tensor, ...]:
    """``size`` Toy examples (features, bag ids, embedding ids, labels) from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(size, 3, generator=g),
        torch.randint(0, 40, (size, 3), generator=g),
        torch.randint(0, 40, (size, 2), generator=g),
        (torch.rand(size, generator=g) < 0.5).float(),
    )


def _sgd_full_batch(batch, steps=3, sgd=SGD_SETTINGS[0], lr=0.3):
    """Plain SGD on one fixed batch (the mean loss over its examples)."""
    torch.manual_seed(0)
    model = Toy()
    opt = _sgd(model.parameters(), lr, sgd)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(*batch[:3]), batch[3]).backward()
        opt.step()
    return {k: t.detach().clone() for k, t in model.state_dict().items()}


@pytest.mark.parametrize("sgd", SGD_SETTINGS)
def test_noise_zero_and_clip_inf_equals_sgd_and_each_knob_differs(sgd):
    # sgd: weight decay, momentum, Nesterov on every parameter (tables: streamed eagerly or
    # through the dense path, or deferred by lazydp).
    # Batch size 8 == expected batch size (loader batch_size), so mean loss matches sum / B_exp.
    batch = _fixed_batch(8, seed=3)
    ref = _sgd_full_batch(batch, sgd=sgd)
    for mode in DP_MODES:
        got, _ = train(mode, [batch] * 3, sigma=0.0, clip=math.inf, sgd=sgd)
        assert_same(ref, got)
        clipped, _ = train(mode, [batch] * 3, sigma=0.0, clip=0.01, sgd=sgd)
        noisy, _ = train(mode, [batch] * 3, sigma=1e-3, clip=1e3, sgd=sgd)
        assert any(not torch.allclose(ref[k], clipped[k]) for k in ref), mode
        assert any(not torch.allclose(ref[k], noisy[k]) for k in ref), mode


def test_clipping_bounds_each_example_contribution():
    # With noise off and a tiny clip, one step moves parameters by at most lr * C * B / B_exp.
    batches = make_batches(1)
    with zero_noise():
        before, _ = train("dpsgd_f", [], clip=0.05)
        after, _ = train("dpsgd_f", batches, clip=0.05)
    delta2 = sum(float(((after[k] - before[k]) ** 2).sum()) for k in before)
    b = batches[0][0].shape[0]
    assert math.sqrt(delta2) <= 0.3 * 0.05 * b / 8 + 1e-6


def test_ledger_counts_steps_and_epsilon_grows():
    batches = make_batches(4)
    _, engine = train("lazydp", batches)
    assert engine.ledger.steps == 4
    eps = engine.get_epsilon(1e-5)
    assert 0 < eps < math.inf
    report = engine.privacy_report(1e-5)
    assert report.steps == 4 and report.mode == "lazydp"
    assert any("reproducible" in c for c in report.caveats)


@pytest.mark.parametrize("mode", ["dpsgd_f", "lazydp"])
def test_each_charge_records_the_rate_and_noise_the_step_used(mode):
    # The ledger is the only input of epsilon: a charge with another q or sigma than the
    # step's (half the rate, twice the noise) under-reports epsilon with every test of the
    # noise itself still passing.
    sigma, clip = 1.3, 0.7
    _, engine = train(mode, make_batches(3), sigma=sigma, clip=clip)
    q = 8 / len(loader().dataset)  # the loader's batch size over its examples
    assert engine.privacy.sample_rate == pytest.approx(q)
    charged = [(e.sample_rate, e.noise_multiplier, e.max_grad_norm) for e in engine.ledger.events]
    assert charged == [(engine.privacy.sample_rate, sigma, clip)] * 3
    want = compute_epsilon([MechanismCount(engine.privacy.sample_rate, sigma, 3)], 1e-5)
    assert engine.get_epsilon(1e-5) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("mode", DP_MODES)
def test_empty_batch_is_charged_and_changes_only_by_noise(mode):
    with zero_noise():
        before, _ = train(mode, [])
        after, engine = train(mode, [EMPTY_BATCH])
    assert engine.ledger.steps == 1
    assert_same(before, after)


@pytest.mark.parametrize("mode", DP_MODES)
def test_an_empty_batch_noises_every_row_by_one_step(mode):
    """An empty Poisson batch still gets the step's noise on every parameter and table row
    (padding row excepted): with the draws replaced by 1, each value moves by exactly
    lr * sigma * C / B_expected. (Under zero noise, above, a skipped draw went unseen.)"""
    with zero_noise():
        before, _ = train(mode, [])
    with constant_noise(1.0):
        after, _ = train(mode, [EMPTY_BATCH])
    one_step = 0.3 * 1.0 * 1.0 / 8  # lr * sigma * C / B_expected
    for k in before:
        moved = (after[k] - before[k]).abs()
        if k == "emb.weight":
            assert bool((moved[0] == 0).all())  # the padding row owes no noise
            moved = moved[1:]
        torch.testing.assert_close(moved, torch.full_like(moved, one_step), rtol=1e-4, atol=1e-6)


def test_a_small_batch_is_divided_by_the_expected_batch_size():
    """DP invariant 2: the clipped sum is divided by B_expected (8), not by the batch's 4
    examples. With clip inf and no noise, one step is plain SGD on the 4 examples' mean loss
    at lr * 4 / 8."""
    batch = _fixed_batch(4, seed=3)
    ref = _sgd_full_batch(batch, steps=1, lr=0.3 * 4 / 8)
    for mode in DP_MODES:
        got, _ = train(mode, [batch], sigma=0.0, clip=math.inf)
        assert_same(ref, got)


def _per_example_grads(batch) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The Toy's initial state and each example's gradient from a batch of one (plain autograd)."""
    torch.manual_seed(0)
    model = Toy()
    start = {k: t.detach().clone() for k, t in model.state_dict().items()}
    grads = []
    for i in range(batch[0].shape[0]):
        model.zero_grad()
        one = [t[i : i + 1] for t in batch]
        loss_fn(model(*one[:3]), one[3]).backward()
        grads.append({k: p.grad.detach().clone() for k, p in model.named_parameters()})
    return start, grads


@pytest.mark.parametrize("clip", [0.5, 1.5, 10.0])
def test_each_example_is_clipped_to_exactly_min_1_c_over_its_norm(clip):
    """One noiseless step on a mean-reduced loss equals sum_i min(1, C / ||g_i||) g_i / B,
    g_i from a batch of one. Exact, so a clip factor of C / ||g||^2 or a mean-loss rescale by
    B instead of B^2 shows (the triangle bound above is too loose for either)."""
    x, *rest = _fixed_batch(8, seed=5)
    batch = (x * torch.linspace(0.2, 4.0, 8)[:, None], *rest)  # per-example norms spread out
    start, grads = _per_example_grads(batch)
    norms = [math.sqrt(sum(float(t.square().sum()) for t in gi.values())) for gi in grads]
    factors = [min(1.0, clip / n) for n in norms]
    if clip == 1.5:  # norms 0.7-3.5: clipped and unclipped examples in one batch
        assert min(norms) < clip < max(norms)
    want = {
        k: start[k] - 0.3 * sum(c * gi[k] for c, gi in zip(factors, grads)) / 8 for k in grads[0]
    }
    for mode in DP_MODES:
        got, _ = train(mode, [batch], sigma=0.0, clip=clip)
        assert_same(want, got)


def test_each_step_is_charged_before_its_noise_is_drawn(monkeypatch):
    """DP invariant 6: inside step() the ledger is charged before the first draw. (A lazydp
    forward may draw earlier: that catch-up is the noise of steps already charged.)"""
    from lazydp.ledger import PrivacyLedger
    from lazydp.noise import GaussianNoise
    from lazydp.optim.dp_optimizer import DPOptimizer

    events: list[str] = []

    def spy(cls, name: str, label: str) -> None:
        inner = getattr(cls, name)

        def wrapped(self, *args, **kwargs):
            events.append(label)
            return inner(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, wrapped)

    spy(PrivacyLedger, "charge", "charge")
    spy(GaussianNoise, "_next_call", "draw")
    spy(DPOptimizer, "step", "step")
    for mode in DP_MODES:
        events.clear()
        train(mode, make_batches(3))
        starts = [i for i, e in enumerate(events) if e == "step"]
        assert len(starts) == 3
        for i in starts:
            inside = [e for e in events[i + 1 :] if e in ("charge", "draw")]
            assert inside[0] == "charge", (mode, events)


def test_infinite_clip_with_noise_is_refused():
    from lazydp import ConfigError

    with pytest.raises(ConfigError, match="max_grad_norm"):
        train("dpsgd_f", [], sigma=1.0, clip=math.inf)


def _one_step(mode: str, model: torch.nn.Module, inputs, loss_of, *, clip: float, batch: int):
    """One noiseless step at lr 1 with ``batch`` as the expected batch size; flushed."""
    engine = PrivacyEngine(seed=0)
    data = torch.utils.data.TensorDataset(torch.zeros(100_000))
    with zero_noise():
        model, opt, _ = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=torch.utils.data.DataLoader(data, batch_size=batch),
            noise_multiplier=1.0,
            max_grad_norm=clip,
            mode=mode,
            loss_reduction="sum",
        )
        loss_of(model(*inputs)).backward()
        opt.step()
        engine.flush()


@pytest.mark.parametrize("mode", DP_MODES)
def test_a_float64_model_is_clipped_to_c_in_float64(mode):
    """Clip factors rounded to float32 left a clipped float64 example at C (1 +- 4e-8)."""
    for seed in range(5):
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2).double()
        before = [p.detach().clone() for p in model.parameters()]
        x = 5 * torch.randn(1, 3, dtype=torch.float64)  # one example, far above C
        _one_step(mode, model, (x,), lambda out: out.pow(2).sum(), clip=1.0, batch=1)
        moved = torch.cat([(p.detach() - b).view(-1) for p, b in zip(model.parameters(), before)])
        assert abs(float(moved.norm()) - 1.0) < 1e-12  # the step IS the clipped gradient


@pytest.mark.parametrize("mode", DP_MODES)
def test_many_small_contributions_to_one_row_of_a_small_table_add_up(mode):
    """4096 examples each move row 0 of a 10-row table by 2.4e-8 (below half an ulp of 1.0 in
    float32): summed first, as torch's sparse SGD does, the row moves by 1e-4; added one by
    one into the weight, each vanished and the row did not move."""
    emb = torch.nn.Embedding(10, 1)
    with torch.no_grad():
        emb.weight.fill_(1.0)
    ids = torch.zeros(4096, 1, dtype=torch.long)
    loss_of = lambda out: out.sum() * 1e-4  # noqa: E731
    _one_step(mode, torch.nn.Sequential(emb), (ids,), loss_of, clip=1e6, batch=4096)
    assert abs(float(emb.weight[0, 0]) - (1.0 - 1e-4)) < 1e-7
