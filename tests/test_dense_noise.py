"""optim.eager.noisy_dense_grads: the noisy gradient of every densely noised parameter.

(sum + N(0, std^2)) / B for each parameter, drawn into one flat buffer per dtype and device.
The statistical checks use fixed seeds and also reject a wrong sigma (0.8x, 1.25x).
"""

from __future__ import annotations

import torch

from lazydp._timing import PhaseTimer
from lazydp.clipping._base import SparseRows
from lazydp.noise import CHUNK_NUMEL, GaussianNoise
from lazydp.optim.eager import noisy_dense_grads
from lazydp.testing import constant_noise
from tests.test_noise import assert_gaussian

B = 64.0


def _grads(pairs, std, noise=None, timer=None):  # type: ignore[no-untyped-def]
    noise = noise or GaussianNoise(seed=3)
    return noisy_dense_grads(pairs, noise, std, B, timer or PhaseTimer())


def test_every_gradient_is_sum_plus_gaussian_over_b() -> None:
    # Many small tensors (an MLP's biases and weights) and one spanning several chunks.
    shapes = [(7,), (33, 5), (1,), (256,), (64, 100)] * 20 + [(2 * CHUNK_NUMEL + 3,)]
    params = [torch.zeros(s) for s in shapes]
    sums = [torch.full(s, 5.0) for s in shapes]
    noise = GaussianNoise(seed=21)
    grads = _grads(list(zip(sums, params)), 1.7, noise)
    assert noise.calls == 1  # one generator call for all of them
    assert [g.shape for g in grads] == [p.shape for p in params]
    flat = torch.cat([(g * B - 5.0).flatten() for g in grads])
    assert_gaussian(flat, 1.7)
    heads = [g.flatten()[:5].numpy().tobytes() for g in grads if g.numel() >= 5]
    assert len(set(heads)) == len(heads)  # no stretch of the draw handed to two parameters
    for s in sums:  # the clipped sums themselves are left as they were
        assert bool((s == 5.0).all())


def test_missing_sparse_and_zero_noise_sums() -> None:
    table, bias = torch.zeros(10, 3), torch.zeros(3)
    rows = SparseRows(torch.tensor([4, 1, 4]), torch.ones(3, 3), num_rows=10)
    grads = _grads([(rows, table), (None, bias)], 0.0)
    expected = torch.zeros(10, 3)
    expected[4], expected[1] = 2.0 / B, 1.0 / B  # duplicated rows add up
    torch.testing.assert_close(grads[0], expected, rtol=0, atol=0)
    assert bool((grads[1] == 0).all())  # no clipped sum and no noise: a zero gradient


def test_each_gradient_keeps_its_parameters_dtype() -> None:
    a, b, c = torch.zeros(4, dtype=torch.float64), torch.zeros(3), torch.zeros(2)
    noise = GaussianNoise(seed=5)
    grads = _grads([(torch.ones(4), a), (torch.ones(3), b), (None, c)], 1.0, noise)
    assert [g.dtype for g in grads] == [torch.float64, torch.float32, torch.float32]
    assert noise.calls == 2  # one buffer (one call) per dtype
    with constant_noise(2.0):
        grads = _grads([(torch.ones(4), a), (torch.ones(3), b), (None, c)], 0.5)
    assert [g.tolist() for g in grads] == [[2.0 / B] * 4, [2.0 / B] * 3, [1.0 / B] * 2]


def test_phases_are_timed_as_noise_and_merge() -> None:
    timer = PhaseTimer()
    timer.enabled = True
    _grads([(torch.ones(5), torch.zeros(5))], 1.0, timer=timer)
    assert set(timer.reset()) == {"noise", "merge"}


def test_a_large_buffer_is_drawn_in_equal_pieces_independent_of_threads():
    """Above a quarter chunk the flat buffer is split in an even number of equal pieces (a fixed
    rule): seeded gradients are the same with one thread or two."""
    params = [torch.zeros(700, 1000), torch.zeros(62_177)]  # 762k, like basic's MLPs
    out = []
    for threads in (1, 2):
        noise = GaussianNoise(seed=9, threads=threads)
        out.append(_grads([(None, p) for p in params], 1.0, noise))
        assert noise.calls == 1
    for a, b in zip(*out):
        assert torch.equal(a, b)
    assert_gaussian(torch.cat([g.flatten() for g in out[0]]) * B, 1.0)


def test_normal_each_draws_every_tensor_in_one_call():
    tensors = [torch.zeros(300, 7), torch.zeros(CHUNK_NUMEL + 11), torch.zeros(5)]
    noise = GaussianNoise(seed=12)
    noise.normal_each_(tensors, std=0.4)
    assert noise.calls == 1
    assert_gaussian(torch.cat([t.flatten() for t in tensors]), 0.4)
    # One tensor alone is chunked and keyed exactly as normal_.
    one = torch.zeros(CHUNK_NUMEL + 11)
    GaussianNoise(seed=12).normal_each_([one], std=0.4)
    torch.testing.assert_close(one, GaussianNoise(seed=12).normal_(torch.zeros_like(one), 0.4))
    strided = torch.zeros(4, 6).t()  # non-contiguous: a call of its own
    noise.normal_each_([torch.zeros(3), strided], std=1.0)
    assert noise.calls == 3 and bool((strided != 0).all())
    with constant_noise(2.0):
        out = [torch.zeros(2), torch.zeros(3)]
        GaussianNoise(seed=1).normal_each_(out, std=0.5)
        assert all(bool((t == 1.0).all()) for t in out)


def test_a_pool_serves_small_float32_buffers_and_every_value_is_used_once() -> None:
    """With a pool (DPOptimizer's, on a stream of its own), a float32 CPU buffer of at most
    half a refill takes its noise from the pool: no generator call of its own per step, every
    value handed out once, the same Gaussian; float64, larger buffers and the test override
    keep the stream's own draws."""
    from lazydp.noise_pool import POOL_NUMEL, NoisePool

    noise, pool = GaussianNoise(seed=8), NoisePool(GaussianNoise(seed=9))
    shapes = [(33, 5), (7,), (256, 64)]
    params = [torch.zeros(s) for s in shapes]
    steps = [noisy_dense_grads([(None, p) for p in params], noise, 1.3, B, PhaseTimer(), pool)]
    steps += [noisy_dense_grads([(None, p) for p in params], noise, 1.3, B, PhaseTimer(), pool)]
    assert noise.calls == 0 and pool.noise.calls == 1  # one refill serves both steps
    flat = torch.cat([g.flatten() * B for grads in steps for g in grads])
    heads = [g.flatten()[:5].numpy().tobytes() for grads in steps for g in grads]
    assert len(set(heads)) == len(heads)  # no stretch of the pool handed out twice
    assert bool((steps[0][2] != steps[1][2]).float().mean() > 0.999)
    assert_gaussian(flat, 1.3)
    for dtype, n in ((torch.float64, 10), (torch.float32, POOL_NUMEL // 2 + 1)):
        noisy_dense_grads([(None, torch.zeros(n, dtype=dtype))], noise, 1.0, B, PhaseTimer(), pool)
    assert noise.calls == 2 and pool.noise.calls == 1
    with constant_noise(2.0):
        (g,) = noisy_dense_grads([(None, torch.zeros(3))], noise, 0.5, B, PhaseTimer(), pool)
    assert g.tolist() == [1.0 / B] * 3
