"""Side by side with Opacus: the same model, batches and optimizer under Opacus's DP-SGD.

Contract:
* Optional: Opacus comes with ``pip install lazydp[bench]``. Without it (or if it fails), every
  entry point returns a result whose ``status`` says so; nothing else in the harness breaks.
* Two Opacus modes: ``hooks`` (materialised per-sample gradients) and ``ghost`` (ghost clipping,
  which needs its wrapped criterion and a second backward). Both get the DLRM with
  ``sparse=False`` bags (Opacus has no sparse-gradient path) and one torch.optim.SGD over all
  parameters, ``poisson_sampling=False`` with fixed-size batches (as our modes get), and are fed
  exactly the batches the lazydp modes see.
* Opacus accepts ``nn.EmbeddingBag`` only when called as ``bag(ids_1d, offsets)``: its per-sample
  sampler unpacks ``(index, offset)`` from the layer's inputs and takes the batch size from
  ``len(offsets)``; the 2-D ``(B, L)`` form fails. Our DLRM passes the ``(ids, offsets)`` pair
  positionally, so it works. EmbeddingBag has no ghost-norm sampler in Opacus, so ghost mode
  also materialises a (batch, rows, dim) per-sample gradient, one table at a time; hooks mode
  keeps all of them until the step. ``opacus_estimate_bytes`` sizes that, and a run that would
  not fit is refused before anything is allocated.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
from torch import nn

from lazydp.bench import memory
from lazydp.bench.harness import (
    ModeResult,
    aggregate,
    current_rss_bytes,
    peak_rss_bytes,
    run_isolated,
)
from lazydp.bench.workload import BenchSpec, build_model, clock_sync, make_batches, on_device
from lazydp.errors import ConfigError

OPACUS_MODES = ("hooks", "ghost")
# Opacus does per-example and per-batch work inside one backward: one row, not the paper's two.
OPACUS_BACKWARD_ROW = "backward (per-example + per-batch, Opacus)"
HEADROOM = 0.85  # as bench.memory.check_fits: leave room for the OS and other processes


def opacus_version() -> str | None:
    """Installed Opacus version, or None."""
    try:
        import opacus
    except Exception:  # ImportError, or a broken install raising anything at import
        return None
    return str(opacus.__version__)


def opacus_estimate_bytes(spec: BenchSpec, grad_sample_mode: str) -> int:
    """Peak bytes Opacus needs on ``spec``: the model, its gradient, and per-sample gradients
    (all parameters at once in ``hooks``; the largest one at a time in ``ghost``).

    Example: ``opacus_estimate_bytes(BenchSpec("small8", 1.0, 256), "hooks") > 13e9``.
    """
    model = build_model(spec, "dpsgd_f", sparse=False) if spec.table_bytes() < 2**26 else None
    if model is not None:
        sizes = [p.numel() for p in model.parameters()]
    else:  # don't allocate a big model just to count it
        cfg = spec.model_config
        sizes = [r * cfg.embedding_dim for r in cfg.table_rows] + [cfg.mlp_parameter_count()]
    params = sum(sizes) * 4
    per_sample = spec.batch_size * 4 * (sum(sizes) if grad_sample_mode == "hooks" else max(sizes))
    return 2 * params + per_sample


def _opacus_step_fn(spec: BenchSpec, grad_sample_mode: str) -> tuple[nn.Module, Any]:
    from opacus import PrivacyEngine as OpacusEngine

    from lazydp.bench.workload import dummy_loader

    model = build_model(spec, "dpsgd_f", sparse=False)
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr)
    criterion = nn.BCEWithLogitsLoss()
    engine = OpacusEngine(accountant="rdp")
    kwargs: dict[str, Any] = {
        "module": model,
        "optimizer": opt,
        "data_loader": dummy_loader(spec.batch_size),
        "noise_multiplier": spec.noise_multiplier,
        "max_grad_norm": spec.max_grad_norm,
        "poisson_sampling": False,
        "grad_sample_mode": grad_sample_mode,
    }
    if grad_sample_mode == "ghost":
        model, opt, criterion, _ = engine.make_private(criterion=criterion, **kwargs)
    else:
        model, opt, _ = engine.make_private(**kwargs)
    return model, (opt, criterion)


def time_opacus(spec: BenchSpec, grad_sample_mode: str) -> ModeResult:
    """Time Opacus in ``grad_sample_mode`` on ``spec`` (in this process); never raises for a
    missing or failing Opacus -- the result's status/message say what happened.

    Rows: forward, backward (Opacus computes per-sample gradients or norms inside it), update,
    total (ms), mean of the last ``spec.measure_last`` of ``spec.iterations`` steps.
    """
    mode = f"opacus_{grad_sample_mode}"
    result = ModeResult(spec.label, mode, spec=spec.to_dict(), table_bytes=spec.table_bytes())
    if grad_sample_mode not in OPACUS_MODES:
        raise ConfigError(f"grad_sample_mode={grad_sample_mode!r}; use one of {OPACUS_MODES}")
    if opacus_version() is None:
        result.status, result.message = (
            "failed",
            "Opacus is not installed: pip install lazydp[bench]",
        )
        return result
    need = opacus_estimate_bytes(spec, grad_sample_mode)
    result.estimate = {"total": need}
    available = memory.available_memory_bytes()
    if need > HEADROOM * available:
        result.status = "refused"
        result.message = (
            f"Opacus {grad_sample_mode} on {spec.label} materialises per-sample gradients "
            f"(batch x rows x dim per table) and needs ~{need / 1e9:.1f} GB, but only "
            f"{available / 1e9:.1f} GB is available ({HEADROOM:.0%} usable); lower --scale or "
            "--batch-size for the comparison"
        )
        return result
    result.baseline_rss_bytes = current_rss_bytes()
    try:
        # Opacus warns about its insecure RNG and full backward hooks on every step: known, noise.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(opacus|torch)\b.*")
        warnings.filterwarnings("ignore", message=".*(Secure RNG|Full backward hook).*")
        model, (opt, criterion) = _opacus_step_fn(spec, grad_sample_mode)
        rows = []
        # placement "split": the dense inputs on the GPU, and the clock waits for it
        sync = clock_sync(spec.mlp_device)
        for batch in make_batches(spec):
            dense, sparse, label = on_device(batch, spec.mlp_device)
            sync()
            t0 = time.perf_counter()
            loss = criterion(model(dense, sparse), label)
            sync()
            t1 = time.perf_counter()
            loss.backward()
            sync()
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            t3 = time.perf_counter()
            ms = [1e3 * t for t in (t1 - t0, t2 - t1, t3 - t2, t3 - t0)]
            rows.append(dict(zip(("forward", OPACUS_BACKWARD_ROW, "update", "total"), ms)))
            result.steps_ms.append(ms[-1])
    except Exception as exc:  # Opacus is third-party code: report any failure, keep going
        result.status, result.message = (
            "failed",
            f"Opacus {grad_sample_mode}: {type(exc).__name__}: {exc}",
        )
        return result
    result.breakdown_ms = aggregate(rows[-spec.measure_last :], spec.statistic)
    result.peak_rss_bytes = peak_rss_bytes()
    return result


def speedups(results: list[ModeResult]) -> list[dict[str, Any]]:
    """Opacus step time / lazydp step time (and / dpsgd_f), per workload and Opacus mode.

    Example: ``speedups([])`` is ``[]``.
    """
    out = []
    ok = [r for r in results if r.status == "ok"]
    for r in ok:
        if not r.mode.startswith("opacus_"):
            continue
        row: dict[str, Any] = {"label": r.label, "opacus_mode": r.mode, "opacus_ms": r.step_ms}
        for ours in ok:
            if ours.label == r.label and ours.mode in ("lazydp", "dpsgd_f", "sgd"):
                row[f"opacus_over_{ours.mode}"] = r.step_ms / ours.step_ms
        out.append(row)
    return out


def run_opacus(spec: BenchSpec, grad_sample_mode: str, *, isolate: bool = True) -> ModeResult:
    """``time_opacus``, by default in a fresh process (its peak RSS is its own)."""
    if not isolate:
        return time_opacus(spec, grad_sample_mode)
    try:
        return run_isolated("opacus", spec, grad_sample_mode)
    except Exception as exc:  # e.g. the child was killed
        return ModeResult(
            spec.label, f"opacus_{grad_sample_mode}", "failed", f"{type(exc).__name__}: {exc}"
        )
