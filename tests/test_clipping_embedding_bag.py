"""nn.EmbeddingBag clipper against the batch-of-one reference (each bag looked up alone by torch)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lazydp.clipping import Call, clipper_for
from lazydp.errors import InputError, UnsupportedLayerError
from tests.test_clipping_reference import Inputs, capture, check_clipper, slice_batch

FAST = settings(max_examples=25, deadline=None)


def single_bag(include_last_offset: bool):
    """Slicer: bag i alone, as torch would get it (1-D input with its own offsets)."""

    def slicer(args, kwargs, i) -> Inputs:
        offsets = kwargs.get("offsets")
        if offsets is None:
            return slice_batch(args, kwargs, i)
        ids = args[0]
        start = int(offsets[i])
        end = int(offsets[i + 1]) if i + 1 < offsets.numel() else ids.numel()
        one = {"offsets": torch.tensor([0, end - start] if include_last_offset else [0])}
        if kwargs.get("per_sample_weights") is not None:
            one["per_sample_weights"] = kwargs["per_sample_weights"][start:end]
        return (ids[start:end],), one

    return slicer


def bag_inputs(gen, num_rows, lengths, two_d, weighted, include_last_offset) -> Inputs:
    n = sum(lengths)
    ids = torch.randint(num_rows, (n,), generator=gen)
    w = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5 if weighted else None
    if two_d:
        kwargs = {} if w is None else {"per_sample_weights": w.view(len(lengths), -1)}
        return (ids.view(len(lengths), -1),), kwargs
    starts = torch.tensor([0, *lengths]).cumsum(0)
    offsets = starts if include_last_offset else starts[:-1]
    return (ids,), {"offsets": offsets, "per_sample_weights": w}


# The input flags every bag test draws (mode, weights, padding, 2-D input, seed).
FLAGS = {
    "mode": st.sampled_from(["sum", "mean"]),
    "weighted": st.booleans(),
    "padding": st.booleans(),
    "two_d": st.booleans(),
    "seed": st.integers(0, 2**16),
}


@FAST
@given(
    lengths=st.lists(st.integers(0, 5), min_size=1, max_size=5),
    num_rows=st.integers(1, 5),
    dim=st.integers(1, 3),
    include_last_offset=st.booleans(),
    n_calls=st.integers(1, 3),
    **FLAGS,
)
def test_embedding_bag_matches_reference(
    lengths, num_rows, dim, mode, weighted, padding, two_d, include_last_offset, n_calls, seed
) -> None:
    _check_bags(
        lengths, num_rows, dim, mode, weighted, padding, two_d, include_last_offset, n_calls, seed
    )


@FAST
@given(
    lengths=st.lists(st.integers(0, 1), min_size=1, max_size=6),
    num_rows=st.integers(1, 4),
    include_last_offset=st.booleans(),
    **FLAGS,
)
def test_pooling_one_fast_path_matches_reference(
    lengths, num_rows, mode, weighted, padding, two_d, include_last_offset, seed
) -> None:
    # Bags of at most one lookup take norms2's short path (no (example, row) grouping).
    _check_bags(lengths, num_rows, 2, mode, weighted, padding, two_d, include_last_offset, 1, seed)


@FAST
@given(
    lengths=st.lists(st.integers(0, 4), min_size=1, max_size=6),
    num_rows=st.integers(1, 60),
    **FLAGS,
)
def test_one_call_norms_with_and_without_repeats_in_a_bag(
    lengths, num_rows, mode, weighted, padding, two_d, seed
) -> None:
    # One call groups its ids with RowGroups: ids all distinct, repeated only across bags (no
    # pair repeats: the short formula) and repeated inside a bag (pairs grouped).
    _check_bags(lengths, num_rows, 2, mode, weighted, padding, two_d, False, 1, seed)


def _check_bags(
    lengths, num_rows, dim, mode, weighted, padding, two_d, include_last_offset, n_calls, seed
) -> None:
    gen = torch.Generator().manual_seed(seed)
    weighted = weighted and mode == "sum"  # torch allows per_sample_weights only with sum
    if two_d:
        lengths = [max(1, *lengths)] * len(lengths)  # torch needs L >= 1 for 2-D input
        include_last_offset = False
    padding_idx = int(torch.randint(num_rows, (), generator=gen)) if padding else None
    table = nn.EmbeddingBag(
        num_rows, dim, mode=mode, padding_idx=padding_idx, include_last_offset=include_last_offset
    ).double()
    inputs = [
        bag_inputs(gen, num_rows, lengths, two_d, weighted, include_last_offset)
        for _ in range(n_calls)
    ]
    check_clipper(table, capture(table, inputs, seed), single_bag(include_last_offset), seed=seed)


@pytest.mark.parametrize("form", ["2d", "offsets", "last_offset"])
@pytest.mark.parametrize("repeats", [False, True])
def test_equal_bags_match_reference_with_and_without_repeats(form, repeats) -> None:
    # Equal bags (DLRM's pooling L) never build a bag tensor: no repeat in a bag gives
    # L * ||g_i||^2; a repeat takes the grouped path. Both against the batch-of-one reference.
    gen = torch.Generator().manual_seed(7)
    batch, length = 6, 4
    ids = torch.randperm(50, generator=gen)[: batch * length].view(batch, length)
    if repeats:
        ids[2, 3] = ids[2, 0]
    table = nn.EmbeddingBag(50, 3, mode="sum", include_last_offset=form == "last_offset").double()
    if form == "2d":
        inputs, slicer = [((ids,), {})], slice_batch
    else:
        offsets = torch.arange(0, batch * length + (form == "last_offset"), length)
        offsets = offsets[: batch + (form == "last_offset")]
        inputs = [((ids.reshape(-1),), {"offsets": offsets})]
        slicer = single_bag(form == "last_offset")
    check_clipper(table, capture(table, inputs, 3), slicer, seed=3)


def test_bag_repeating_one_id_16_times_has_norm_16_g_not_4_g() -> None:
    """Teeth: the sqrt(L) * ||g|| shortcut gives 4||g|| here; the exact norm is 16||g||."""
    table = nn.EmbeddingBag(10, 2, mode="sum")
    g = torch.tensor([[3.0, 4.0]])  # ||g|| = 5
    calls = [Call((torch.full((1, 16), 7),), {}, g)]
    norm = clipper_for(table).norms2(table, calls).sqrt()
    torch.testing.assert_close(norm, torch.tensor([80.0]))
    assert not torch.allclose(norm, torch.tensor([20.0]))


def test_empty_and_all_padding_bags_have_zero_norm() -> None:
    table = nn.EmbeddingBag(6, 2, mode="mean", padding_idx=0)
    ids, offsets = (
        torch.tensor([0, 0, 3, 3, 4]),
        torch.tensor([0, 0, 2]),
    )  # empty, padding-only, real
    calls = capture(table, [((ids, offsets), {})], seed=1)
    norms2 = clipper_for(table).norms2(table, calls)
    g = calls[0].grad_output[2]
    # Bag 2 = rows {3: 2/3, 4: 1/3} (mean over 3 entries): ||g||^2 * (4/9 + 1/9).
    torch.testing.assert_close(
        norms2, torch.stack([g.new_zeros(()), g.new_zeros(()), (g**2).sum() * 5 / 9])
    )


def test_rows_read_validates_ids_and_offsets() -> None:
    table = nn.EmbeddingBag(1000, 4, mode="sum", padding_idx=5)
    clipper = clipper_for(table)
    rows = clipper.rows_read(
        table, (torch.tensor([1, 5, 7, 999]),), {"offsets": torch.tensor([0, 2])}
    )
    assert rows.tolist() == [1, 7, 999]
    with pytest.raises(
        InputError, match=r"EmbeddingBag\(1000 rows\) got id 123456 outside \[0, 1000\)"
    ):
        clipper.rows_read(table, (torch.tensor([[1, 123456]]),), {})
    with pytest.raises(InputError, match="integer tensor"):
        clipper.rows_read(table, (torch.tensor([[1.0, 2.0]]),), {})
    with pytest.raises(InputError, match="start at 0"):
        clipper.rows_read(table, (torch.tensor([1, 2]), torch.tensor([1])), {})
    with pytest.raises(InputError, match="non-decreasing"):
        clipper.rows_read(table, (torch.tensor([1, 2, 3]), torch.tensor([0, 2, 1])), {})
    with pytest.raises(InputError, match="offsets=None"):
        clipper.rows_read(table, (torch.tensor([[1, 2]]), torch.tensor([0])), {})
    last = nn.EmbeddingBag(10, 4, mode="sum", include_last_offset=True)
    with pytest.raises(InputError, match="last offset must equal the number of ids"):
        clipper.rows_read(last, (torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])), {})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "max"}, r'mode="max"\) has no exact per-example norm; use mode="sum" or "mean"'),
        ({"max_norm": 2.0}, "max_norm=None"),
        ({"scale_grad_by_freq": True}, "mixes examples"),
    ],
)
def test_embedding_bag_refusals(kwargs, match) -> None:
    with pytest.raises(UnsupportedLayerError, match=match):
        clipper_for(nn.EmbeddingBag(4, 2, **kwargs))
