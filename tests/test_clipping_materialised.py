"""Generic helpers of the materialised (dpsgd_b) path: dense and compact per-example gradients."""

from __future__ import annotations

import pytest
import torch

from lazydp.clipping import PerSampleRows, SparseRows, per_sample_clipped_sum, per_sample_norms2
from lazydp.errors import InputError


def test_norms_and_sum_mix_dense_and_rows() -> None:
    dense = torch.tensor([[1.0, 2.0], [0.0, 3.0]])  # example 0: 5, example 1: 9
    rows = PerSampleRows(
        example=torch.tensor([0, 1, 1]),
        indices=torch.tensor([4, 4, 0]),
        values=torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 1.0]]),
        num_rows=5,
        batch_size=2,
    )
    ps = {"bias": dense, "weight": rows}
    torch.testing.assert_close(per_sample_norms2(ps, 2), torch.tensor([5.0 + 4.0, 9.0 + 3.0]))
    c = torch.tensor([0.5, 2.0])
    sums = per_sample_clipped_sum(ps, c, {"bias": (2,), "weight": 5})
    torch.testing.assert_close(sums["bias"], torch.tensor([0.5, 7.0]))
    assert isinstance(sums["weight"], SparseRows)
    expected = torch.zeros(5, 2)
    expected[4] = torch.tensor([1.0, 0.0]) + torch.tensor([2.0, 2.0])
    expected[0] = torch.tensor([0.0, 2.0])
    torch.testing.assert_close(sums["weight"].to_dense(), expected)


def test_no_parameters_gives_zero_norms() -> None:
    assert per_sample_norms2({}, 3).tolist() == [0.0, 0.0, 0.0]


def test_shape_mismatches_are_named() -> None:
    with pytest.raises(InputError, match="'w' has 3 examples; expected 2"):
        per_sample_norms2({"w": torch.ones(3, 2)}, 2)
    with pytest.raises(
        InputError, match=r"'w' per-example gradient has shape \(2,\); expected \(3,\)"
    ):
        per_sample_clipped_sum({"w": torch.ones(2, 2)}, torch.ones(2), {"w": (3,)})
    rows = PerSampleRows(
        torch.tensor([0]), torch.tensor([1]), torch.ones(1, 2), num_rows=4, batch_size=1
    )
    with pytest.raises(InputError, match="'e' has 4 rows; expected 8"):
        per_sample_clipped_sum({"e": rows}, torch.ones(1), {"e": 8})
    with pytest.raises(InputError, match=r"expected \(2,\)"):
        per_sample_clipped_sum({"w": torch.ones(2, 2)}, torch.ones(3))
