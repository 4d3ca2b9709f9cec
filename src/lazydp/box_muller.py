"""The Gaussian kernel behind :mod:`lazydp.noise`: AES-128-CTR uniforms, Box-Muller in numpy.

One *chunk* of noise is one call here, with 256 bits of fresh key material (see noise.py for
where the material comes from and how chunks are split over threads).

* **Uniforms: AES-128 in counter mode** (OpenSSL through ``cryptography``), key = the first
  128 bits of the material, initial counter block = the other 128. Its keystream is a
  cryptographically secure PRNG: nobody who sees some of the noise (say, a model released
  after one step) can predict the rest of it, which a statistical generator (numpy's SFC64,
  torch's Mersenne Twister) does not promise. With AES-NI it is also the fastest source we
  measured on this machine: 9.1 GB/s against SFC64's ``random_raw`` at ~3.5 GB/s, which made
  the whole draw 15-20% faster (benchmarks/RESULTS.md, "Sixth session").
* **Transform: Box-Muller**, exactly as torch's CPU ``normal_`` kernel does it for float32 (24-bit
  uniforms, u in (0, 1], r = sqrt(-2 ln u), angle 2 pi v), and the same with 53-bit uniforms
  for float64. The grid's lowest cell is refined with 53 more bits so that the tail is not
  cut off (``refined_tail_radius``). Every pass is a numpy SIMD loop that releases the GIL,
  so chunks on different threads run in parallel without touching torch's OpenMP pool.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Protocol

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = [
    "CHUNK_NUMEL",
    "MATERIAL_BYTES",
    "AesCtrBits",
    "add_standard_chunk",
    "box_muller_",
    "fill_standard_chunk",
]

#: Elements per chunk: each chunk has its own generator. Big enough that the ~10 us seeding and
#: the hand-off are ~1% of its ~1.2 ms fill (2^18: 1M-element draws 25% slower on 2 cores),
#: small enough that a 1M-element tensor still splits over 2 threads. Smaller draws stay in
#: the caller's thread.
CHUNK_NUMEL = 1 << 19
MATERIAL_BYTES = 32  # 256 bits per chunk: an AES-128 key and an initial counter block
_ZEROS = bytes(1 << 20)  # the keystream is AES-CTR's encryption of zeros, 1 MB at a time


class RawBits(Protocol):
    """What the transform needs from a bit source (tests script one)."""

    def random_raw(self, n: int) -> np.ndarray: ...


class AesCtrBits:
    """Uniform 64-bit words from the AES-128-CTR keystream of 32 bytes of key material.

    >>> a = AesCtrBits(bytes(32)).random_raw(3); b = AesCtrBits(bytes(32)).random_raw(3)
    >>> a.dtype, bool((a == b).all()), bool((a != AesCtrBits(bytes(31) + b"1").random_raw(3)).any())
    (dtype('uint64'), True, True)
    """

    __slots__ = ("_cipher",)

    def __init__(self, material: bytes) -> None:
        if len(material) != MATERIAL_BYTES:
            raise ValueError(f"need {MATERIAL_BYTES} bytes of key material, got {len(material)}")
        key, counter = material[:16], material[16:]
        self._cipher = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()

    def random_raw(self, n: int) -> np.ndarray:
        """The next ``n`` 64-bit words of the keystream (a fresh array)."""
        out = np.empty(n, dtype=np.uint64)
        target = out.data.cast("B")  # cryptography writes only into byte-format buffers
        for start in range(0, target.nbytes, len(_ZEROS)):
            piece = target[start : start + len(_ZEROS)]
            self._cipher.update_into(_ZEROS[: piece.nbytes], piece)
        return out


# Per float dtype: (uniform bits u, word dtype holding them, its signed twin). u = 1 - word *
# 2^-bits lies on the grid {2^-bits, ..., 1}; its smallest value 2^-bits comes from the all-ones
# word, the only one whose radius is the grid's maximum.
_GRID: dict[Any, tuple[int, Any, Any]] = {
    np.dtype(np.float32): (24, np.uint32, np.int32),
    np.dtype(np.float64): (53, np.uint64, np.int64),
}


def refined_tail_radius(bits: RawBits, n: int, grid_bits: int = 24) -> np.ndarray:
    """Radii (float64) for pairs whose uniform fell in the grid's lowest cell (0, 2^-grid_bits]:
    the uniform is redrawn inside that cell with 53 more bits, u = 2^-grid_bits * u', u' in (0, 1].

    Why: on the grid alone (torch's float32 kernel) u >= 2^-24, so |z| <= sqrt(2 ln 2^24) =
    5.77 sigma -- a truncated Gaussian. A truncated Gaussian breaks the DP analysis: an output
    just past the truncation is impossible under one dataset and possible under its neighbour
    (probability ~1e-6 each time an example is sampled, at noise multiplier 1: over a run of
    20 epochs, more than a typical delta). Refined, the float32 bound moves to sqrt(2 ln 2^77)
    = 10.3 sigma, a tail of 1e-24 (float64: 8.6 -> 12.1 sigma).
    """
    fine = (bits.random_raw(n) >> np.uint64(11)).astype(np.float64) + 1.0  # in [1, 2^53]
    log_u = np.log(fine) - (grid_bits + 53) * math.log(2.0)  # ln(2^-grid * fine * 2^-53)
    return np.sqrt(-2.0 * log_u)


def box_muller_(dst: np.ndarray, std: float, bits: RawBits) -> None:
    """Fill a 1-D float32 or float64 array with N(0, std^2) by Box-Muller on grid uniforms.

    Each pair (u, v) of words gives a cosine and a sine normal. The words' top bits are the
    uniforms; the buffers are reused in place (u's words hold the angle, v's the sin / cos), so
    the only allocation is the words themselves.
    """
    grid_bits, word, signed = _GRID[dst.dtype]
    real = dst.dtype.type
    m = dst.size
    h = (m + 1) // 2
    words = bits.random_raw(h if word is np.uint32 else 2 * h).view(word)  # 2h words
    np.right_shift(words, word(8 * words.itemsize - grid_bits), out=words)  # the top bits
    # Below 2^grid the words read the same as signed integers, which convert to floats in one
    # SIMD instruction (unsigned ones do not: 64 -> 47 us per 256k float32 here). Every value
    # is exact, so u = (2^grid - word) * 2^-grid is the very float 1 - word * 2^-grid.
    u, v = words[:h].view(signed), words[h:].view(signed)
    np.subtract(signed(1 << grid_bits), u, out=u)
    # The lowest cell (word all ones, now 1) has probability 2^-grid per pair: one min() finds
    # that it is absent, cheaper than a compare and a scan (28 -> 8 us per 256k pairs).
    lowest = np.flatnonzero(u == 1) if h and u.min() == 1 else ()
    radius = dst[:h]
    np.copyto(radius, u, casting="unsafe")
    np.multiply(radius, real(2.0**-grid_bits), out=radius)  # u in (0, 1], so log(u) is finite
    np.log(radius, out=radius)
    np.multiply(radius, real(-2.0), out=radius)
    np.sqrt(radius, out=radius)
    if len(lowest):
        radius[lowest] = refined_tail_radius(bits, len(lowest), grid_bits)
    if std != 1.0:
        np.multiply(radius, real(std), out=radius)
    theta = u.view(dst.dtype)  # u is consumed: its memory holds the angle
    angle = 2.0 * math.pi * 2.0**-grid_bits
    np.copyto(theta, v, casting="unsafe")
    np.multiply(theta, real(angle), out=theta)
    trig, tail = v.view(dst.dtype), m - h  # v is consumed: its memory holds sin / cos
    np.sin(theta[:tail], out=trig[:tail])
    np.multiply(radius[:tail], trig[:tail], out=dst[h:])
    np.cos(theta, out=trig)
    np.multiply(radius, trig, out=radius)


def fill_standard_chunk(dst: np.ndarray, std: float, material: bytes) -> None:
    """Fill a contiguous 1-D float32/float64 array with N(0, std^2) from fresh key material."""
    box_muller_(dst, std, AesCtrBits(material))


def add_standard_chunk(
    dst: np.ndarray, std: float, material: bytes, row_scale: np.ndarray | None = None
) -> None:
    """``dst += N(0, std^2)`` for a contiguous float32/float64 array, drawn into this thread's
    scratch; with ``row_scale`` (n,), ``dst`` is read as n rows and row j's noise is scaled by
    ``row_scale[j]`` first."""
    z = scratch_array(dst.size, dst.dtype)
    fill_standard_chunk(z, std, material)
    if row_scale is not None:
        rows = z.reshape(row_scale.size, -1)
        np.multiply(rows, row_scale[:, None], out=rows)
    np.add(dst, z.reshape(dst.shape), out=dst)


_scratch = threading.local()


def scratch_array(numel: int, dtype: np.dtype[Any]) -> np.ndarray:
    """A per-thread reusable buffer, so adding noise never allocates an out-sized temporary."""
    buffers: dict[np.dtype[Any], np.ndarray] = _scratch.__dict__.setdefault("buffers", {})
    if dtype not in buffers or buffers[dtype].size < numel:
        buffers[dtype] = np.empty(max(numel, CHUNK_NUMEL), dtype=dtype)
    return buffers[dtype][:numel]
