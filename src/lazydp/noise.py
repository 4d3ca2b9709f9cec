"""Fast, securely seeded Gaussian noise: the only source of DP-SGD's noise in lazydp.

Contract (what may never change):

* Every draw is *exactly* Gaussian, never an approximation: float32 (and half / bfloat16,
  rounded once from float32) by the Box-Muller transform on 24-bit uniforms -- the algorithm
  and uniform grid of torch's own CPU ``normal_`` kernel, except that the grid's lowest cell
  is refined with 53 more bits, so the tail is not cut off at 5.77 sigma as torch's is (a cut
  tail is a delta leak: ``box_muller.refined_tail_radius``); float64 the same on 53-bit
  uniforms. The kernel lives in :mod:`lazydp.box_muller`.
* No noise stream is ever reused. A draw is split into fixed chunks of ``CHUNK_NUMEL``
  elements and every chunk gets a generator with fresh 256-bit key material (an AES-128 key and counter):
  - unseeded (``seed=None``, production): straight from OS entropy (``secrets``), per chunk;
  - seeded (research): SHAKE-256 of a prefix-free encoding of (seed, stream path, call counter,
    chunk index). Distinct calls, chunks, streams and forks therefore never share a state,
    and ``state_dict`` carries the call counter so that a resumed run continues the sequence.
    A parent's state_dict holds its forks' states, so restoring the root restores every
    table's stream too (forks made before or after the restore).
  Seeded values are reproducible within one lazydp version, not across versions.
* Seeded draws do not depend on the number of threads (chunk i always gets the same state).
* Why not torch's generator: its ``manual_seed`` keeps only 32 bits (over millions of chunks
  random 32-bit seeds would collide, i.e. reuse noise), and its Mersenne Twister makes
  ``normal_`` run at ~290M samples/s on one core. The uniforms here are the AES-128-CTR
  keystream (AES-NI, through ``cryptography``): a cryptographically secure generator that is
  also faster than numpy's SFC64; the transform runs in numpy's SIMD loops, which release the
  GIL, so chunks scale over the thread pool without touching torch's OpenMP threads
  (benchmarks/noise_throughput.py).
* CUDA tensors: one torch Philox generator per call, seeded with 64 bits of the same key
  material (Philox keeps all 64); seeded GPU draws are reproducible but differ from CPU draws.
* The only way to make draws deterministic constants is the test-only override in
  :mod:`lazydp.testing`; :func:`active_override` names it so reports can say "not private".
  No environment variable or config key can switch it on.

CPU noise is cryptographically secure end to end (OS entropy or SHAKE-256 keys, AES-CTR
bits). GPU noise comes from Philox, statistically strong but not a cryptographic PRNG.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import struct
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from lazydp._dispatch import cast
from lazydp.box_muller import (
    CHUNK_NUMEL,
    MATERIAL_BYTES,
    add_standard_chunk,
    fill_standard_chunk,
    scratch_array,
)
from lazydp.errors import ConfigError, InputError, PrivacyError
from lazydp.threads import default_threads, run_chunks

if TYPE_CHECKING:
    from lazydp.noise_pool import NoisePool

__all__ = ["CHUNK_NUMEL", "GaussianNoise", "active_override"]

_CUDA_CHUNK_NUMEL = 1 << 24  # GPU: one generator per call; chunks only bound add_'s scratch
_STATE_FORMAT = "lazydp.noise/1"
_DOMAIN = b"lazydp.noise/1\x00"
_MAX_STREAM = 1 << 64

# ------------------------------------------------------------------------ test-only override
# Set only through lazydp.testing (constant_noise / zero_noise): a float replaces every draw.
_override_value: float | None = None
_override_name: str | None = None


def active_override() -> str | None:
    """Name of the test-only noise override in force, e.g. ``"constant_noise(1.0)"``, or None.

    Only :mod:`lazydp.testing` can set it (no environment variable or config key can); a run
    with an override is NOT private and its report must say so.

    >>> active_override() is None
    True
    """
    return _override_name


def _swap_override(value: float | None, name: str | None) -> tuple[float | None, str | None]:
    """Install an override (for lazydp.testing only); returns the previous one to restore."""
    global _override_value, _override_name
    previous = (_override_value, _override_name)
    _override_value, _override_name = value, name
    return previous


def _check_std(std: Any) -> float:
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std):
        raise ConfigError(f"std must be a finite number >= 0; got {std!r}. Pass e.g. std=1.0.")
    if std < 0:
        raise ConfigError(f"std must be >= 0; got {std!r}. Pass the noise standard deviation.")
    return float(std)


def _check_out(out: Any) -> Tensor:
    if not isinstance(out, Tensor) or not out.is_floating_point():
        what = out.dtype if isinstance(out, Tensor) else type(out).__name__
        raise InputError(
            f"out must be a floating-point torch.Tensor; got {what}. "
            "Allocate it with dtype=torch.float32 (or float64)."
        )
    return out


def _check_stream(stream: Any, name: str) -> int:
    if isinstance(stream, bool) or not isinstance(stream, int) or not 0 <= stream < _MAX_STREAM:
        raise ConfigError(
            f"{name} must be an int in [0, 2**64); got {stream!r}. Use one per table and rank."
        )
    return stream


# ------------------------------------------------------------------------ the generator
class GaussianNoise:
    """Exact Gaussian noise, chunked over a thread pool, seeded per chunk (see module docs).

    Args:
        seed: None (default): OS entropy for every chunk -- use this in production.
            An int makes every draw a deterministic function of (seed, stream, call counter,
            chunk index): reproducible research, not for releasing models.
        stream: which independent stream of ``seed`` (e.g. one per rank); forks nest below it
            (``stream_path`` is ``(stream, fork stream, fork-of-fork stream, ...)``).
        threads: worker threads for large draws (default: the CPUs this process may use).

    >>> noise = GaussianNoise(seed=0)
    >>> x = noise.normal_(torch.empty(3, 4), std=2.0)
    >>> bool(x.std() > 0), noise.seeded
    (True, True)
    """

    def __init__(self, seed: int | None = None, stream: int = 0, threads: int | None = None):
        self._init(seed, (_check_stream(stream, "stream"),), threads)

    def _init(self, seed: int | None, path: tuple[int, ...], threads: int | None) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(
                f"seed must be None (OS entropy) or an int; got {seed!r}. "
                "Use None for production runs."
            )
        if seed is not None and not -(2**127) <= seed < 2**127:
            raise ConfigError(f"seed must fit in 128 signed bits; got {seed!r}.")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)):
            raise ConfigError(f"threads must be None or an int >= 1; got {threads!r}.")
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be >= 1; got {threads!r}. Use None for all CPUs.")
        self.seed = seed
        self.seeded: bool = seed is not None
        self.stream_path = path
        self.threads = threads if threads is not None else default_threads()
        self._counter = 0
        # The counter right after the last load_state_dict (None: never restored); see
        # untouched_since_restore.
        self._restored_at: int | None = None
        self._lock = threading.Lock()
        self._forks: dict[int, GaussianNoise] = {}
        # Prefix-free: fixed-width seed, then the path's length and fixed-width entries.
        self._prefix = b"".join(
            [_DOMAIN, (seed or 0).to_bytes(16, "little", signed=True)]
            + [struct.pack("<Q", x) for x in (len(path), *path)]
        )

    def __repr__(self) -> str:
        return (
            f"GaussianNoise(seeded={self.seeded}, stream={self.stream_path}, "
            f"counter={self._counter}, threads={self.threads})"
        )

    @property
    def calls(self) -> int:
        """Draw calls made on this stream so far (restored by ``load_state_dict``)."""
        return self._counter

    def calls_below(self, limit: int) -> int:
        """Draw calls on this stream and on every fork whose stream number is below ``limit``
        (and their forks): how far a tree of streams has run.

        >>> n = GaussianNoise(seed=0); _ = n.fork(1).normal_(torch.empty(2)); _ = n.fork(9)
        >>> n.calls_below(5)
        1
        """
        return self._counter + sum(
            child.calls_below(limit) for k, child in self._forks.items() if k < limit
        )

    @property
    def untouched_since_restore(self) -> bool:
        """Whether ``load_state_dict`` restored this stream (or a parent) and nothing has drawn
        from it since: its past calls are then the saved run's, so a
        :class:`~lazydp.noise_pool.NoisePool` may rebuild the refill its checkpoint was in.

        >>> n = GaussianNoise(seed=0); n.load_state_dict(n.state_dict()); n.untouched_since_restore
        True
        >>> _ = n.normal_(torch.empty(2)); n.untouched_since_restore
        False
        """
        return self._restored_at == self._counter

    def _mark_restored(self) -> None:
        self._restored_at = self._counter
        for child in self._forks.values():
            child._mark_restored()

    # -- seeding -------------------------------------------------------------------------
    def _next_call(self) -> int:
        with self._lock:
            self._counter += 1
            return self._counter - 1

    def _material(self, call: int, chunk: int) -> bytes:
        """256 bits of key material for one chunk: OS entropy, or SHAKE-256 when seeded."""
        if not self.seeded:
            return secrets.token_bytes(MATERIAL_BYTES)
        message = self._prefix + struct.pack("<QQ", call, chunk)
        return hashlib.shake_256(message).digest(MATERIAL_BYTES)

    # -- drawing -------------------------------------------------------------------------
    def _draw(self, out: Tensor, std: float, add: bool) -> Tensor:
        """Fill (``add=False``) or add to (``add=True``) ``out`` with N(0, std^2), chunked."""
        call = self._next_call()
        if out.numel() == 0:
            return out
        if not out.is_contiguous():
            # One contiguous temporary; the common (contiguous) case never allocates one.
            tmp = torch.empty(out.shape, dtype=out.dtype, device=out.device)
            self._fill(tmp.view(-1), std, add=False, call=call)
            return out.add_(tmp) if add else out.copy_(tmp)
        self._fill(out.view(-1), std, add, call)
        return out

    def _fill(self, flat: Tensor, std: float, add: bool, call: int) -> None:
        if flat.device.type != "cpu":
            self._fill_device(flat, std, add, call)
            return
        self._fill_cpu([flat], std, add, call)

    def _fill_cpu(self, flats: list[Tensor], std: float, add: bool, call: int) -> None:
        """Chunk every 1-D contiguous CPU tensor of ``flats``; chunk i of the whole list (in
        order) gets key (call, i), so one tensor alone is chunked exactly as ``_fill`` does."""
        parts = [
            flat[start : start + CHUNK_NUMEL].detach()
            for flat in flats
            for start in range(0, flat.numel(), CHUNK_NUMEL)
        ]

        def work(index: int) -> None:
            part, material = parts[index], self._material(call, index)
            if part.dtype in (torch.float32, torch.float64):
                array = part.numpy()  # shares memory: numpy fills the tensor in place
                if add:
                    add_standard_chunk(array, std, material)
                else:
                    fill_standard_chunk(array, std, material)
                return
            # half / bfloat16: drawn in float32, rounded once (numpy has no bfloat16).
            with torch.no_grad():  # grad mode is per thread: the pool's workers need their own
                scratch32 = torch.from_numpy(scratch_array(part.numel(), np.dtype(np.float32)))
                fill_standard_chunk(scratch32.numpy(), std, material)
                if add:
                    part.add_(scratch32)
                else:
                    part.copy_(scratch32)

        run_chunks(work, len(parts), self.threads)

    def _fill_device(self, flat: Tensor, std: float, add: bool, call: int) -> None:
        """GPU: one Philox generator per call with a 64-bit seed (Philox keeps all 64 bits)."""
        seed = int.from_bytes(self._material(call, 0)[:8], "little") >> 1  # manual_seed: < 2**63
        gen = torch.Generator(device=flat.device)
        gen.manual_seed(seed)
        with torch.no_grad():
            if not add:
                flat.normal_(0.0, std, generator=gen)
                return
            for start in range(0, flat.numel(), _CUDA_CHUNK_NUMEL):
                part = flat[start : start + _CUDA_CHUNK_NUMEL]
                part.add_(torch.empty_like(part).normal_(generator=gen), alpha=std)

    def replay_(self, out: Tensor, call: int) -> Tensor:
        """Seeded streams only: refill ``out`` (float32, CPU) with the N(0, 1) values that past
        call ``call`` drew into a tensor of the same size, without advancing the counter.

        Only :class:`~lazydp.noise_pool.NoisePool` uses it, to rebuild the part of a refill a
        checkpoint had not consumed yet, so that a seeded resume equals the uninterrupted run.
        Unseeded streams draw from OS entropy and can never replay (PrivacyError).
        """
        if not self.seeded:
            raise PrivacyError("an unseeded noise stream cannot replay a draw; draw afresh.")
        if isinstance(call, bool) or not isinstance(call, int) or not 0 <= call < self._counter:
            raise PrivacyError(f"call {call!r} was never drawn on this stream ({self})")
        out = _check_out(out)
        with torch.no_grad():
            self._fill(out.view(-1), 1.0, add=False, call=call)
        return out

    def normal_each_(self, tensors: list[Tensor], std: float) -> None:
        """``normal_(t, std)`` for every tensor in ONE call on the stream: their chunks (each
        tensor chunked as ``normal_`` would chunk it alone) share the thread pool, so tensors
        below one chunk still run in parallel. CUDA or non-contiguous tensors are drawn one call
        each.

        >>> a, b = torch.zeros(3), torch.zeros(2, 2)
        >>> GaussianNoise(seed=1).normal_each_([a, b], std=0.5)
        >>> bool((a != 0).all() and (b != 0).all())
        True
        """
        tensors, std = [_check_out(t) for t in tensors], _check_std(std)
        flat = [t.view(-1) for t in tensors if t.device.type == "cpu" and t.is_contiguous()]
        others = [t for t in tensors if not (t.device.type == "cpu" and t.is_contiguous())]
        if flat:
            call = self._next_call()
            with torch.no_grad():
                if _override_value is not None:
                    for t in flat:
                        t.fill_(_override_value * std)
                else:
                    self._fill_cpu(flat, std, add=False, call=call)
        for t in others:
            self.normal_(t, std)

    def normal_(self, out: Tensor, std: float = 1.0) -> Tensor:
        """Fill ``out`` in place with i.i.d. N(0, std^2) samples and return it.

        >>> GaussianNoise(seed=1).normal_(torch.empty(2, 2)).shape
        torch.Size([2, 2])
        """
        out, std = _check_out(out), _check_std(std)
        with torch.no_grad():  # noise goes straight into parameters: never part of autograd
            if _override_value is not None:
                self._next_call()
                return out.fill_(_override_value * std)
            return self._draw(out, std, add=False)

    def add_normal_(self, out: Tensor, std: float) -> Tensor:
        """Add i.i.d. N(0, std^2) noise to ``out`` in place (chunked: no out-sized temporary).

        >>> grad = torch.zeros(1000)
        >>> _ = GaussianNoise(seed=1).add_normal_(grad, std=0.5)
        >>> 0.4 < float(grad.std()) < 0.6
        True
        """
        out, std = _check_out(out), _check_std(std)
        with torch.no_grad():
            if _override_value is not None:
                self._next_call()
                return out.add_(_override_value * std)
            return self._draw(out, std, add=True)

    def aggregated(
        self,
        sum_lr: Tensor,
        sum_lr2: Tensor,
        dim: int,
        dtype: torch.dtype = torch.float32,
        pool: NoisePool | None = None,
    ) -> Tensor:
        """LazyDP's one-draw catch-up noise: an (n, dim) tensor whose row j is sqrt(sum_lr2[j]) z_j.

        This has exactly the distribution of sum over a row's pending steps s of lr_s * z_s
        (z i.i.d. N(0, I)), because a sum of independent Gaussians is Gaussian with the summed
        variance. ``sum_lr`` (sum of lr_s) is only used by the test override, which returns
        ``value * sum_lr`` as per-step constants would. Both are float64 of shape (n,).
        ``pool`` (a :class:`~lazydp.noise_pool.NoisePool` over this stream) takes the z's from
        samples drawn ahead in large batches: the same distribution, about half the cost.

        >>> rows = GaussianNoise(seed=0).aggregated(
        ...     torch.tensor([0.2, 0.1], dtype=torch.float64),
        ...     torch.tensor([0.02, 0.01], dtype=torch.float64), dim=4)
        >>> rows.shape, rows.dtype
        (torch.Size([2, 4]), torch.float32)
        """
        z, scale = self._aggregated_parts(sum_lr, sum_lr2, dim, dtype, pool)
        assert z is not None  # draw=True: always drawn
        return z.contiguous() if scale is None else z * scale

    def add_aggregated_(
        self,
        out: Tensor,
        sum_lr: Tensor | None,
        sum_lr2: Tensor,
        alpha: float,
        pool: NoisePool | None = None,
        checked: bool = False,
    ) -> Tensor:
        """``out += alpha * aggregated(sum_lr, sum_lr2, out.shape[1], out.dtype)`` in one pass
        (no (n, dim) temporary for the scaled noise): LazyDP's catch-up adds straight into the
        gathered rows.

        >>> rows = torch.zeros(2, 3)
        >>> _ = GaussianNoise(seed=0).add_aggregated_(
        ...     rows, torch.ones(2).double(), torch.ones(2).double(), alpha=0.5)
        >>> bool((rows != 0).all())
        True
        """
        if not isinstance(out, Tensor) or out.dim() != 2 or not out.is_floating_point():
            raise InputError(
                f"out must be a 2-D floating tensor (rows x dim); got "
                f"{getattr(out, 'shape', type(out).__name__)}."
            )
        fusable = out.device.type == "cpu" and out.dtype == torch.float32 and out.is_contiguous()
        z, scale = self._aggregated_parts(
            sum_lr, sum_lr2, out.shape[1], out.dtype, pool, draw=not fusable, checked=checked
        )
        with torch.no_grad():
            if scale is None:
                assert z is not None
                return out.add_(cast(z, device=out.device), alpha=alpha)
            if z is None:
                self._add_row_scaled_(out, scale.view(-1) * alpha)
                return out
            return out.addcmul_(
                cast(z, device=out.device), cast(scale, device=out.device), value=alpha
            )

    def _add_row_scaled_(self, out: Tensor, scale: Tensor) -> None:
        """``out[j] += scale[j] * z_j`` (z i.i.d. N(0, I), out float32 CPU contiguous), drawn,
        scaled and added chunk by chunk in numpy: one pass over ``out``, no (n, dim) temporary,
        no torch op on the pool's threads. Chunks hold whole rows (about CHUNK_NUMEL values)."""
        call = self._next_call()
        n, dim = out.shape
        if n == 0:
            return
        rows_per_chunk = max(1, CHUNK_NUMEL // dim)
        starts = range(0, n, rows_per_chunk)
        target, factor = out.detach().numpy(), scale.detach().to(torch.float32).numpy()

        def work(index: int) -> None:
            rows = slice(starts[index], starts[index] + rows_per_chunk)
            add_standard_chunk(target[rows], 1.0, self._material(call, index), factor[rows])

        run_chunks(work, len(starts), self.threads)

    def _aggregated_parts(
        self,
        sum_lr: Tensor | None,
        sum_lr2: Tensor,
        dim: int,
        dtype: torch.dtype,
        pool: NoisePool | None,
        draw: bool = True,
        checked: bool = False,
    ) -> tuple[Tensor | None, Tensor | None]:
        """(z, scale) with z * scale the aggregated rows; scale None when z is final already,
        z None when ``draw`` is False and the pool does not serve it (the caller draws it).

        ``sum_lr`` is only read by the test-only constant override (None is allowed while none
        is active). ``checked``: the caller guarantees sum_lr2 finite and >= 0 (LazyDP's lr^2
        prefix sums, whose lrs were checked as they were appended), so it is not re-checked:
        a reduction and a sync per table per step."""
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"dim must be an int >= 1 (embedding dimension); got {dim!r}.")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ConfigError(f"dtype must be a floating torch.dtype; got {dtype!r}.")
        for name, t in (("sum_lr", sum_lr), ("sum_lr2", sum_lr2)):
            if (name == "sum_lr" and t is None) and _override_value is None:
                continue
            if not isinstance(t, Tensor) or t.dim() != 1 or not t.is_floating_point():
                raise InputError(
                    f"{name} must be a 1-D floating tensor (one entry per row); got "
                    f"{getattr(t, 'shape', type(t).__name__)}. Pass float64 of shape (n,)."
                )
        if sum_lr is not None and sum_lr.shape != sum_lr2.shape:
            raise InputError(
                f"sum_lr and sum_lr2 must have the same shape; got {tuple(sum_lr.shape)} and "
                f"{tuple(sum_lr2.shape)}. Pass one entry per row in both."
            )
        n = sum_lr2.shape[0]
        if _override_value is not None:
            assert sum_lr is not None  # checked above
            self._next_call()
            rows = (_override_value * sum_lr.to(torch.float64)).to(dtype)
            return rows.unsqueeze(1).expand(n, dim), None
        if n and not checked and not bool(((sum_lr2 >= 0) & torch.isfinite(sum_lr2)).all()):
            raise InputError(
                "sum_lr2 must be finite and >= 0 (a sum of squared learning rates); got "
                f"min={float(sum_lr2.min())}. Check the history table's lr^2 prefix sums."
            )
        scale = cast(sum_lr2, torch.float64).sqrt().to(dtype).unsqueeze(1)
        pooled = dtype == torch.float32 and sum_lr2.device.type == "cpu"
        if pool is not None and pooled and (draw or pool.serves(n * dim)):
            if pool.noise is not self:
                raise ConfigError("pool draws from another stream; build it as NoisePool(self)")
            return pool.standard(n * dim).view(n, dim), scale
        if not draw:
            return None, scale
        out = torch.empty((n, dim), dtype=dtype, device=sum_lr2.device)
        self._draw(out, 1.0, add=False)
        return out, scale

    # -- streams and checkpoints ---------------------------------------------------------
    def rekey_(self, seed: int | None, path: list[int]) -> None:
        """Move this stream tree to ``seed`` and ``path`` with every counter at 0 (forks callers
        hold follow in place): a resumed run's streams, which never replay the noise the steps
        after its checkpoint drew (DP invariant 5).

        >>> a = GaussianNoise(seed=1); b = GaussianNoise(seed=1); b.rekey_(1, [2])
        >>> bool((a.normal_(torch.empty(4)) != b.normal_(torch.empty(4))).all())
        True
        """
        self.load_state_dict(rekeyed_state(self.state_dict(), seed, path))

    def fork(self, stream: int) -> GaussianNoise:
        """The independent child stream ``stream`` (one per table, per rank), same seed.

        Forking the same ``stream`` again returns the same child (one stream, one counter),
        so two callers can never draw the same noise from it. The parent's ``state_dict``
        includes its forks, so restoring the parent continues every child's sequence.

        >>> root = GaussianNoise(seed=0)
        >>> root.fork(3).stream_path, root.fork(3) is root.fork(3)
        ((0, 3), True)
        """
        stream = _check_stream(stream, "stream")
        with self._lock:
            if stream not in self._forks:
                self._forks[stream] = self._new_fork(stream)
            return self._forks[stream]

    def _new_fork(self, stream: int) -> GaussianNoise:
        child = GaussianNoise.__new__(GaussianNoise)
        child._init(self.seed, (*self.stream_path, stream), self.threads)
        return child

    def state_dict(self) -> dict[str, Any]:
        """Plain data (JSON / ``torch.load(weights_only=True)`` safe), forks included.

        >>> GaussianNoise(seed=5).state_dict()["counter"]
        0
        """
        return {
            "format": _STATE_FORMAT,
            "seed": self.seed,
            "stream_path": list(self.stream_path),
            "counter": self._counter,
            "forks": {str(k): child.state_dict() for k, child in sorted(self._forks.items())},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore seed, stream, call counter and forks: the next draws continue the saved run.

        Forks that callers already hold are updated in place; a fork the saved run had not
        made yet restarts at call 0 (it had drawn nothing). Nothing changes if ``state`` is
        invalid (PrivacyError).

        >>> a = GaussianNoise(seed=5); _ = a.normal_(torch.empty(3))
        >>> b = GaussianNoise(); b.load_state_dict(a.state_dict()); b.seeded
        True
        """
        self._adopt(GaussianNoise._from_state(state, self.threads))
        self._mark_restored()

    @staticmethod
    def _from_state(state: dict[str, Any], threads: int) -> GaussianNoise:
        """A detached, fully validated generator tree rebuilt from ``state``."""
        try:
            if state["format"] != _STATE_FORMAT:
                raise ValueError(f"format {state['format']!r}")
            seed, path, counter = state["seed"], state["stream_path"], state["counter"]
            if isinstance(counter, bool) or not isinstance(counter, int) or counter < 0:
                raise ValueError(f"counter {counter!r}")
            path = tuple(_check_stream(x, "stream_path entry") for x in path)
            if not path:
                raise ValueError("empty stream_path")
            noise = GaussianNoise.__new__(GaussianNoise)
            noise._init(seed, path, threads)
            noise._counter = counter
            for key, sub in dict(state["forks"]).items():
                child = GaussianNoise._from_state(sub, threads)
                if child.seed != seed or child.stream_path != (*path, int(key)):
                    raise ValueError(f"fork {key!r} has another seed or stream path")
                noise._forks[int(key)] = child
        except (KeyError, TypeError, ValueError) as exc:
            raise PrivacyError(
                f"noise state is corrupt or from another version ({exc!r}); expected "
                f"{{'format': {_STATE_FORMAT!r}, 'seed', 'stream_path', 'counter', 'forks'}} as "
                "written by GaussianNoise.state_dict(). Resume from an intact checkpoint."
            ) from exc
        return noise

    def _adopt(self, other: GaussianNoise) -> None:
        """Take ``other``'s state in place, keeping the fork objects callers already hold."""
        live = self._forks
        self._init(other.seed, other.stream_path, self.threads)
        self._counter = other._counter
        for stream in sorted(live.keys() | other._forks.keys()):
            saved = other._forks.get(stream) or other._new_fork(stream)
            if stream in live:
                live[stream]._adopt(saved)
            self._forks[stream] = live.get(stream, saved)


def rekeyed_state(state: dict[str, Any], seed: int | None, path: list[int]) -> dict[str, Any]:
    """``state`` (a noise tree) moved to ``seed`` and ``path`` with every counter at 0."""
    forks = {
        k: rekeyed_state(sub, seed, [*path, int(k)])
        for k, sub in dict(state.get("forks", {})).items()
    }
    return {**state, "seed": seed, "stream_path": path, "counter": 0, "forks": forks}
