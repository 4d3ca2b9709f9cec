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
    runs = _runs(sorted(views, key=torch.Tensor.storage_offset))
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
