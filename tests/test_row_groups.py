"""RowGroups (one stable sort per call's ids) against the obvious unique + index_add_."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from lazydp.row_groups import RowGroups


def _reference(ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, inverse = torch.unique(ids, return_inverse=True)
    return rows, values.new_zeros((rows.numel(), values.shape[1])).index_add_(0, inverse, values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n,num_rows", [(0, 5), (1, 5), (7, 1000), (500, 50), (4000, 10**6)])
def test_sum_per_row_matches_index_add(dtype: torch.dtype, n: int, num_rows: int) -> None:
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, num_rows, (n,), generator=g)
    values = torch.randn(n, 6, generator=g).to(dtype)
    groups = RowGroups(ids)
    rows, want = _reference(ids, values.double())
    assert torch.equal(groups.rows, rows)
    assert torch.equal(groups.counts, torch.bincount(ids, minlength=num_rows)[rows])
    assert groups.unique == (rows.numel() == n)
    assert torch.equal(groups.rows[groups.positions()], ids)
    got = groups.sum_per_row(values)
    assert got.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_sum_per_row_without_a_segment_kernel_falls_back() -> None:
    ids = torch.tensor([3, 1, 3, 3])
    values = torch.arange(8, dtype=torch.int64).view(4, 2)
    assert RowGroups(ids).sum_per_row(values).tolist() == [[2, 3], [10, 13]]


def _pair_weights_brute(bag: torch.Tensor, ids: torch.Tensor) -> dict[tuple[int, int], int]:
    counts: dict[tuple[int, int], int] = {}
    for pair in zip(bag.tolist(), ids.tolist()):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


@pytest.mark.parametrize("seed", range(20))
def test_pairs_match_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 6, (30,), generator=g)
    bag = torch.repeat_interleave(torch.arange(30), lengths)  # non-decreasing, as in one call
    ids = torch.randint(0, 40 + 20 * seed, (bag.numel(),), generator=g)
    want = _pair_weights_brute(bag, ids)
    groups = RowGroups(ids)
    found = groups.pairs(bag)
    if found is None:
        assert max(want.values()) == 1
        return
    pair_bag, pair = found
    sorted_ids = ids[groups.order]
    got: dict[tuple[int, int], int] = {}
    for j, p in enumerate(pair.tolist()):
        key = (int(pair_bag[p]), int(sorted_ids[j]))
        got[key] = got.get(key, 0) + 1
    assert got == want and pair_bag.numel() == len(want)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("length", [2, 3, 20])
def test_equal_bags_without_a_bag_tensor_equal_the_explicit_bags(seed: int, length: int) -> None:
    # pairs / sum_gathered / BagFactors with bag None and `length` (id j in bag j // length)
    # against the same calls given the bag of each id; about half the seeds repeat a pair.
    from lazydp.clipping._base import BagFactors

    g = torch.Generator().manual_seed(seed)
    bags = 6
    ids = torch.randint(0, 4 * length * bags // (1 + seed % 3), (bags * length,), generator=g)
    bag = torch.arange(bags).repeat_interleave(length)
    groups, explicit = RowGroups(ids), RowGroups(ids)
    assert torch.equal(groups.bag_in_sorted_order(None, length), bag[groups.order])
    found, want = groups.pairs(None, length), explicit.pairs(bag)
    assert (found is None) == (want is None)
    if want is not None:
        assert found is not None
        assert all(torch.equal(a, b) for a, b in zip(found, want))
    per_bag, w = torch.randn(bags, 5, generator=g), torch.rand(ids.numel(), generator=g)
    torch.testing.assert_close(
        groups.sum_gathered(per_bag, None, w, length), explicit.sum_gathered(per_bag, bag, w)
    )
    torch.testing.assert_close(
        BagFactors(None, per_bag, w, length).values(), BagFactors(bag, per_bag, w).values()
    )
    f64 = per_bag.to(torch.int64)  # no segment-sum kernel: the gathered fallback
    assert torch.equal(
        groups.sum_gathered(f64, None, None, length), explicit.sum_gathered(f64, bag)
    )


def test_pairs_see_repeats_that_are_far_apart_in_the_input() -> None:
    # Row 7 is read by bags 0, 1, 1: the two reads of bag 1 are not neighbours in the input.
    bag = torch.tensor([0, 0, 1, 1, 1])
    found = RowGroups(torch.tensor([7, 2, 7, 9, 7])).pairs(bag)
    assert found is not None and found[0].tolist() == [0, 0, 1, 1]
    assert RowGroups(torch.tensor([7, 2, 7, 9, 8])).pairs(bag) is None


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_sum_gathered_matches_summing_the_gathered_rows(weighted: bool, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    table = (torch.randn(9, 5, generator=g) * 10).to(dtype)
    index = torch.randint(0, 9, (300,), generator=g)
    ids = torch.randint(0, 40, (300,), generator=g)
    w = torch.rand(300, generator=g, dtype=torch.float64) if weighted else None
    groups = RowGroups(ids)
    if w is not None and not dtype.is_floating_point:
        w = torch.randint(0, 3, (300,), generator=g)
    rows = table[index] if w is None else table[index] * w.to(dtype)[:, None]
    want = groups.sum_per_row(rows)
    got = groups.sum_gathered(table, index, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_factored_sparse_rows_equal_their_materialised_values() -> None:
    from lazydp.clipping._base import BagFactors, SparseRows

    g = torch.Generator().manual_seed(4)
    per_bag, bag = torch.randn(6, 3, generator=g), torch.randint(0, 6, (50,), generator=g)
    w, ids = torch.rand(50, generator=g), torch.randint(0, 20, (50,), generator=g)
    factored = SparseRows(ids, BagFactors(bag, per_bag, w), 20)
    plain = SparseRows(ids, per_bag[bag] * w[:, None], 20)
    a, b = factored.coalesce(), plain.coalesce()
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.values, b.values)
    torch.testing.assert_close(factored.values, plain.values)  # built on demand
    torch.testing.assert_close(factored.to_dense(), plain.to_dense())


@pytest.mark.parametrize("num_rows", [None, 3 * 10**5])
def test_int32_keyed_sort_groups_like_the_int64_one(num_rows: int | None) -> None:
    ids = torch.randint(0, 3 * 10**5, (40_000,), generator=torch.Generator().manual_seed(5))
    groups, plain = RowGroups(ids, num_rows), RowGroups(ids)
    assert groups.sorted.dtype == torch.int64
    for name in ("sorted", "order", "rows", "counts"):
        assert torch.equal(getattr(groups, name), getattr(plain, name)), name


@pytest.mark.parametrize(
    "n,num_rows",
    [(1, 1), (2, 2), (2048, 50), (2048, 2**21), (2048, 2**21 + 1), (2048, 10**6), (16_383, 10**9)]
    + [(100, 2**52)],
)
def test_packed_sort_orders_like_torchs_stable_sort(n: int, num_rows: int) -> None:
    # Small CPU batches take a numpy sort of (id, position) keys; ties must keep input order.
    from lazydp.row_groups import _packs

    high = min(num_rows, 2**62)
    ids = torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(n))
    ids[: n // 3] = ids[n // 3 : 2 * (n // 3)]  # plenty of repeats, far apart
    if num_rows == 2**52:
        ids[0] = num_rows - 1  # 52 + 7 bits: still packs
    groups, plain = RowGroups(ids, num_rows), RowGroups(ids)
    assert _packs(ids, num_rows)
    for name in ("sorted", "order", "rows", "counts"):
        assert torch.equal(getattr(groups, name), getattr(plain, name)), name
    assert torch.equal(groups.rows[groups.positions()], ids)


def test_ids_too_wide_to_pack_take_torchs_sort() -> None:
    from lazydp.row_groups import _packs

    ids = torch.tensor([2**60, 3, 2**60, 0])
    assert not _packs(ids, 2**61)
    groups = RowGroups(ids, 2**61)
    assert groups.rows.tolist() == [0, 3, 2**60] and groups.order.tolist() == [3, 1, 0, 2]


def test_sum_gathered_without_an_index_reads_one_table_row_per_id() -> None:
    from lazydp.clipping._base import BagFactors, SparseRows

    g = torch.Generator().manual_seed(6)
    ids, table = torch.randint(0, 30, (64,), generator=g), torch.randn(64, 4, generator=g)
    groups = RowGroups(ids)
    torch.testing.assert_close(groups.sum_gathered(table, None), groups.sum_per_row(table))
    w = torch.rand(64, generator=g)
    factored = SparseRows(ids, BagFactors(None, table, w), 30)
    torch.testing.assert_close(factored.coalesce().values, groups.sum_per_row(table * w[:, None]))
    torch.testing.assert_close(factored.values, table * w[:, None])


def test_shape_cache_builds_once_per_key_and_starts_over_past_its_limit() -> None:
    from lazydp._cache import ShapeCache

    built: list[int] = []
    cache: ShapeCache[int, list[int]] = ShapeCache(lambda n: built.append(n) or [n], limit=2)
    first = cache(1)
    assert cache(1) is first and built == [1]
    cache(2)
    cache(3)  # a third key: the cache starts over instead of growing
    assert cache(1) is not first and built == [1, 2, 3, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("length", [1, 3])
def test_sum_gathered_of_distinct_ids_is_the_segment_kernels_result(
    weighted: bool, length: int, dtype: torch.dtype
) -> None:
    # All ids distinct: a gather and a scale, the bits the one-id segments give (bfloat16
    # keeps the kernel: its halfway products round away from zero, a gather's mul_ to even).
    ids = torch.randperm(1000)[:60]
    groups = RowGroups(ids, 1000)
    assert groups.unique
    per_bag = torch.randn(60 // length, 8).to(dtype)
    w = torch.rand(60).to(dtype) if weighted else None
    got = groups.sum_gathered(per_bag, None, w, length)
    sorted_w = None if w is None else w.index_select(0, groups.order)
    kernel = F.embedding_bag(
        groups.bag_in_sorted_order(None, length),
        per_bag,
        groups.counts.cumsum(0) - groups.counts,
        mode="sum",
        per_sample_weights=sorted_w,
    )
    assert torch.equal(got, kernel)
