"""lazydp.noise and lazydp.testing: exact distribution, stream independence, seeding, overrides.

Statistical tests use fixed seeds (not flaky) and each one also shows it can fail: the same
KS test must reject a wrong sigma (0.8x and 1.25x), the same repeat detector must catch
torch's 32-bit seed truncation.
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os

import numpy as np
import pytest
import torch
from scipy import stats

import lazydp.noise as noise_mod
from lazydp import box_muller
from lazydp.box_muller import AesCtrBits
from lazydp.errors import ConfigError, InputError, PrivacyError
from lazydp.noise import CHUNK_NUMEL, GaussianNoise, active_override
from lazydp.testing import constant_noise, zero_noise

N = 4 * CHUNK_NUMEL + 12_345  # several chunks and a ragged tail: exercises the thread pool
ACCEPT, REJECT = 1e-3, 1e-6


def ks_pvalue(sample: torch.Tensor, scale: float) -> float:
    """KS p-value of ``sample`` against N(0, scale^2)."""
    data = sample.detach().double().flatten().numpy()
    return float(stats.kstest(data, "norm", args=(0.0, scale)).pvalue)


def assert_gaussian(sample: torch.Tensor, std: float) -> None:
    """Accept N(0, std^2) and reject 0.8x and 1.25x of std (the test can fail)."""
    assert ks_pvalue(sample, std) > ACCEPT
    assert ks_pvalue(sample, 0.8 * std) < REJECT
    assert ks_pvalue(sample, 1.25 * std) < REJECT


def chunks_of(t: torch.Tensor) -> list[torch.Tensor]:
    return list(t.flatten().split(CHUNK_NUMEL))


# ----------------------------------------------------------------------------- distribution
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("std", [1.0, 3.5])
def test_normal_has_requested_std(dtype: torch.dtype, std: float) -> None:
    out = GaussianNoise(seed=11).normal_(torch.empty(N, dtype=dtype), std=std)
    assert out.dtype == dtype
    assert_gaussian(out, std)


def test_unseeded_normal_is_gaussian(monkeypatch: pytest.MonkeyPatch) -> None:
    # The unseeded path (a key from secrets.token_bytes per chunk) on fixed key bytes, taken in
    # chunk order (one thread): on real OS entropy this KS test failed 1 run in 1000 (its
    # false-alarm rate, ACCEPT). That real entropy is used is checked by the test below.
    entropy = np.random.default_rng(12)
    monkeypatch.setattr(noise_mod.secrets, "token_bytes", lambda n: entropy.bytes(n))
    noise = GaussianNoise(threads=1)
    assert not noise.seeded
    assert_gaussian(noise.normal_(torch.empty(N), std=0.7), 0.7)


def test_half_precision_outputs_have_right_moments() -> None:
    for dtype in (torch.float16, torch.bfloat16):
        out = GaussianNoise(seed=2).normal_(torch.empty(200_000, dtype=dtype), std=2.0)
        assert out.dtype == dtype
        assert abs(float(out.float().mean())) < 0.03
        assert abs(float(out.float().std()) - 2.0) < 0.03


def test_add_normal_adds_right_std_and_keeps_values() -> None:
    base = torch.linspace(-5, 5, N)
    out = GaussianNoise(seed=4).add_normal_(base.clone(), std=0.3)
    assert_gaussian(out - base, 0.3)
    # Same seed and call: add_normal_ adds the very draw normal_ would have written.
    drawn = GaussianNoise(seed=4).normal_(torch.empty(N), std=0.3)
    torch.testing.assert_close(out - base, drawn, rtol=0, atol=1e-6)


def test_add_normal_float64_and_half() -> None:
    base = torch.ones(N, dtype=torch.float64)
    out = GaussianNoise(seed=5).add_normal_(base.clone(), std=2.0)
    assert_gaussian(out - base, 2.0)
    half = GaussianNoise(seed=5).add_normal_(torch.full((100_000,), 10.0).half(), std=1.0)
    assert abs(float(half.float().mean()) - 10.0) < 0.03
    assert abs(float(half.float().std()) - 1.0) < 0.03


def test_aggregated_rows_standardise_to_unit_normal() -> None:
    n, dim = 20_000, 64
    gen = torch.Generator().manual_seed(0)
    sum_lr2 = torch.rand(n, generator=gen, dtype=torch.float64) * 4 + 0.01
    sum_lr = sum_lr2.sqrt() * 2  # any values: ignored outside the test override
    rows = GaussianNoise(seed=9).aggregated(sum_lr, sum_lr2, dim)
    assert rows.shape == (n, dim) and rows.dtype == torch.float32
    scale = sum_lr2.sqrt().unsqueeze(1)
    assert ks_pvalue(rows.double() / scale, 1.0) > ACCEPT
    assert ks_pvalue(rows.double() / (0.8 * scale), 1.0) < REJECT
    assert ks_pvalue(rows.double() / (1.25 * scale), 1.0) < REJECT
    # Forgetting the square root (scaling by sum_lr2) is caught too.
    assert ks_pvalue(rows.double() / sum_lr2.unsqueeze(1), 1.0) < REJECT


def test_aggregated_matches_sum_of_per_step_draws() -> None:
    """One aggregated draw has the distribution of sum_s lr_s * z_s over the pending steps."""
    lrs, n, dim = [0.5, 0.3, 0.1, 0.05], 4000, 64
    eager = torch.zeros(n, dim, dtype=torch.float64)
    noise = GaussianNoise(seed=21)
    for lr in lrs:
        noise.add_normal_(eager, std=lr)
    sum_lr = torch.full((n,), sum(lrs), dtype=torch.float64)
    sum_lr2 = torch.full((n,), sum(lr * lr for lr in lrs), dtype=torch.float64)
    lazy = noise.aggregated(sum_lr, sum_lr2, dim, dtype=torch.float64)
    assert stats.ks_2samp(eager.flatten(), lazy.flatten()).pvalue > ACCEPT
    wrong = noise.aggregated(sum_lr, sum_lr, dim, dtype=torch.float64)  # sum lr, not sqrt(sum lr^2)
    assert stats.ks_2samp(eager.flatten(), wrong.flatten()).pvalue < REJECT


# ----------------------------------------------------------------------------- independence
def test_consecutive_calls_chunks_and_streams_are_uncorrelated() -> None:
    root = GaussianNoise(seed=3)
    draws = [root.normal_(torch.empty(N)) for _ in range(2)]
    draws += [root.fork(1).normal_(torch.empty(N)), root.fork(2).normal_(torch.empty(N))]
    draws.append(GaussianNoise(seed=3, stream=1).normal_(torch.empty(N)))
    bound = 5 / math.sqrt(N)  # 5 standard errors of a correlation under independence
    for a, b in itertools.combinations(draws, 2):
        assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < bound
    first = draws[0]
    for a, b in itertools.combinations(chunks_of(first[: 4 * CHUNK_NUMEL]), 2):
        assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 5 / math.sqrt(a.numel())
    # The bound is tight enough to catch a stream that was reused with a small perturbation.
    leaked = draws[1] + 0.05 * draws[0]
    assert abs(float(torch.corrcoef(torch.stack([draws[0], leaked]))[0, 1])) > bound


def no_repeated_chunks(draws: list[torch.Tensor]) -> bool:
    heads = [c[:64].numpy().tobytes() for d in draws for c in chunks_of(d)]
    return len(set(heads)) == len(heads)


def test_no_chunk_repeats_across_calls_streams_forks_and_seeds() -> None:
    draws = []
    for seed, stream in itertools.product([0, 1, 2**40], [0, 1, 7]):
        noise = GaussianNoise(seed=seed, stream=stream)
        draws += [noise.normal_(torch.empty(2 * CHUNK_NUMEL + 5)) for _ in range(3)]
        draws += [noise.fork(s).normal_(torch.empty(2 * CHUNK_NUMEL)) for s in (0, 1)]
    assert no_repeated_chunks(draws)
    # stream=3 and a fork(3) of stream 0 are different streams (the path is encoded).
    a = GaussianNoise(seed=0, stream=3).normal_(torch.empty(100))
    b = GaussianNoise(seed=0).fork(3).normal_(torch.empty(100))
    assert not torch.equal(a, b)


def test_repeat_detector_catches_torch_32bit_seed_truncation() -> None:
    """Why chunks get a full 256-bit state: torch's manual_seed drops the high 32 bits."""
    reused = [
        torch.empty(CHUNK_NUMEL).normal_(generator=torch.Generator().manual_seed(s))
        for s in (5, 5 + 2**32)
    ]
    assert not no_repeated_chunks(reused)


def box_muller_reference(words: np.ndarray, std: float) -> np.ndarray:
    """The slow, obvious Box-Muller in float64 on the same 32-bit words (top 24 bits each)."""
    h = words.size // 2
    u = 1.0 - (words[:h] >> 8).astype(np.float64) * 2.0**-24
    theta = 2.0 * math.pi * (words[h:] >> 8).astype(np.float64) * 2.0**-24
    radius = std * np.sqrt(-2.0 * np.log(u))
    return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)])


KEY = bytes(range(32))  # a fixed 256-bit key


@pytest.mark.parametrize("numel", [1, 2, 7, 1000, 4097])
@pytest.mark.parametrize("std", [1.0, 0.3])
def test_box_muller_matches_float64_reference(numel: int, std: float) -> None:
    out = np.empty(numel, dtype=np.float32)
    box_muller.fill_standard_chunk(out, std, KEY)
    h = (numel + 1) // 2
    words = AesCtrBits(KEY).random_raw(h).view(np.uint32)
    want = box_muller_reference(words, std)
    want = np.concatenate([want[:h], want[h : h + numel - h]])
    np.testing.assert_allclose(out, want, rtol=2e-6, atol=2e-6 * std)


@pytest.mark.parametrize("numel", [1, 2, 7, 1000, 4097])
def test_box_muller_float32_bits_equal_the_plain_float32_passes(numel: int) -> None:
    """Bit for bit what the obvious float32 passes give on the same words: u = 1 - w 2^-24,
    r = sqrt(-2 ln u), angle 2 pi v 2^-24 (the kernel converts the words as signed integers
    and forms u as (2^24 - w) 2^-24, which must be the very same floats)."""
    out = np.empty(numel, dtype=np.float32)
    box_muller.fill_standard_chunk(out, 1.0, KEY)
    h = (numel + 1) // 2
    words = AesCtrBits(KEY).random_raw(h).view(np.uint32) >> np.uint32(8)
    f32 = np.float32
    u = f32(1.0) - words[:h].astype(f32) * f32(2.0**-24)
    radius = np.sqrt(np.log(u) * f32(-2.0))
    theta = words[h:].astype(f32) * f32(2.0 * math.pi * 2.0**-24)
    want = np.concatenate(
        [radius * np.cos(theta), radius[: numel - h] * np.sin(theta[: numel - h])]
    )
    assert want.dtype == np.float32 and out.tobytes() == want.tobytes()


@pytest.mark.parametrize("numel", [1, 2, 7, 1001])
def test_float64_box_muller_matches_scalar_math_on_53_bit_uniforms(numel: int) -> None:
    """float64 draws: Box-Muller on the top 53 bits of each 64-bit word, against Python's
    scalar libm one value at a time."""
    out = np.empty(numel, dtype=np.float64)
    box_muller.fill_standard_chunk(out, 2.5, KEY)
    h = (numel + 1) // 2
    words = [int(w) >> 11 for w in AesCtrBits(KEY).random_raw(2 * h)]
    want = []
    for trig in (math.cos, math.sin):
        for u, v in zip(words[:h], words[h:]):
            radius = 2.5 * math.sqrt(-2.0 * math.log(1.0 - u * 2.0**-53))
            want.append(radius * trig(2.0 * math.pi * v * 2.0**-53))
    np.testing.assert_allclose(out, want[:numel], rtol=1e-12, atol=1e-12)


def test_aes_ctr_bits_are_the_nist_keystream() -> None:
    """Known answer (NIST SP 800-38A, F.5.1 CTR-AES128): the first keystream block is the
    first ciphertext block XOR the first plaintext block."""
    key = bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c")
    counter = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    plain = bytes.fromhex("6bc1bee22e409f96e93d7e117393172a")
    cipher = bytes.fromhex("874d6191b620e3261bef6864990db6ce")
    keystream = bytes(p ^ c for p, c in zip(plain, cipher))
    assert AesCtrBits(key + counter).random_raw(2).tobytes() == keystream


def test_aes_ctr_bits_continue_across_calls_and_megabyte_pieces() -> None:
    """A draw of more than one 1 MB piece, or split over calls, is one keystream."""
    whole = AesCtrBits(KEY).random_raw(300_000)  # 2.4 MB: three pieces
    bits = AesCtrBits(KEY)
    parts = np.concatenate([bits.random_raw(n) for n in (1, 131_071, 168_928)])
    assert np.array_equal(whole, parts)
    assert len(np.unique(whole)) == whole.size  # no repeated word in 2.4 MB (2^-40 chance)
    with pytest.raises(ValueError, match="32 bytes"):
        AesCtrBits(bytes(16))


def test_box_muller_uses_the_float32_uniform_grid() -> None:
    """Uniforms on the 2^-24 grid, u in (0, 1]: no inf / nan (the tail cell is tested below)."""
    out = GaussianNoise(seed=21).normal_(torch.empty(N))
    assert bool(torch.isfinite(out).all())


class _ScriptedBits:
    """A bit generator stand-in that returns scripted raw 64-bit words, call by call."""

    def __init__(self, *calls: list[int]) -> None:
        self.calls = [np.array(c, dtype=np.uint64) for c in calls]

    def random_raw(self, n: int) -> np.ndarray:
        out = self.calls.pop(0)
        assert out.size == n
        return out.copy()


def test_lowest_grid_cell_is_refined_instead_of_cutting_the_tail_at_5_77_sigma() -> None:
    # 4 pairs: words 0-3 are u (little-endian halves of the raw words), 4-7 the angles (0).
    # Pair 1 falls in the lowest cell (top 24 bits all ones); the refinement draws one word.
    lowest = (0xFFFFFF << 8) | 0x5A
    words = np.array([123 << 8, lowest, 7 << 8, 99 << 8, 0, 0, 0, 0], dtype=np.uint32)
    fine = 1 << 40  # u' = ((fine >> 11) + 1) * 2^-53
    bits = _ScriptedBits(list(words.view(np.uint64)), [fine])
    out = np.empty(8, dtype=np.float32)
    box_muller.box_muller_(out, 1.0, bits)
    u = 2.0**-24 * ((fine >> 11) + 1) * 2.0**-53
    assert out[1] == pytest.approx(math.sqrt(-2 * math.log(u)), rel=1e-6)  # cos(0) = 1
    assert out[1] > math.sqrt(2 * 24 * math.log(2))  # past the grid's 5.77 sigma bound
    assert out[0] == pytest.approx(math.sqrt(-2 * math.log(1 - 123 * 2.0**-24)), rel=1e-5)
    assert not bits.calls  # the refinement drew exactly one word


def test_float64_lowest_grid_cell_is_refined_past_8_57_sigma() -> None:
    # 2 pairs of 64-bit words: u = words 0-1 (pair 1 in the lowest cell), angles 2-3 (0).
    lowest = (((1 << 53) - 1) << 11) | 0x5A
    fine = 1 << 40
    bits = _ScriptedBits([77 << 11, lowest, 0, 0], [fine])
    out = np.empty(4, dtype=np.float64)
    box_muller.box_muller_(out, 1.0, bits)
    u = 2.0**-53 * ((fine >> 11) + 1) * 2.0**-53
    assert out[1] == pytest.approx(math.sqrt(-2 * math.log(u)), rel=1e-12)
    assert out[1] > math.sqrt(2 * 53 * math.log(2))  # past the 53-bit grid's bound
    assert out[0] == pytest.approx(math.sqrt(-2 * math.log(1 - 77 * 2.0**-53)), rel=1e-9)
    assert not bits.calls


def test_refined_tail_radius_has_the_rayleigh_tail() -> None:
    """Given u <= 2^-24, R^2/2 - 24 ln 2 = -ln u' must be Exp(1): the exact Gaussian tail."""
    r = box_muller.refined_tail_radius(AesCtrBits(KEY), 200_000)
    excess = r**2 / 2 - 24 * math.log(2)
    assert stats.kstest(excess, "expon").pvalue > ACCEPT
    assert stats.kstest(excess, "expon", args=(0, 1.25)).pvalue < REJECT
    assert stats.kstest(excess, "expon", args=(0, 0.8)).pvalue < REJECT
    # Without the refinement every such radius is the grid's bound: the test would fail.
    cut = np.full_like(r, math.sqrt(2 * 24 * math.log(2)))
    assert stats.kstest(cut**2 / 2 - 24 * math.log(2), "expon").pvalue < REJECT


# ----------------------------------------------------------------------------- seeding
def test_seeded_draws_do_not_depend_on_thread_count() -> None:
    runs = []
    for threads in (1, 2, 3):
        noise = GaussianNoise(seed=77, stream=5, threads=threads)
        runs.append([noise.normal_(torch.empty(N)), noise.add_normal_(torch.ones(N), 2.0)])
        runs[-1].append(noise.normal_(torch.empty(N, dtype=torch.float64)))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_unseeded_calls_differ_and_take_os_entropy_per_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    real = noise_mod.secrets.token_bytes

    def counting(nbytes: int) -> bytes:
        calls.append(nbytes)
        return real(nbytes)

    monkeypatch.setattr(noise_mod.secrets, "token_bytes", counting)
    a, b = GaussianNoise(), GaussianNoise()
    assert not a.seeded
    x1, x2, y = a.normal_(torch.empty(N)), a.normal_(torch.empty(N)), b.normal_(torch.empty(N))
    assert len(calls) == 3 * len(chunks_of(x1))  # fresh key material for every chunk
    assert not torch.equal(x1, x2) and not torch.equal(x1, y)
    assert no_repeated_chunks([x1, x2, y])


def test_state_dict_resume_continues_instead_of_replaying() -> None:
    uninterrupted = GaussianNoise(seed=123, stream=2)
    expected = [uninterrupted.normal_(torch.empty(N)) for _ in range(3)]

    first = GaussianNoise(seed=123, stream=2)
    first.normal_(torch.empty(N))
    saved = json.loads(json.dumps(first.state_dict()))  # plain data
    resumed = GaussianNoise()  # production default; the checkpoint restores the seed
    resumed.load_state_dict(saved)
    assert resumed.seeded and resumed.state_dict() == first.state_dict()
    assert torch.equal(resumed.normal_(torch.empty(N)), expected[1])
    assert torch.equal(resumed.normal_(torch.empty(N)), expected[2])
    replay = GaussianNoise(seed=123, stream=2).normal_(torch.empty(N))
    assert not torch.equal(replay, expected[1])


def test_root_state_dict_resumes_forks_made_before_or_after_the_restore() -> None:
    def draws(noise: GaussianNoise) -> list[torch.Tensor]:
        return [noise.fork(k).normal_(torch.empty(1000)) for k in (1, 2)]

    uninterrupted = GaussianNoise(seed=31)
    expected = [draws(uninterrupted) for _ in range(3)]
    assert uninterrupted.fork(1) is uninterrupted.fork(1)  # one stream per id: never reused

    first = GaussianNoise(seed=31)
    draws(first)
    saved = json.loads(json.dumps(first.state_dict()))
    resumed = GaussianNoise(seed=31)
    held = resumed.fork(1)  # e.g. a lazy table forked while the model is built, before loading
    resumed.load_state_dict(saved)
    assert resumed.fork(1) is held
    for want in expected[1:]:  # fork 1 restored in place, fork 2 created after the restore
        assert all(torch.equal(a, b) for a, b in zip(draws(resumed), want))
    replay = draws(GaussianNoise(seed=31))
    assert no_repeated_chunks([*replay, *expected[1], *expected[2]])


def test_loading_resets_forks_the_saved_run_had_not_made() -> None:
    saved = GaussianNoise(seed=8).state_dict()
    noise = GaussianNoise(seed=8)
    late = noise.fork(4)
    late.normal_(torch.empty(10))
    noise.load_state_dict(saved)
    fresh = GaussianNoise(seed=8).fork(4).normal_(torch.empty(10))
    assert torch.equal(late.normal_(torch.empty(10)), fresh)


def test_state_dict_survives_weights_only_torch_load(tmp_path) -> None:
    noise = GaussianNoise(seed=2**100, stream=9).fork(4)
    noise.normal_(torch.empty(10))
    torch.save(noise.state_dict(), tmp_path / "noise.pt")
    state = torch.load(tmp_path / "noise.pt", weights_only=True)
    other = GaussianNoise(seed=0)
    other.load_state_dict(state)
    assert torch.equal(other.normal_(torch.empty(50)), noise.normal_(torch.empty(50)))


OK = {"format": "lazydp.noise/1", "seed": 1, "stream_path": [0], "counter": 0, "forks": {}}


@pytest.mark.parametrize(
    "corrupt",
    [{}, {"format": "other"}, {**OK, "counter": -3}, {**OK, "seed": "x"}, {**OK, "stream_path": [-1]},
     {k: v for k, v in OK.items() if k != "forks"}, {**OK, "forks": {"1": {**OK, "seed": 2}}},
     {**OK, "forks": {"2": {**OK, "stream_path": [0, 1]}}}, {**OK, "forks": {"x": OK}}],
)  # fmt: skip
def test_corrupt_state_raises_privacy_error_and_changes_nothing(corrupt: dict) -> None:
    noise = GaussianNoise(seed=1)
    noise.fork(1).normal_(torch.empty(3))
    before = noise.state_dict()
    with pytest.raises(PrivacyError, match="state_dict"):
        noise.load_state_dict(corrupt)
    assert noise.state_dict() == before


# ----------------------------------------------------------------------------- shapes, dtypes
def test_non_contiguous_empty_and_grad_outputs() -> None:
    base = torch.empty(600, 700)
    out = GaussianNoise(seed=6).normal_(base.t(), std=2.0)
    assert out.data_ptr() == base.data_ptr()
    assert torch.equal(out, GaussianNoise(seed=6).normal_(torch.empty(700, 600), std=2.0))
    added = GaussianNoise(seed=6).add_normal_(torch.zeros(600, 700).t(), std=2.0)
    torch.testing.assert_close(added, out, rtol=0, atol=1e-5)
    assert GaussianNoise().normal_(torch.empty(0, 5)).shape == (0, 5)
    empty = GaussianNoise(seed=1).aggregated(torch.zeros(0).double(), torch.zeros(0).double(), 4)
    assert empty.shape == (0, 4)
    param = torch.zeros(N, requires_grad=True)  # leaf parameter: noise goes in without autograd
    GaussianNoise(seed=1).add_normal_(param.data, std=1.0)
    GaussianNoise(seed=2).add_normal_(param, std=1.0)
    assert float(param.detach().std()) == pytest.approx(math.sqrt(2), rel=0.01)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_draws_are_gaussian_and_seeded() -> None:
    out = GaussianNoise(seed=1).normal_(torch.empty(N, device="cuda"), std=2.0)
    assert out.is_cuda
    assert_gaussian(out.cpu(), 2.0)
    assert torch.equal(out, GaussianNoise(seed=1).normal_(torch.empty(N, device="cuda"), 2.0))
    added = GaussianNoise(seed=1).add_normal_(torch.zeros(N, device="cuda"), std=2.0)
    assert_gaussian(added.cpu(), 2.0)


def test_bad_arguments_raise_named_errors() -> None:
    noise = GaussianNoise(seed=0)
    with pytest.raises(InputError, match="out"):
        noise.normal_(torch.zeros(3, dtype=torch.int64))
    for std in (-1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ConfigError, match="std"):
            noise.add_normal_(torch.zeros(3), std)  # type: ignore[arg-type]
    for kwargs in ({"seed": 1.5}, {"seed": True}, {"stream": -1}, {"threads": 0}):
        with pytest.raises(ConfigError, match=next(iter(kwargs))):
            GaussianNoise(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="stream"):
        noise.fork(2**64)
    lr = torch.ones(3, dtype=torch.float64)
    with pytest.raises(InputError, match="sum_lr2"):
        noise.aggregated(lr, -lr, 4)
    with pytest.raises(InputError, match="same shape"):
        noise.aggregated(lr, torch.ones(2, dtype=torch.float64), 4)
    with pytest.raises(InputError, match="sum_lr"):
        noise.aggregated(lr.reshape(3, 1), lr, 4)
    with pytest.raises(ConfigError, match="dim"):
        noise.aggregated(lr, lr, 0)


# ----------------------------------------------------------------------------- test override
def test_constant_noise_makes_every_draw_the_constant() -> None:
    noise = GaussianNoise()
    assert active_override() is None
    with constant_noise(2.0):
        assert active_override() == "constant_noise(2.0)"
        assert torch.equal(noise.normal_(torch.empty(N), std=0.5), torch.full((N,), 1.0))
        assert torch.equal(
            noise.fork(3).add_normal_(torch.ones(5), std=0.25), torch.full((5,), 1.5)
        )
        sum_lr = torch.tensor([0.1, 0.25, 0.0], dtype=torch.float64)
        rows = noise.aggregated(sum_lr, sum_lr**2, dim=4, dtype=torch.float64)
        assert torch.equal(rows, (2.0 * sum_lr).unsqueeze(1).expand(3, 4))
    assert active_override() is None
    assert noise.normal_(torch.empty(1000), std=0.5).std() > 0.4


def test_lazy_constant_noise_equals_eager_per_step_constants() -> None:
    lrs, dim = [0.1, 0.05, 0.025], 8
    with constant_noise(1.0):
        eager = torch.zeros(2, dim, dtype=torch.float64)
        for lr in lrs:
            GaussianNoise().add_normal_(eager, std=lr)
        sum_lr = torch.full((2,), sum(lrs), dtype=torch.float64)
        lazy = GaussianNoise().aggregated(sum_lr, sum_lr, dim, dtype=torch.float64)
    torch.testing.assert_close(lazy, eager, rtol=1e-15, atol=0)


def test_zero_noise_decorator_nesting_and_exception_restore() -> None:
    @zero_noise()
    def noisy(x: torch.Tensor) -> torch.Tensor:
        assert active_override() == "zero_noise()"
        return GaussianNoise().add_normal_(x, std=9.0)

    assert torch.equal(noisy(torch.ones(4)), torch.ones(4))
    assert active_override() is None
    with constant_noise(3.0):
        assert torch.equal(noisy(torch.ones(2)), torch.ones(2))
        assert active_override() == "constant_noise(3.0)"  # the outer override is back
    with pytest.raises(RuntimeError, match="boom"), zero_noise():
        raise RuntimeError("boom")
    assert active_override() is None
    with pytest.raises(ConfigError, match="constant_noise"):
        constant_noise(float("nan"))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_process_can_still_draw_in_parallel() -> None:
    GaussianNoise(threads=2).normal_(torch.empty(N))  # the parent's pool now exists
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        std = pool.apply_async(_child_draw_std).get(timeout=60)
    assert std == pytest.approx(1.0, rel=0.01)


def _child_draw_std() -> float:
    # libgomp's pool does not survive fork either; torch's DataLoader workers do the same.
    torch.set_num_threads(1)
    return float(GaussianNoise(threads=2).normal_(torch.empty(N)).std())


@pytest.mark.parametrize("pooled", [False, True])
def test_add_aggregated_adds_alpha_times_the_aggregated_rows(pooled) -> None:
    from lazydp.noise_pool import NoisePool

    s1 = torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64)
    s2 = torch.tensor([0.05, 0.02, 0.01], dtype=torch.float64)
    a, b = GaussianNoise(seed=3), GaussianNoise(seed=3)
    want = a.aggregated(s1, s2, 4, pool=NoisePool(a) if pooled else None)
    base = torch.randn(3, 4)
    got = b.add_aggregated_(base.clone(), s1, s2, 0.5, pool=NoisePool(b) if pooled else None)
    torch.testing.assert_close(got, base + 0.5 * want)
    with constant_noise(2.0):  # the test override adds value * sum_lr, as per-step constants
        torch.testing.assert_close(
            b.add_aggregated_(torch.zeros(3, 2), s1, s2, 0.5),
            (s1 * 1.0).float()[:, None].expand(3, 2),
        )
    with pytest.raises(InputError, match="2-D floating"):
        b.add_aggregated_(torch.zeros(3), s1, s2, 0.5)


def test_fused_catch_up_add_equals_draw_then_addcmul_over_many_chunks() -> None:
    """The fused path (draw, scale and add chunk by chunk) against the slow obvious one."""
    n, dim = 20_000, 64  # 1.28M values: three chunks, CHUNK_NUMEL a multiple of dim
    gen = torch.Generator().manual_seed(1)
    s2 = torch.rand(n, generator=gen, dtype=torch.float64) * 4 + 0.01
    base = torch.randn(n, dim, generator=gen)
    want = base + 0.25 * GaussianNoise(seed=6).aggregated(s2, s2, dim)
    got = GaussianNoise(seed=6).add_aggregated_(base.clone(), s2, s2, 0.25)
    torch.testing.assert_close(got, want)


def test_each_fused_catch_up_draw_takes_a_call_of_its_own() -> None:
    """The fused path (no pool: flushes, catch-ups too large for one) keys its chunks by the
    call: one not taken from the counter would hand the same noise to the next catch-up and to
    the next draw of the stream."""
    noise = GaussianNoise(seed=4)
    s2 = torch.ones(512, dtype=torch.float64)
    draws = [noise.add_aggregated_(torch.zeros(512, 64), s2, s2, 1.0) for _ in range(2)]
    draws.append(noise.normal_(torch.empty(512, 64)))
    assert noise.calls == 3
    flat = [d.flatten() for d in draws]
    bound = 5 / math.sqrt(flat[0].numel())  # 5 standard errors of a correlation
    for a, b in itertools.combinations(flat, 2):
        assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < bound


def test_fused_catch_up_add_has_the_aggregated_distribution() -> None:
    n, dim = 30_000, 48  # chunks of whole rows that do not split CHUNK_NUMEL evenly
    gen = torch.Generator().manual_seed(2)
    s2 = torch.rand(n, generator=gen, dtype=torch.float64) * 4 + 0.01
    base = torch.randn(n, dim, generator=gen)
    got = GaussianNoise(seed=7).add_aggregated_(base.clone(), s2, s2, 0.5)
    scale = 0.5 * s2.sqrt().unsqueeze(1)
    z = (got.double() - base.double()) / scale
    assert ks_pvalue(z, 1.0) > ACCEPT
    assert ks_pvalue(z, 0.8) < REJECT and ks_pvalue(z, 1.25) < REJECT
    # Rows come from distinct chunk streams: neighbouring rows are uncorrelated.
    a, b = z[:-1].flatten(), z[1:].flatten()
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 5 / math.sqrt(a.numel())
