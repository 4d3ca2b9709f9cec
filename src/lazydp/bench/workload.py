"""One benchmark workload: which model, which batches, and how each mode is set up.

Contract:
* ``BenchSpec`` is a frozen, validated description of one point of the paper's sweep (config,
  scale, batch size, pooling, embedding dim, locality) plus the timing protocol (``iterations``,
  then the ``statistic`` -- mean by default, as in the paper -- of the last ``measure_last``).
  ``dense_only=True`` keeps the config's MLPs but drops every table (the bottom MLP feeds the top
  MLP directly): the "no embeddings" reference of target 5. ``placement="split"`` puts the MLPs
  on the GPU and keeps the tables in host memory, as the paper does (refused without CUDA).
* ``build_model(spec, mode)`` builds the same weights for every mode (seeded from ``spec.seed``).
  ``sgd`` gets ``sparse=True`` EmbeddingBags so plain SGD updates only the rows it read -- the fair
  non-private reference; the DP modes get dense-gradient bags, which lazydp's engine never
  materialises (it reads the table through a detached forward).
* ``make_batches(spec)`` yields fixed-size synthetic batches of exactly ``spec.batch_size``
  (no Poisson loader: the harness times steps, it does not train) in the ``(ids, offsets)`` bag
  form, the one form every library under comparison accepts.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from lazydp import _validate as v
from lazydp.data.synthetic import Batch, SyntheticDLRMData, parse_locality
from lazydp.errors import ConfigError
from lazydp.models.configs import PAPER_CONFIGS, DLRMConfig, paper_config
from lazydp.models.dlrm import DLRM
from lazydp.models.mlp import MLP

# Workloads beyond the paper's five. ``small8`` is the model of issue 6's side-by-side check with
# Opacus: 8 tables x 100k rows (at scale 1), d = 16, pooling 4, small MLPs.
EXTRA_CONFIGS: dict[str, DLRMConfig] = {
    "small8": DLRMConfig("small8", (100_000,) * 8, 16, (13, 64, 16), (64, 1), 4),
}
BENCH_CONFIGS: tuple[str, ...] = (*PAPER_CONFIGS, *EXTRA_CONFIGS)
# How the measured steps become one number: the paper's mean, or (on a shared, noisy machine,
# where other work only ever adds time) the median or the fastest whole step.
STATISTICS = ("mean", "median", "min")
# Where the model lives: all on the CPU, or the paper's GPU set-up (MLPs on the GPU, tables in
# host memory).
PLACEMENTS = ("cpu", "split")

# Largest --scale accepted: a million times the paper's tables (~10^17 bytes) fits no machine, so
# the memory check refuses it with the largest scale that fits; far beyond, sizes overflow floats.
MAX_SCALE = 1e6
# Rows of the dummy dataset handed to make_private: only its length matters (q = B / N).
DATASET_BATCHES = 100


@dataclass(frozen=True)
class BenchSpec:
    """One workload and its timing protocol.

    Example: ``BenchSpec("rmc1", scale=1e-4, batch_size=64, pooling=4).label ==
    "rmc1 s=0.0001 B=64 L=4"``.
    """

    config: str = "rmc1"
    scale: float = 0.01
    batch_size: int = 2048
    pooling: int | None = None
    embedding_dim: int | None = None
    locality: str = "uniform"
    iterations: int = 30
    measure_last: int = 10
    statistic: str = "mean"
    dense_only: bool = False
    lr: float = 0.01
    table_momentum: float = 0.0  # SGD momentum of the tables' optimizer (every mode)
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    seed: int = 0
    placement: str = "cpu"

    def __post_init__(self) -> None:
        v.check_choice("config", self.config, BENCH_CONFIGS)
        scale = self.scale
        if (
            isinstance(scale, bool)
            or not isinstance(scale, int | float)
            or not math.isfinite(scale)
            or not 0 < scale <= MAX_SCALE
        ):
            raise ConfigError(
                f"scale must be a finite number in (0, {MAX_SCALE:g}] (1.0 = the paper's table "
                f"sizes, ~96 GB for rmc1); got {scale!r}."
            )
        v.check_positive_int("batch_size", self.batch_size)
        if self.pooling is not None:
            v.check_positive_int("pooling", self.pooling)
        if self.embedding_dim is not None:
            v.check_positive_int("embedding_dim", self.embedding_dim)
        parse_locality(self.locality)
        v.check_positive_int("iterations", self.iterations)
        v.check_positive_int("measure_last", self.measure_last)
        if self.measure_last > self.iterations:
            raise ConfigError(
                f"measure_last={self.measure_last} exceeds iterations={self.iterations}; the "
                "protocol averages the last measure_last of iterations steps (paper: 10 of 30)."
            )
        v.check_choice("statistic", self.statistic, STATISTICS)
        v.check_noise_multiplier(self.noise_multiplier)
        v.check_max_grad_norm(self.max_grad_norm)
        # lr=0 or NaN would time steps that update nothing (or poison the weights) unnoticed.
        v.check_positive_real("lr", self.lr, "It is the SGD step size, e.g. lr: 0.01.")
        v.check_real(
            "table_momentum",
            self.table_momentum,
            "a number in [0, 1) (SGD momentum of the tables)",
            lambda mu: 0 <= mu < 1,
            "Pass e.g. --table-momentum 0.9, or 0 for plain SGD.",
        )
        if not isinstance(self.dense_only, bool):  # "false" from a YAML string is truthy
            raise ConfigError(
                f"dense_only (--mlp-only) must be true or false; got {self.dense_only!r}."
            )
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ConfigError(f"seed must be an integer >= 0; got {seed!r}.")
        v.check_choice("placement", self.placement, PLACEMENTS)
        if self.placement == "split" and not torch.cuda.is_available():
            raise ConfigError(
                "placement='split' (--placement split) puts the MLPs on a GPU and keeps the "
                "tables in host memory, as the LazyDP paper does; this machine has no CUDA "
                "device. Use placement='cpu'."
            )

    @property
    def mlp_device(self) -> torch.device:
        """Where the MLPs (and the dense inputs and labels) live; the tables stay on the CPU."""
        return torch.device("cuda" if self.placement == "split" else "cpu")

    @property
    def model_config(self) -> DLRMConfig:
        """The DLRM shape: a paper config (or ``small8``) scaled and overridden."""
        if self.config in PAPER_CONFIGS:
            return paper_config(self.config, self.scale, self.pooling, self.embedding_dim)
        base = EXTRA_CONFIGS[self.config]
        dim = base.embedding_dim if self.embedding_dim is None else self.embedding_dim
        return replace(
            base,
            table_rows=tuple(max(1, round(r * self.scale)) for r in base.table_rows),
            embedding_dim=dim,
            bottom_mlp=(*base.bottom_mlp[:-1], dim),
            pooling=base.pooling if self.pooling is None else self.pooling,
            scale=float(self.scale),
        )

    @property
    def label(self) -> str:
        """Column prefix in reports: config, scale, batch and pooling (all that changes timings)."""
        cfg = self.model_config
        name = f"{self.config}-mlp-only" if self.dense_only else self.config
        text = f"{name} s={self.scale:g} B={self.batch_size} L={cfg.pooling}"
        if self.embedding_dim is not None:
            text += f" d={cfg.embedding_dim}"
        if self.locality != "uniform":
            text += f" {self.locality}"
        if self.table_momentum:
            text += f" mu={self.table_momentum:g}"
        if self.placement != "cpu":
            text += f" {self.placement}"
        return text

    def table_bytes(self) -> int:
        """fp32 bytes of all embedding tables (0 for ``dense_only``)."""
        cfg = self.model_config
        return 0 if self.dense_only else cfg.total_rows * cfg.embedding_dim * 4

    def catch_up_values(self) -> int:
        """At most how many noise values LazyDP's catch-up draws a step: every table's distinct
        rows of a batch (at most batch x pooling, at most the table) times the dimension."""
        if self.dense_only:
            return 0
        cfg = self.model_config
        reads = self.batch_size * cfg.pooling
        return sum(min(reads, rows) for rows in cfg.table_rows) * cfg.embedding_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DenseOnly(nn.Module):
    """The config's bottom MLP straight into its top MLP: a DLRM without embedding tables."""

    def __init__(self, cfg: DLRMConfig, seed: int) -> None:
        super().__init__()
        self.bottom = MLP(cfg.bottom_mlp[0], cfg.bottom_mlp[1:-1], cfg.embedding_dim, seed=seed)
        self.top = MLP(cfg.embedding_dim, cfg.top_mlp[:-1], 1, seed=seed + 1)

    def forward(self, dense: Tensor, sparse: Any = None) -> Tensor:
        return self.top(torch.relu(self.bottom(dense))).squeeze(1)


def build_model(spec: BenchSpec, mode: str, *, sparse: bool | None = None) -> nn.Module:
    """The workload's model for ``mode`` (same weights in every mode).

    Example: ``build_model(BenchSpec("basic", scale=1e-6, batch_size=4), "sgd")``.
    """
    cfg = spec.model_config
    if spec.dense_only:
        return DenseOnly(cfg, spec.seed).to(spec.mlp_device)
    use_sparse = (mode == "sgd") if sparse is None else sparse
    # check_ids costs a min/max per table per step; the synthetic ids are in range by contract.
    return DLRM.from_config(
        cfg,
        sparse=use_sparse,
        seed=spec.seed,
        check_ids=False,
        device=spec.mlp_device,
        table_device="cpu",
    )


def split_params(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """(table weights, every other parameter): the two SGD optimizers of a DLRM set-up."""
    tables = [m.weight for m in model.modules() if isinstance(m, (nn.EmbeddingBag, nn.Embedding))]
    ids = {id(p) for p in tables}
    return tables, [p for p in model.parameters() if id(p) not in ids]


def build_optimizers(
    model: nn.Module, lr: float, table_momentum: float = 0.0
) -> list[torch.optim.Optimizer]:
    """torch.optim.SGD for the MLPs, and another for the tables (plain, or with
    ``table_momentum``: both LazyDP-exact)."""
    tables, dense = split_params(model)
    opts: list[torch.optim.Optimizer] = [torch.optim.SGD(dense, lr=lr)]
    if tables:
        opts.append(torch.optim.SGD(tables, lr=lr, momentum=table_momentum))
    return opts


def dummy_loader(batch_size: int) -> torch.utils.data.DataLoader:
    """A loader over N = batch_size * 100 placeholder rows: only sets q = B / N for make_private."""
    rows = torch.zeros(batch_size * DATASET_BATCHES, 1)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(rows), batch_size=batch_size)


def make_batches(spec: BenchSpec, count: int | None = None) -> Iterator[Batch]:
    """``count`` (default ``spec.iterations``) fixed-size synthetic batches, same in every mode.

    Example: ``next(make_batches(BenchSpec("rmc1", 1e-5, 8, pooling=2), 1))[0].shape == (8, 13)``.
    """
    data = SyntheticDLRMData(spec.model_config, spec.batch_size, spec.locality, seed=spec.seed)
    yield from data.batches(spec.iterations if count is None else count)


def clock_sync(device: torch.device) -> Callable[[], None]:
    """What to call before reading the clock: on a GPU, wait for its queued kernels (a step's
    phases are then charged their work, not their launches); on the CPU, nothing."""
    return torch.cuda.synchronize if device.type == "cuda" else _nothing


def _nothing() -> None:
    """All on the CPU: every op has finished when it returns."""


def on_device(batch: Batch, device: torch.device) -> Batch:
    """``batch`` with its dense features and labels on ``device`` (the MLPs'); the ids stay
    where the tables are (host memory)."""
    dense, sparse, label = batch
    if dense.device == device:
        return batch
    return dense.to(device), sparse, label.to(device)


def loss_of(model: nn.Module, batch: Batch) -> Tensor:
    """Mean binary cross-entropy of the model's logits on one batch."""
    dense, sparse, label = batch
    logits = model(dense, sparse)
    return nn.functional.binary_cross_entropy_with_logits(logits, label)
