"""Building blocks: a plain MLP, fast-initialised embedding bags, and a small tabular model.

Contract:
* Nothing here mixes examples (no BatchNorm, no dropout): row i of every output depends only on
  row i of the inputs, which per-example clipping relies on.
* ``embedding_bag`` fills a (rows, dim) table with U(-1/sqrt(rows), 1/sqrt(rows)) without a Python
  loop over rows: on CPU in fixed 4M-element chunks, each from its own numpy PCG64 stream spawned
  from ``seed``, spread over ``torch.get_num_threads()`` threads (numpy releases the GIL while it
  fills). The chunking is fixed, so the values depend on ``seed`` only, never on the thread count.
  On other devices the device's own ``uniform_`` is used.
* Initialisation randomness is workload randomness, not privacy randomness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor, nn

from lazydp import huge_pages
from lazydp.errors import ConfigError, InputError

_CHUNK = 1 << 22  # elements per independently seeded fill chunk (16 MiB of fp32)
EMBEDDING_MODES = ("sum", "mean")


def resolve_seed(seed: int | None) -> int:
    """Return ``seed``, or draw one from torch's global generator so ``torch.manual_seed`` rules.

    Example: ``resolve_seed(3) == 3``.
    """
    if seed is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    if seed < 0:
        raise ConfigError(f"seed={seed} is negative; pass a non-negative int or None")
    return int(seed)


def uniform_table(
    rows: int, dim: int, bound: float, seed: int, device: torch.device | str | None = None
) -> Tensor:
    """A (rows, dim) float32 tensor of U(-bound, bound), filled in parallel chunks.

    Example: ``uniform_table(1000, 16, 0.03, seed=0).abs().max() <= 0.03``.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    out = huge_pages.empty((rows, dim), torch.float32, device)  # rows are read at random
    if device.type != "cpu":
        gen = torch.Generator(device=device).manual_seed(seed)
        return out.uniform_(-bound, bound, generator=gen)
    flat = out.numpy().reshape(-1)
    starts = range(0, flat.size, _CHUNK)
    streams = np.random.SeedSequence(seed).spawn(len(starts))

    def fill(job: tuple[int, np.random.SeedSequence]) -> None:
        start, stream = job
        chunk = flat[start : start + _CHUNK]
        np.random.Generator(np.random.PCG64(stream)).random(out=chunk, dtype=np.float32)
        chunk *= np.float32(2 * bound)
        chunk -= np.float32(bound)

    workers = max(1, min(torch.get_num_threads(), len(starts)))
    if workers == 1:
        for job in zip(starts, streams):
            fill(job)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fill, zip(starts, streams)))
    return out


def embedding_bag(
    rows: int,
    dim: int,
    *,
    mode: str = "sum",
    sparse: bool = False,
    seed: int | None = None,
    device: torch.device | str | None = None,
) -> nn.EmbeddingBag:
    """An ``nn.EmbeddingBag`` whose table is U(-1/sqrt(rows), 1/sqrt(rows)), created fast.

    Example: ``embedding_bag(10, 4, seed=0).weight.shape == (10, 4)``.
    """
    if rows < 1 or dim < 1:
        raise ConfigError(f"embedding table of {rows} x {dim}; both must be >= 1")
    if mode not in EMBEDDING_MODES:
        raise ConfigError(
            f"EmbeddingBag mode={mode!r} has no exact per-example norm; use one of {EMBEDDING_MODES}"
        )
    weight = uniform_table(rows, dim, 1.0 / math.sqrt(rows), resolve_seed(seed), device)
    return nn.EmbeddingBag(rows, dim, mode=mode, sparse=sparse, _weight=weight)


def _init_linear(layer: nn.Linear, gen: torch.Generator) -> None:
    # Same U(-1/sqrt(fan_in), 1/sqrt(fan_in)) law as torch's default, but from our own generator.
    bound = 1.0 / math.sqrt(layer.in_features)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=gen)
        layer.bias.uniform_(-bound, bound, generator=gen)


class MLP(nn.Sequential):
    """Linear+ReLU for each width in ``hidden``, then a Linear to ``out_features``.

    ``final_relu=True`` adds a ReLU after the last Linear too (DLRM's bottom MLP).

    Example: ``MLP(13, [64, 32], 1)(torch.zeros(5, 13)).shape == (5, 1)``.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int = 1,
        *,
        final_relu: bool = False,
        seed: int | None = None,
    ) -> None:
        widths = [in_features, *hidden, out_features]
        if any(w < 1 for w in widths):
            raise ConfigError(f"MLP widths {widths} must all be >= 1")
        gen = torch.Generator().manual_seed(resolve_seed(seed))
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            linear = nn.Linear(fan_in, fan_out)
            _init_linear(linear, gen)
            layers.append(linear)
            if i < len(widths) - 2 or final_relu:
                layers.append(nn.ReLU())
        super().__init__(*layers)
        self.in_features = in_features
        self.out_features = out_features


class TabularModel(nn.Module):
    """One sum-EmbeddingBag per categorical feature, concatenated with dense features, then an MLP.

    ``forward(dense (B, num_dense) or None, categorical (B, num_categorical) int64)``; each
    categorical column is looked up as a bag of one id, so the embedding clipper sees ordinary
    EmbeddingBag calls.

    Example: ``TabularModel([4, 7], 3, num_dense=2, hidden=[8])(torch.zeros(5, 2),
    torch.zeros(5, 2, dtype=torch.long)).shape == (5, 1)``.
    """

    def __init__(
        self,
        cardinalities: Sequence[int],
        embedding_dim: int,
        num_dense: int,
        hidden: Sequence[int],
        out_features: int = 1,
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if num_dense < 0:
            raise ConfigError(f"num_dense={num_dense} must be >= 0")
        if not cardinalities and num_dense == 0:
            raise ConfigError("TabularModel needs at least one categorical or dense feature")
        base = resolve_seed(seed)
        self.cardinalities = tuple(int(c) for c in cardinalities)
        self.num_dense = num_dense
        self.embeddings = nn.ModuleList(
            embedding_bag(c, embedding_dim, seed=base + 1 + i)
            for i, c in enumerate(self.cardinalities)
        )
        width = num_dense + embedding_dim * len(self.cardinalities)
        self.mlp = MLP(width, hidden, out_features, seed=base)

    def forward(self, dense: Tensor | None, categorical: Tensor) -> Tensor:
        if categorical.dim() != 2 or categorical.shape[1] != len(self.cardinalities):
            raise InputError(
                f"categorical has shape {tuple(categorical.shape)}; expected "
                f"(batch, {len(self.cardinalities)})"
            )
        parts = [bag(categorical[:, i : i + 1]) for i, bag in enumerate(self.embeddings)]
        if self.num_dense:
            if dense is None or dense.shape != (categorical.shape[0], self.num_dense):
                got = None if dense is None else tuple(dense.shape)
                raise InputError(
                    f"dense has shape {got}; expected ({categorical.shape[0]}, {self.num_dense})"
                )
            parts.insert(0, dense)
        return self.mlp(torch.cat(parts, dim=1))
