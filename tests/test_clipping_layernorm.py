"""nn.LayerNorm clipper against the batch-of-one reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lazydp.clipping import clipper_for
from lazydp.clipping.layernorm import LayerNormClipper
from lazydp.errors import InputError
from tests.test_clipping_reference import capture, check_clipper

FAST = settings(max_examples=25, deadline=None)


@FAST
@given(
    batch=st.integers(1, 4),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    normalized=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    bias=st.booleans(),
    eps=st.sampled_from([1e-5, 0.5]),
    n_calls=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_layernorm_matches_reference(batch, lead, normalized, bias, eps, n_calls, seed) -> None:
    torch.manual_seed(seed)
    layer = nn.LayerNorm(normalized, eps=eps, bias=bias).double()
    with torch.no_grad():  # non-trivial affine parameters
        layer.weight.normal_()
    inputs = [
        ((torch.randn(batch, *lead, *normalized, dtype=torch.float64) * 3 + 1,), {})
        for _ in range(n_calls)
    ]
    check_clipper(layer, capture(layer, inputs, seed), seed=seed)


def test_layernorm_is_registered_and_frozen_weight_excluded() -> None:
    layer = nn.LayerNorm(3).double()
    assert isinstance(clipper_for(layer), LayerNormClipper)
    layer.weight.requires_grad_(False)
    calls = capture(layer, [((torch.randn(2, 4, 3, dtype=torch.float64),), {})], seed=0)
    ref = check_clipper(layer, calls)
    assert set(ref) == {"bias"}


def test_layernorm_rejects_input_without_batch_dim() -> None:
    layer = nn.LayerNorm(3)
    calls = capture(layer, [((torch.randn(3),), {})], seed=0)
    with pytest.raises(InputError, match="batch dimension"):
        clipper_for(layer).norms2(layer, calls)
