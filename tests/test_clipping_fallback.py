"""torch.func fallback against the batch-of-one reference: Conv1d/2d, GroupNorm, a raw-Parameter leaf."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lazydp.clipping import Call, clipper_for
from lazydp.clipping.fallback import FallbackClipper
from lazydp.errors import UnsupportedLayerError
from tests.test_clipping_reference import capture, check_clipper

FAST = settings(max_examples=15, deadline=None)


class LearnedScale(nn.Module):
    """A custom leaf with a raw nn.Parameter, a frozen one, a buffer and a keyword argument."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(dim, dtype=torch.float64))
        self.frozen = nn.Parameter(torch.ones(dim, dtype=torch.float64), requires_grad=False)
        self.register_buffer("shift", torch.full((dim,), 0.5, dtype=torch.float64))

    def forward(self, x: Tensor, power: int = 2) -> Tensor:
        return torch.tanh(x * self.scale) ** power * self.frozen + self.shift


@FAST
@given(
    batch=st.integers(1, 4),
    channels=st.integers(1, 3),
    length=st.integers(3, 6),
    two_d=st.booleans(),
    n_calls=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_conv_matches_reference(batch, channels, length, two_d, n_calls, seed) -> None:
    torch.manual_seed(seed)
    conv = (
        nn.Conv2d(channels, 2, 2, padding=1) if two_d else nn.Conv1d(channels, 2, 3, stride=2)
    ).double()
    shape = (batch, channels, length, length) if two_d else (batch, channels, length)
    inputs = [((torch.randn(*shape, dtype=torch.float64),), {}) for _ in range(n_calls)]
    check_clipper(conv, capture(conv, inputs, seed), seed=seed)


def test_groupnorm_matches_reference() -> None:
    torch.manual_seed(0)
    layer = nn.GroupNorm(2, 4).double()
    with torch.no_grad():
        layer.weight.normal_()
    assert isinstance(clipper_for(layer), FallbackClipper)
    check_clipper(
        layer, capture(layer, [((torch.randn(3, 4, 5, dtype=torch.float64),), {})], seed=1)
    )


def test_custom_leaf_with_raw_parameter_and_kwargs() -> None:
    torch.manual_seed(2)
    layer = LearnedScale(3)
    x = torch.randn(5, 3, dtype=torch.float64)
    calls = capture(layer, [((x,), {"power": 3}), ((x * 2,), {})], seed=3)
    ref = check_clipper(layer, calls)
    assert set(ref) == {"scale"}
    torch.testing.assert_close(layer.shift, torch.full((3,), 0.5, dtype=torch.float64))


def test_fallback_skips_hooks_installed_on_the_instance() -> None:
    """The engine may wrap forward on the instance; the fallback must not re-enter that wrapper."""
    layer = nn.Conv1d(1, 1, 2).double()
    x = torch.randn(2, 1, 4, dtype=torch.float64)
    calls = capture(layer, [((x,), {})], seed=0)
    seen = []
    layer.register_forward_hook(lambda *a: seen.append(1))
    layer.forward = lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("instance forward re-entered")
    )
    clipper = clipper_for(layer)
    clipper.norms2(layer, calls)
    clipper.clipped_sum(layer, calls, torch.ones(2))
    assert seen == []


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:  # data-dependent Python control flow: not vmappable
            return x * self.w
        return x


def test_unvmappable_layer_raises_with_name_and_cause() -> None:
    layer = DataDependent()
    calls = [Call((torch.ones(3, 2),), {}, torch.ones(3, 2))]
    with pytest.raises(
        UnsupportedLayerError, match=r"DataDependent .*vmap.*(data-dependent|Tensor)"
    ):
        clipper_for(layer).norms2(layer, calls)
    with pytest.raises(UnsupportedLayerError, match="DataDependent"):
        clipper_for(layer).clipped_sum(layer, calls, torch.ones(3))


class WithMemory(nn.Module):
    """Adds the mean of a memory shared by the whole batch (it happens to have B rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        return x * self.w + memory.mean(0)


class Centred(nn.Module):
    """Subtracts the batch mean: every output row depends on every example."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def forward(self, x: Tensor) -> Tensor:
        return (x - x.mean(0)) * self.w


class MaskedCentred(Centred):
    """Mixes examples, and masks one logit to -inf (an infinite scale used to disable the check)."""

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return out.masked_fill(torch.arange(2) == 1, float("-inf"))


class BigRow(Centred):
    """Mixes examples a little, next to one huge row (a batch-wide tolerance hid the mixing)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * self.w + 1e-6 * x.mean(0)


@pytest.mark.parametrize(
    ("layer", "args"),
    [
        (WithMemory(), (torch.randn(3, 2), torch.randn(3, 2))),
        (Centred(), (torch.randn(3, 2),)),
        (MaskedCentred(), (torch.randn(3, 2),)),
        (BigRow(), (torch.tensor([[1.0, 1.0], [1e6, 1e6], [1.0, -1.0]]),)),
    ],
)
def test_a_layer_whose_rows_depend_on_other_examples_is_refused(layer, args) -> None:
    calls = [Call(args, {}, torch.ones(3, 2))]
    clipper = clipper_for(layer)
    with pytest.raises(UnsupportedLayerError, match="depends on the other examples"):
        clipper.norms2(layer, calls)
    with pytest.raises(UnsupportedLayerError, match="depends on the other examples"):
        clipper.clipped_sum(layer, calls, torch.ones(3))


@pytest.mark.parametrize("cell", [nn.GRUCell, nn.RNNCell])
@pytest.mark.parametrize("form", ["omitted", "None", "hx=None"])
def test_recurrent_cells_called_without_a_state_match_the_reference(cell, form):
    # torch makes the zero state inside forward: under vmap's one-example call it had the whole
    # batch's size, and the step failed with a shape error from inside torch.func.
    layer = cell(3, 4).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    args, kwargs = {
        "omitted": ((x,), {}),
        "None": ((x, None), {}),
        "hx=None": ((x,), {"hx": None}),
    }[form]
    check_clipper(layer, capture(layer, [(args, kwargs)], seed=4))
