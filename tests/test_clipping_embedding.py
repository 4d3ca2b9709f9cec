"""nn.Embedding clipper against the batch-of-one reference: repeats, padding, calls, validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lazydp.clipping import Call, clipper_for
from lazydp.errors import InputError, UnsupportedLayerError
from tests.test_clipping_reference import capture, check_clipper

FAST = settings(max_examples=25, deadline=None)


@FAST
@given(
    batch=st.integers(1, 5),
    positions=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    num_rows=st.integers(1, 6),  # few rows: repeated ids within an example are common
    dim=st.integers(1, 4),
    padding=st.booleans(),
    n_calls=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_embedding_matches_reference(
    batch, positions, num_rows, dim, padding, n_calls, seed
) -> None:
    gen = torch.Generator().manual_seed(seed)
    padding_idx = int(torch.randint(num_rows, (), generator=gen)) if padding else None
    table = nn.Embedding(num_rows, dim, padding_idx=padding_idx).double()
    inputs = [
        ((torch.randint(num_rows, (batch, *positions), generator=gen),), {}) for _ in range(n_calls)
    ]
    calls = capture(table, inputs, seed)
    check_clipper(table, calls, seed=seed)
    rows = clipper_for(table).clipped_sum(table, calls, torch.ones(batch))["weight"]
    if padding_idx is not None:
        assert not (rows.indices == padding_idx).any()


def test_embedding_repeated_id_norm_is_exact_not_independent_rows() -> None:
    """Teeth: one example reading row 2 four times with the same g has norm 4||g||, not 2||g||."""
    table = nn.Embedding(5, 3).double()
    ids = torch.tensor([[2, 2, 2, 2]])
    g = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    calls = [Call((ids,), {}, g.expand(1, 4, 3).clone())]
    norms2 = clipper_for(table).norms2(table, calls)
    torch.testing.assert_close(norms2, torch.tensor([16 * 9.0], dtype=torch.float64))
    assert not torch.allclose(norms2, torch.tensor([4 * 9.0], dtype=torch.float64))


def test_embedding_rows_read_validates_and_drops_padding() -> None:
    table = nn.Embedding(10, 2, padding_idx=0)
    clipper = clipper_for(table)
    torch.testing.assert_close(
        clipper.rows_read(table, (torch.tensor([[0, 3], [9, 0]]),), {}), torch.tensor([3, 9])
    )
    with pytest.raises(InputError, match=r"got id 10 outside \[0, 10\).*bucket count"):
        clipper.rows_read(table, (torch.tensor([[1, 10]]),), {})
    with pytest.raises(InputError, match=r"got id -1 outside"):
        clipper.rows_read(table, (torch.tensor([-1]),), {})
    with pytest.raises(InputError, match="integer tensor"):
        clipper.rows_read(table, (torch.tensor([1.0, 2.0]),), {})
    assert clipper.rows_read(table, (torch.zeros(0, 3, dtype=torch.long),), {}).numel() == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"max_norm": 1.0}, "max_norm=None"), ({"scale_grad_by_freq": True}, "mixes examples")],
)
def test_embedding_refuses_settings_without_exact_norm(kwargs, match) -> None:
    with pytest.raises(UnsupportedLayerError, match=match):
        clipper_for(nn.Embedding(4, 2, **kwargs))


def test_embedding_frozen_table_contributes_nothing() -> None:
    table = nn.Embedding(4, 2)
    table.weight.requires_grad_(False)
    calls = capture(table, [((torch.tensor([[1, 2]]),), {})], seed=0)
    clipper = clipper_for(table)
    assert clipper.norms2(table, calls).tolist() == [0.0]
    assert clipper.clipped_sum(table, calls, torch.ones(1)) == {}
