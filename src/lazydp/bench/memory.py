"""Host-memory estimate for training a DLRM config in one of the five modes, and a refusal to start
runs that cannot fit.

Contract:
* ``estimate_training_bytes`` is an estimate, dominated by terms that are exact: the embedding
  tables (rows x d x dtype_bytes) and the LazyDP history table (one int32 per row, ``lazydp``
  only). The ``dpsgd_*`` modes hold no table-sized noise buffer: the benchmark's tables are on
  SGD, which the eager path noises and updates in place in generator chunks
  (optim/eager.py), so ``noise_buffer`` is that chunk (measured at s=0.17 on mlperf, dpsgd_f's
  peak was 0.31 GB above its 16.35 GB of tables). ``dpsgd_r`` alone holds table-sized
  gradients: its second pass backpropagates through the (non-sparse) tables, leaving a dense
  gradient on every table at once, and compares each with its clipped sum densified (two
  more of the largest table). Other gradients, per-example gradients and activations are
  sized from the batch and the layer widths.
* ``check_fits`` raises ``ConfigError`` before anything is allocated, naming the config, scale, mode,
  the need, what is available, and the largest scale that fits (floored to two significant digits).
* ``available_memory_bytes`` is MemAvailable from /proc/meminfo, lowered to the cgroup limit's
  headroom when the process runs in a memory-limited container; ``os.sysconf`` elsewhere.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from lazydp.errors import ConfigError
from lazydp.models.configs import PAPER_CONFIGS, DLRMConfig, paper_config, table_bytes

# The five training modes (same names as lazydp.engine.MODES; repeated here so that estimating
# memory does not import the training engine).
MODES = ("sgd", "dpsgd_b", "dpsgd_r", "dpsgd_f", "lazydp")
HISTORY_BYTES_PER_ROW = 4  # int32 step index per row
ID_BYTES = 8  # int64 ids
# The eager path's noise scratch, about one generator chunk (512k values: uniform words and
# floats) per thread for two threads: tiny next to any table.
NOISE_CHUNK_BYTES = 2 * (1 << 19) * 8


def _layers(cfg: DLRMConfig) -> list[tuple[int, int]]:
    top = (cfg.interaction_width, *cfg.top_mlp)
    return [(a, b) for w in (cfg.bottom_mlp, top) for a, b in zip(w[:-1], w[1:])]


def estimate_training_bytes(
    cfg: DLRMConfig, mode: str, batch_size: int, dtype_bytes: int = 4, momentum: bool = False
) -> dict[str, Any]:
    """Estimated peak host bytes of one training step, by component, plus ``total``.

    ``momentum``: the tables' SGD keeps a velocity as large as the tables (LazyDP's per-row
    velocity, or torch's momentum buffer; sgd's sparse buffer grows towards that size).

    Keys: ``parameters``, ``history_table``, ``velocity``, ``noise_buffer``, ``gradients``,
    ``per_example_grads``, ``activations``, ``total`` (bytes, int); ``row_bytes`` (the part that
    grows with table rows); and the inputs ``config``, ``scale``, ``mode``, ``batch_size``,
    ``pooling``, ``embedding_dim``, ``dtype_bytes``.

    Example: ``estimate_training_bytes(paper_config("rmc1", 0.01), "lazydp", 2048)["total"]``
    is about 1.26e9.
    """
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is unknown; choose one of {MODES}")
    if batch_size < 1 or dtype_bytes < 1:
        raise ConfigError(f"batch_size={batch_size} and dtype_bytes={dtype_bytes} must be >= 1")
    d, b = cfg.embedding_dim, batch_size
    layers = _layers(cfg)
    mlp_params = sum(i * o + o for i, o in layers)
    looked_up = b * cfg.pooling * cfg.num_tables  # embedding rows read per step
    sparse_grad = looked_up * (d * dtype_bytes + ID_BYTES)
    history = cfg.total_rows * HISTORY_BYTES_PER_ROW if mode == "lazydp" else 0
    # The eager table update draws into the table itself, one generator chunk at a time per
    # thread (optim/eager.py): no table-sized buffer. An estimate that counted the largest table
    # here refused dpsgd_f on mlperf above s=0.17 though it fit up to about s=0.21.
    noise = NOISE_CHUNK_BYTES if mode.startswith("dpsgd") else 0
    velocity = table_bytes(cfg, dtype_bytes) if momentum else 0
    # dpsgd_r's second pass (optim/reweighted.py): a dense gradient on every table, all alive
    # while each is compared with its clipped sum, densified with the difference (2 tables).
    second_pass = 0
    if mode == "dpsgd_r":
        second_pass = table_bytes(cfg, dtype_bytes) + 2 * max(cfg.table_rows) * d * dtype_bytes
    per_example = {
        "dpsgd_b": b * (mlp_params * dtype_bytes) + sparse_grad,
        "dpsgd_r": b * max(i * o + o for i, o in layers) * dtype_bytes,  # one layer at a time
    }.get(mode, 0)
    widths = sum(i + o for i, o in layers)  # pre- and post-activation of every Linear
    n = cfg.num_tables + 1
    forward = b * (widths + n * d + n * n + cfg.interaction_width) * dtype_bytes
    captured = forward if mode != "sgd" else 0  # per-example clipping keeps backprops too
    parts = {
        "parameters": table_bytes(cfg, dtype_bytes) + mlp_params * dtype_bytes,
        "history_table": history,
        "velocity": velocity,
        "noise_buffer": noise,
        "gradients": mlp_params * dtype_bytes + sparse_grad + second_pass,
        "per_example_grads": per_example,
        "activations": forward + captured + looked_up * ID_BYTES,
    }
    return {
        **parts,
        "total": sum(parts.values()),
        "row_bytes": table_bytes(cfg, dtype_bytes) + history + velocity + second_pass,
        "config": cfg.name,
        "scale": cfg.scale,
        "mode": mode,
        "batch_size": batch_size,
        "pooling": cfg.pooling,
        "embedding_dim": d,
        "dtype_bytes": dtype_bytes,
        "momentum": momentum,
    }


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" means no limit


def meminfo_bytes(key: str) -> int | None:
    """A ``/proc/meminfo`` field in bytes (``"MemAvailable"``, ``"AnonHugePages"``), or None
    where there is none (not Linux, or no such field)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory_bytes() -> int:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup memory limit.

    Example: ``available_memory_bytes() > 0``.
    """
    available = meminfo_bytes("MemAvailable")
    candidates = [] if available is None else [available]
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            candidates.append(max(0, limit - usage))
    if not candidates:
        candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return min(candidates)


def _linear_scale(estimate: dict[str, Any], budget: float) -> float:
    # Everything but row_bytes is independent of the table rows, and row_bytes is proportional.
    fixed = estimate["total"] - estimate["row_bytes"]
    if budget <= fixed or estimate["row_bytes"] == 0:
        return 0.0
    return estimate["scale"] * (budget - fixed) / estimate["row_bytes"]


def largest_scale_that_fits(
    config_name: str,
    mode: str,
    batch_size: int,
    *,
    pooling: int | None = None,
    embedding_dim: int | None = None,
    dtype_bytes: int = 4,
    available_bytes: int | None = None,
    headroom: float = 0.85,
    momentum: bool = False,
) -> float:
    """Largest ``scale`` of a paper config whose estimate fits in ``headroom`` x available memory
    (0.0 when even the MLPs and activations alone do not fit).

    Example: ``largest_scale_that_fits("rmc1", "lazydp", 2048, available_bytes=10**10)`` is ~0.083.
    """
    available = available_memory_bytes() if available_bytes is None else available_bytes
    budget = headroom * available

    def total(scale: float) -> dict[str, Any]:
        cfg = paper_config(config_name, scale, pooling=pooling, embedding_dim=embedding_dim)
        return estimate_training_bytes(cfg, mode, batch_size, dtype_bytes, momentum)

    scale = _linear_scale(total(1.0), budget)
    # Rounding rows (and tables that stay at one row) can overshoot the linear answer slightly.
    while scale > 1e-12 and total(scale)["total"] > budget:
        scale *= 0.999
    return scale if scale > 1e-12 else 0.0


def _floor_sig(x: float, digits: int = 2) -> float:
    if x <= 0:
        return 0.0
    step = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return round(math.floor(x / step * (1 + 1e-12)) * step, 12)


def check_fits(
    estimate: dict[str, Any], headroom: float = 0.85, available_bytes: int | None = None
) -> None:
    """Raise ``ConfigError`` if ``estimate`` needs more than ``headroom`` x available memory.

    Example: ``check_fits(estimate_training_bytes(paper_config("rmc1", 1e-4), "sgd", 64))``.
    """
    if not 0 < headroom <= 1:
        raise ConfigError(f"headroom={headroom} must lie in (0, 1]")
    available = available_memory_bytes() if available_bytes is None else available_bytes
    budget = headroom * available
    if estimate["total"] <= budget:
        return
    if estimate["config"] in PAPER_CONFIGS:
        largest = largest_scale_that_fits(
            estimate["config"],
            estimate["mode"],
            estimate["batch_size"],
            pooling=estimate["pooling"],
            embedding_dim=estimate["embedding_dim"],
            dtype_bytes=estimate["dtype_bytes"],
            available_bytes=available,
            headroom=headroom,
            momentum=bool(estimate.get("momentum", False)),
        )
    else:
        largest = _linear_scale(estimate, budget)
    advice = (
        f"lower --scale to <= {_floor_sig(largest):g}"
        if _floor_sig(largest) > 0
        else "no scale fits; lower --batch-size or use a machine with more memory"
    )
    raise ConfigError(
        f"{estimate['config']} at scale {estimate['scale']:g} needs ~{estimate['total'] / 1e9:.1f} GB "
        f"for mode {estimate['mode']} (batch {estimate['batch_size']}) but only "
        f"{available / 1e9:.1f} GB is available ({headroom:.0%} usable); {advice}"
    )
