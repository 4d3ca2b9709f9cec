"""NoisePool: every value from the stream, handed out once, N(0, 1), and checkpointed exactly."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from lazydp.errors import PrivacyError
from lazydp.noise import GaussianNoise
from lazydp.noise_pool import POOL_NUMEL, NoisePool

SIZES = [3000, 70_001, 131_072, 5, 200_000, 99_999] * 3  # crosses several refills


def _drain(pool: NoisePool, sizes: list[int]) -> list[torch.Tensor]:
    return [pool.standard(n).clone() for n in sizes]


def test_values_are_the_streams_refills_in_order_each_used_once():
    got = _drain(NoisePool(GaussianNoise(seed=3)), SIZES)
    ref = GaussianNoise(seed=3)
    refill, pos = ref.normal_(torch.empty(POOL_NUMEL)), 0
    for n, values in zip(SIZES, got):
        if pos + n > POOL_NUMEL:  # the pool drops the tail and refills: a new call
            refill, pos = ref.normal_(torch.empty(POOL_NUMEL)), 0
        torch.testing.assert_close(values, refill[pos : pos + n], rtol=0, atol=0)
        pos += n  # consecutive windows of the refill: no value is handed out twice


def test_pooled_values_are_standard_normal_and_the_test_can_fail():
    z = torch.cat(_drain(NoisePool(GaussianNoise(seed=4)), [50_000] * 40)).double().numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert stats.kstest(z * 1.02, "norm").pvalue < 1e-6  # a 2% wrong scale is caught


def test_large_draws_bypass_the_pool_with_one_call():
    noise = GaussianNoise(seed=5)
    pool = NoisePool(noise)
    out = pool.standard(POOL_NUMEL // 2 + 1)
    assert out.numel() == POOL_NUMEL // 2 + 1 and noise.calls == 1
    torch.testing.assert_close(out, GaussianNoise(seed=5).normal_(torch.empty(out.numel())))


def test_leftovers_are_dropped_when_the_stream_is_restored_underneath():
    noise = GaussianNoise(seed=6)
    pool = NoisePool(noise)
    saved = noise.state_dict()
    first = pool.standard(10).clone()
    noise.load_state_dict(saved)  # back to call 0: the buffer's values belong to call 0
    again = pool.standard(10).clone()
    torch.testing.assert_close(again, first)  # re-drawn from the restored counter, as any stream
    assert noise.calls == 1


@pytest.mark.parametrize("seed", [7, None])
def test_checkpoint_resumes_at_the_saved_position(seed):
    noise = GaussianNoise(seed=seed)
    pool = NoisePool(noise)
    _drain(pool, [1000, 2000])
    state, noise_state = pool.state_dict(), noise.state_dict()
    expected = pool.standard(500).clone()

    noise2 = GaussianNoise()
    pool2 = NoisePool(noise2)
    pool2.load_state_dict(state)  # before the stream, as the engine does
    noise2.load_state_dict(noise_state)
    assert pool2.state_dict() == state  # not used yet: still what was restored
    resumed = pool2.standard(500)
    if seed is not None:
        torch.testing.assert_close(resumed, expected, rtol=0, atol=0)
        assert noise2.calls == noise.calls  # replayed, not a new call
    else:  # OS entropy cannot be replayed: a fresh refill, never the leftovers
        assert not torch.equal(resumed, expected)
        assert noise2.calls == noise.calls + 1


@pytest.mark.parametrize(
    "state",
    [{}, {"call": "0", "pos": 0}, {"call": 0, "pos": -1}, {"call": 0, "pos": POOL_NUMEL + 1}],
)
def test_corrupt_pool_state_is_refused(state):
    with pytest.raises(PrivacyError, match="noise-pool state"):
        NoisePool(GaussianNoise(seed=1)).load_state_dict(state)


def test_replay_is_for_seeded_past_calls_only():
    with pytest.raises(PrivacyError, match="unseeded"):
        GaussianNoise().replay_(torch.empty(4), 0)
    noise = GaussianNoise(seed=2)
    first = noise.normal_(torch.empty(4)).clone()
    torch.testing.assert_close(noise.replay_(torch.empty(4), 0), first, rtol=0, atol=0)
    with pytest.raises(PrivacyError, match="never drawn"):
        noise.replay_(torch.empty(4), 1)


def test_a_pool_saved_before_its_first_refill_resumes():
    # A checkpoint taken before the first catch-up holds {"call": -1}; restored onto a stream
    # at call 0 (a resumed engine re-keys its streams to call 0), the pool tried to replay
    # call -1 and the first step failed.
    pool = NoisePool(GaussianNoise(seed=3))
    state = pool.state_dict()
    assert state["call"] == -1
    resumed = NoisePool(GaussianNoise(seed=3))
    resumed.load_state_dict(state)
    assert resumed.standard(8).shape == (8,)


def test_a_restored_refill_is_not_replayed_over_draws_made_after_the_restore():
    # Restored onto a re-keyed stream (counter 0, as a resumed engine's), a draw too large for
    # the pool went straight to the stream as its call 0; the pool's next draw then found the
    # counter at its saved refill's call + 1 and "replayed" call 0 -- the large draw's values,
    # handed out a second time from the saved position.
    noise = GaussianNoise(seed=8)
    pool = NoisePool(noise)
    pool.standard(10)
    state, noise_state = pool.state_dict(), noise.state_dict()
    assert state == {"call": 0, "pos": 10}

    noise2 = GaussianNoise(seed=8)
    pool2 = NoisePool(noise2)
    pool2.load_state_dict(state)
    noise2.load_state_dict(noise_state)
    noise2.rekey_(8, [5])  # what the engine's load_checkpoint does
    big = pool2.standard(POOL_NUMEL // 2 + 1).clone()  # bypasses the pool: call 0
    small = pool2.standard(10)
    assert not torch.equal(small, big[10:20])
    assert noise2.calls == 2  # a fresh refill, not a replay
