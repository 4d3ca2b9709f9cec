"""The LazyDP paper's DLRM workloads as frozen configs, scalable in table size.

Contract:
* At ``scale=1`` the row counts are exactly the paper's (DESIGN.md "Reference workloads"):
  ``basic`` 26 x 16M (d=64), ``mlperf`` the 26 MLPerf v2.1 Criteo-1TB tables (sum 187,767,399;
  d=128), ``rmc1`` 10 x 75M, ``rmc2`` 40 x 18.75M, ``rmc3`` 10 x 75M (d=32).
* ``scale`` multiplies every table's rows: ``rows = max(1, round(rows * scale))`` with Python's
  ``round`` (half to even), so tiny tables (mlperf has tables of 3 and 4 rows) keep at least one row.
* ``bottom_mlp`` lists widths from the 13 dense inputs to the embedding dim; ``top_mlp`` lists the
  hidden widths ending in the single logit; its input width is ``interaction_width``: DLRM's dot
  interaction over (num_tables + 1) vectors of dim d gives n*(n-1)/2 pairwise dot products
  (strictly lower triangle), concatenated with the bottom-MLP output (d).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from lazydp.errors import ConfigError

MLPERF_TABLE_ROWS: tuple[int, ...] = (
    39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10,
    2208, 11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36,
)  # fmt: skip


@dataclass(frozen=True)
class DLRMConfig:
    """Shape of a DLRM: tables, embedding dim, MLP widths, ids per bag.

    Example: ``DLRMConfig("toy", (10, 20), 4, (13, 8, 4), (16, 1), 2).interaction_width == 7``.
    """

    name: str
    table_rows: tuple[int, ...]
    embedding_dim: int
    bottom_mlp: tuple[int, ...]
    top_mlp: tuple[int, ...]
    pooling: int
    scale: float = 1.0  # the scale the rows were derived with (informational, for messages)

    def __post_init__(self) -> None:
        if not self.table_rows or any(int(r) < 1 for r in self.table_rows):
            raise ConfigError(f"{self.name}: table_rows={self.table_rows} must be non-empty, >= 1")
        if self.embedding_dim < 1:
            raise ConfigError(f"{self.name}: embedding_dim={self.embedding_dim} must be >= 1")
        if len(self.bottom_mlp) < 2 or self.bottom_mlp[-1] != self.embedding_dim:
            raise ConfigError(
                f"{self.name}: bottom_mlp={self.bottom_mlp} must run from the dense inputs to "
                f"embedding_dim={self.embedding_dim} (at least two widths)"
            )
        if not self.top_mlp or self.top_mlp[-1] != 1:
            raise ConfigError(f"{self.name}: top_mlp={self.top_mlp} must end in 1 (the logit)")
        if any(w < 1 for w in (*self.bottom_mlp, *self.top_mlp)):
            raise ConfigError(f"{self.name}: MLP widths must be >= 1")
        if self.pooling < 1:
            raise ConfigError(f"{self.name}: pooling={self.pooling} must be >= 1 ids per bag")

    @property
    def num_tables(self) -> int:
        return len(self.table_rows)

    @property
    def num_dense(self) -> int:
        return self.bottom_mlp[0]

    @property
    def total_rows(self) -> int:
        return sum(self.table_rows)

    @property
    def interaction_width(self) -> int:
        return interaction_width(self.num_tables, self.embedding_dim)

    def mlp_parameter_count(self) -> int:
        """Weights and biases of both MLPs (the dense, eagerly noised parameters)."""
        top = (self.interaction_width, *self.top_mlp)
        return sum(a * b + b for w in (self.bottom_mlp, top) for a, b in zip(w[:-1], w[1:]))


def interaction_width(num_tables: int, embedding_dim: int) -> int:
    """Top-MLP input width of DLRM's dot interaction: n*(n-1)/2 + d with n = num_tables + 1.

    Example: ``interaction_width(26, 128) == 479``.
    """
    n = num_tables + 1
    return n * (n - 1) // 2 + embedding_dim


_PAPER: dict[str, DLRMConfig] = {
    "basic": DLRMConfig("basic", (16_000_000,) * 26, 64, (13, 512, 256, 64), (512, 512, 256, 1), 1),
    "mlperf": DLRMConfig(
        "mlperf", MLPERF_TABLE_ROWS, 128, (13, 512, 256, 128), (1024, 1024, 512, 256, 1), 1
    ),
    "rmc1": DLRMConfig("rmc1", (75_000_000,) * 10, 32, (13, 256, 128, 32), (256, 64, 1), 80),
    "rmc2": DLRMConfig("rmc2", (18_750_000,) * 40, 32, (13, 256, 128, 32), (512, 128, 1), 80),
    "rmc3": DLRMConfig("rmc3", (75_000_000,) * 10, 32, (13, 2560, 512, 32), (512, 128, 1), 20),
}
PAPER_CONFIGS: tuple[str, ...] = tuple(_PAPER)


def paper_config(
    name: str, scale: float = 1.0, pooling: int | None = None, embedding_dim: int | None = None
) -> DLRMConfig:
    """The paper's config ``name`` with every table's rows multiplied by ``scale``.

    ``pooling`` overrides the ids per bag (paper sweep: 1/10/20/30); ``embedding_dim`` overrides d
    (the bottom MLP's last width follows it).

    Example: ``paper_config("rmc1", scale=1e-3).table_rows[0] == 75_000``.
    """
    if name not in _PAPER:
        raise ConfigError(f"config name={name!r} is unknown; choose one of {PAPER_CONFIGS}")
    if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
        raise ConfigError(f"scale={scale!r} must be a finite number > 0 (1.0 = the paper's size)")
    base = _PAPER[name]
    dim = base.embedding_dim if embedding_dim is None else int(embedding_dim)
    return replace(
        base,
        table_rows=tuple(max(1, round(r * scale)) for r in base.table_rows),
        embedding_dim=dim,
        bottom_mlp=(*base.bottom_mlp[:-1], dim),
        pooling=base.pooling if pooling is None else int(pooling),
        scale=float(scale),
    )


def table_bytes(cfg: DLRMConfig, dtype_bytes: int = 4) -> int:
    """Bytes of all embedding tables: total rows x embedding_dim x dtype_bytes.

    Example: ``table_bytes(paper_config("rmc1")) == 96_000_000_000``.
    """
    return cfg.total_rows * cfg.embedding_dim * dtype_bytes
