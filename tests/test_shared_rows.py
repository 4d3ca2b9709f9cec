"""shared_rows.sum_sq_norms (several layers' row norms in one reduction) against one by one."""

from __future__ import annotations

import pytest
import torch

from lazydp.clipping._base import sq_norms
from lazydp.clipping.shared_rows import _runs, sum_sq_norms


def _one_by_one(rows):
    return sum(sq_norms(r.reshape(r.shape[0], -1)).double() for r in rows)


def _check(rows, reductions):
    parts = sum_sq_norms(rows)
    assert len(parts) == reductions
    torch.testing.assert_close(sum(p.double() for p in parts), _one_by_one(rows), rtol=1e-6, atol=0)


def test_views_of_a_stacked_gradient_take_one_reduction():
    # What autograd gives a DLRM's tables: the unbound slices of the interaction's gradient.
    g = torch.randn(64, 11, 8)
    views = list(g.unbind(1))[1:]  # the 10 tables; slice 0 is the bottom MLP's
    _check(views[::-1], reductions=1)  # any order


def test_views_with_gaps_between_them_are_reduced_without_the_gaps():
    g = torch.randn(16, 40)
    views = [g[:, 0:5], g[:, 10:15], g[:, 20:25], g[:, 30:35]]  # step 10 > width 5
    _check(views, reductions=1)


@pytest.mark.parametrize(
    ("cols", "expected_runs"),
    [([0, 4, 12], 2), ([0, 2, 4], 1), ([0, 4, 8, 20, 24], 2), ([3, 0, 9, 6, 20], 2)],
)
def test_unevenly_spaced_views_are_split_into_evenly_spaced_runs(cols, expected_runs):
    # Uneven steps; overlapping views (still exact: view k is [:, k, :]); two runs; any order.
    g = torch.randn(16, 40)
    views = [g[:, c : c + 4] for c in cols]
    runs = _runs(sorted(views, key=torch.Tensor.storage_offset), lambda v: v)
    assert len(runs) == expected_runs
    _check(views, reductions=expected_runs)


def test_unrelated_tensors_and_other_layouts_are_reduced_one_by_one():
    a, b = torch.randn(8, 3), torch.randn(8, 3)
    t = torch.randn(3, 8).T  # strides (1, 8): not row-major
    h = torch.randn(8, 2, 3, dtype=torch.float64)[:, 0]  # other dtype
    _check([a, b, t, h, torch.randn(8, 0)], reductions=5)


def test_a_stacked_gradient_of_another_batch_row_stride_is_not_mixed_in():
    g1, g2 = torch.randn(8, 3, 4), torch.randn(8, 5, 4)
    views = [*g1.unbind(1), *g2.unbind(1)]
    _check(views, reductions=2)


# ---------------------------------------------------------------- sum_shared_bags


def _bag_sums(views, rows, scale, groups_of=None):
    """(SparseRows, RowGroups) per table view: pooling-1 clipped sums as the EmbeddingBag
    clipper builds them (one id per bag, the clip factors as the bags' weights)."""
    from lazydp.clipping._base import BagFactors, SparseRows
    from lazydp.row_groups import RowGroups

    items = []
    for view in views:
        ids = torch.randint(0, rows, (view.shape[0],))
        s = SparseRows(ids, BagFactors(None, view, None, 1, scale), rows)
        items.append((s, RowGroups(ids, rows)))
    return items


@pytest.mark.parametrize(("rows", "step"), [(7, 1), (10_000, 1), (7, 2)])
def test_shared_bag_sums_equal_each_tables_own_bitwise(rows, step):
    from lazydp.clipping.shared_rows import sum_shared_bags

    g = torch.randn(33, 11, 8)
    scale = torch.rand(33)
    views = list(g.unbind(1))[1::step]  # every table's slice (or every other one)
    items = _bag_sums(views[::-1], rows, scale)  # any order
    expected = [s.summed_by(grp) for s, grp in items]  # each table's own embedding_bag
    sum_shared_bags(items)
    assert all(s._summed is not None for s, _ in items)
    for (s, grp), want in zip(items, expected):
        assert torch.equal(s.summed_by(grp), want)
        assert s._summed is None  # handed over once
        assert torch.equal(s.summed_by(grp), want)  # then computed afresh, the same


def test_shared_bag_sums_leave_other_sums_alone():
    from lazydp.clipping.shared_rows import sum_shared_bags

    g = torch.randn(16, 5, 4)
    views = list(g.unbind(1))
    scale = torch.rand(16)
    items = _bag_sums(views[:3], 50, scale)
    items += _bag_sums(views[3:], 50, torch.rand(16))  # other clip factors: not one kernel
    items += _bag_sums([torch.randn(16, 4)], 50, scale)  # another storage, alone
    sum_shared_bags(items)
    assert [s._summed is not None for s, _ in items] == [True] * 3 + [True, True] + [False]
