"""Mixed precision: a forward under torch.autocast (bfloat16) with float32 parameters.

The layers compute in bfloat16, the parameters and the DP step stay float32: norms and clipped
sums are taken in float32 (clipping/_base.widened), so the clip bound holds to float32 rounding.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lazydp import PrivacyEngine

from .toy import Toy

MODES = ["dpsgd_b", "dpsgd_f", "dpsgd_r", "lazydp"]
C = 0.5


def _identical_examples(n: int) -> DataLoader:
    # Every example the same: each is clipped to exactly C and all point one way, so the step's
    # clipped sum has norm exactly B * C (B = the batch size).
    x = torch.full((n, 3), 3.0)
    bag = torch.tensor([[1, 2, 3]]).repeat(n, 1)
    emb = torch.tensor([[4, 5]]).repeat(n, 1)
    y = torch.zeros(n)
    return DataLoader(TensorDataset(x, bag, emb, y), batch_size=8)


def _step(mode: str, autocast: bool) -> float:
    """Norm of the parameter change after one step at lr 1, noise 0."""
    torch.manual_seed(0)
    model = Toy()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(20)  # gradients far above C: every example is clipped
    before = [p.detach().clone() for p in model.parameters()]
    engine = PrivacyEngine(seed=0)
    model, opt, data = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=_identical_examples(32),
        noise_multiplier=0.0,
        max_grad_norm=C,
        mode=mode,
        sampler="shuffle",
    )
    x, bag, emb, y = next(iter(data))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, bag, emb)
        loss = nn.functional.binary_cross_entropy_with_logits(out.float(), y, reduction="sum")
    loss.backward()
    opt.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    change = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    engine.detach()
    return float(change.double().norm())


@pytest.mark.parametrize("mode", MODES)
def test_a_bfloat16_autocast_step_is_clipped_to_float32_precision(mode):
    # Update = lr * clipped sum / B = C exactly (every example clipped, all identical). Norms
    # taken in bfloat16 would be off by up to 2^-8 (0.4%); float32 gives ~1e-7.
    assert _step(mode, autocast=True) == pytest.approx(C, rel=1e-4)


def test_the_same_check_in_float32_without_autocast():
    assert _step("dpsgd_f", autocast=False) == pytest.approx(C, rel=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_is_clipped_to_c_in_its_own_rounding(mode, dtype):
    # Norms of float16 gradients were squared in float16 (inf above a norm of 256: every step
    # refused as "NaN or Inf"), and bfloat16 clip factors came from 8-bit norms (an example
    # reached 1.0085 C). Taken in float32, one example's update is C to the dtype's rounding.
    worst = 0.0
    for seed in range(10):
        torch.manual_seed(seed)
        model = nn.Linear(7, 3).to(dtype)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()  # the update is then the rounded clipped gradient itself
        x, y = (30 * torch.randn(1, 7)).to(dtype), torch.randn(1, 3).to(dtype)
        engine = PrivacyEngine(seed=0)
        model, opt, data = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=1),
            noise_multiplier=0.0,
            max_grad_norm=C,
            mode=mode,
            sampler="shuffle",
            loss_reduction="sum",
        )
        xb, yb = next(iter(data))
        ((model(xb) - yb) ** 2).sum().backward()
        opt.step()
        update = torch.cat([p.detach().double().flatten() for p in model.parameters()])
        worst = max(worst, float(update.norm()) / C)
        engine.detach()
    assert 1 - 2e-3 < worst <= 1 + torch.finfo(dtype).eps / 2
