"""nn.Linear clipper against the batch-of-one reference: 2-D, sequences, Gram vs materialised, calls."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lazydp.clipping import clipper_for
from lazydp.clipping import linear as linear_mod
from lazydp.errors import InputError
from tests.test_clipping_reference import capture, check_clipper

FAST = settings(max_examples=25, deadline=None)


@FAST
@given(
    batch=st.integers(1, 5),
    seq=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    d_in=st.integers(1, 6),
    d_out=st.integers(1, 6),
    bias=st.booleans(),
    n_calls=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_linear_matches_reference(batch, seq, d_in, d_out, bias, n_calls, seed) -> None:
    torch.manual_seed(seed)
    layer = nn.Linear(d_in, d_out, bias=bias).double()
    inputs = [((torch.randn(batch, *seq, d_in, dtype=torch.float64),), {}) for _ in range(n_calls)]
    check_clipper(layer, capture(layer, inputs, seed), seed=seed)


@pytest.mark.parametrize("chunk", [1 << 25, 7])
@pytest.mark.parametrize(("seq", "d_in", "d_out"), [(2, 8, 8), (9, 2, 3)])
def test_linear_gram_and_materialised_paths_agree(monkeypatch, chunk, seq, d_in, d_out) -> None:
    """(2, 8, 8) picks Gram (T(d_in+d_out)=32 < 64), (9, 2, 3) materialises; tiny chunks too."""
    monkeypatch.setattr(linear_mod, "_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    layer = nn.Linear(d_in, d_out).double()
    x = torch.randn(5, seq, d_in, dtype=torch.float64)
    check_clipper(layer, capture(layer, [((x,), {})], seed=1))


def test_linear_frozen_bias_and_kwarg_input() -> None:
    torch.manual_seed(1)
    layer = nn.Linear(4, 3).double()
    layer.bias.requires_grad_(False)
    calls = capture(layer, [((), {"input": torch.randn(6, 4, dtype=torch.float64)})], seed=2)
    ref = check_clipper(layer, calls)
    assert set(ref) == {"weight"}
    assert set(clipper_for(layer).clipped_sum(layer, calls, torch.ones(6))) == {"weight"}


def test_linear_frozen_weight_counts_only_bias() -> None:
    layer = nn.Linear(4, 3).double()
    layer.weight.requires_grad_(False)
    calls = capture(layer, [((torch.randn(2, 4, dtype=torch.float64),), {})], seed=2)
    g = calls[0].grad_output
    torch.testing.assert_close(clipper_for(layer).norms2(layer, calls), (g**2).sum(1))


def test_linear_sequence_norm_is_not_the_2d_shortcut() -> None:
    """Teeth: on sequences, sum_t ||a_t||^2 ||g_t||^2 (per-position 2-D formula) is wrong."""
    torch.manual_seed(3)
    layer = nn.Linear(3, 2).double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    calls = capture(layer, [((x,), {})], seed=4)
    g = calls[0].grad_output
    shortcut = ((x**2).sum(2) * (g**2).sum(2)).sum(1) + (g.sum(1) ** 2).sum(1)
    exact = clipper_for(layer).norms2(layer, calls)
    assert not torch.allclose(exact, shortcut, rtol=1e-3)


def test_linear_rejects_unbatched_input() -> None:
    layer = nn.Linear(3, 2)
    calls = capture(layer, [((torch.randn(3),), {})], seed=0)
    with pytest.raises(InputError, match="batch dimension"):
        clipper_for(layer).norms2(layer, calls)


def test_linear_rejects_wrong_clip_factor_shape() -> None:
    layer = nn.Linear(3, 2)
    calls = capture(layer, [((torch.randn(4, 3),), {})], seed=0)
    with pytest.raises(InputError, match=r"expected \(4,\)"):
        clipper_for(layer).clipped_sum(layer, calls, torch.ones(3))
