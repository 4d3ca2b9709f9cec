"""The latency-breakdown harness: time each training mode on one workload with the paper's protocol.

Contract:
* One step = forward (model + loss) -> backward (``loss.backward()``) -> update
  (``optimizer.step()`` then ``zero_grad``), on a fixed-size synthetic batch generated *outside*
  the timed region. Warm-up, then the mean (or ``spec.statistic``) of the last ``measure_last``
  of ``iterations`` steps; every step's total is kept in ``steps_ms``.
* ``BREAKDOWN_ROWS`` is the paper's layout, in milliseconds. The engine's phase timer
  (``PrivacyEngine.timer``) splits the measured walls:

  - forward = forward wall - lazy catch-up (LazyDP catches rows up at read time, inside the
    forward; the paper fuses that work into the previous update, so it counts as update);
  - backward (per-example) = the ``norms`` phase; backward (per-batch) = autograd backward +
    ``clipped_sum``;
  - update = everything else of the step, + lazy catch-up. It splits into coalesce, noise sampling
    (+ the catch-up's aggregated draw, so lazydp's row compares with dpsgd_f's per-step draws),
    noisy-gradient merge (the ``merge`` phase: adding the dense noise to the gradients),
    parameter update, lazy bookkeeping (history and lr prefix, + the rest of the catch-up; the
    whole catch-up is also shown on its own row, with its noise draw as a sub-row), and other
    (the untimed rest: ledger charge, capture bookkeeping, zero_grad).

  So forward + both backwards + update == total (the measured step wall), and the update rows sum
  to update; ``other`` is >= 0 up to timer resolution unless phases double count.
* ``run_mode(..., isolate=True)`` measures each mode in a fresh spawned process so that peak RSS
  (``VmHWM``, which starts afresh at exec, unlike ``ru_maxrss``) belongs to that mode alone;
  memory is checked against ``bench.memory``'s estimate *before* anything is allocated.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from lazydp._libc import libc_function
from lazydp.bench import memory, shared_tables
from lazydp.bench.workload import (
    BenchSpec,
    build_model,
    build_optimizers,
    clock_sync,
    dummy_loader,
    loss_of,
    make_batches,
    on_device,
)
from lazydp.errors import ConfigError, LazyDPError
from lazydp.malloc import tune_malloc
from lazydp.noise_pool import POOL_NUMEL
from lazydp.threads import OPENMP_ENV

BENCH_MODES = ("sgd", "dpsgd_b", "dpsgd_r", "dpsgd_f", "lazydp")
UPDATE_PARTS = (
    "update: coalesce",
    "update: noise sampling",
    "update: noisy-gradient merge",
    "update: parameter update",
    "update: lazy bookkeeping",
)
CATCH_UP_ROW = "update: lazy bookkeeping: catch-up at read"
# Part of the catch-up: the aggregated draw itself (the floor); the rest is its bookkeeping.
CATCH_UP_NOISE_ROW = "update: lazy bookkeeping: catch-up at read: noise draw"
BREAKDOWN_ROWS = (
    "forward",
    "backward (per-example)",
    "backward (per-batch)",
    "update",
    *UPDATE_PARTS,
    CATCH_UP_ROW,
    CATCH_UP_NOISE_ROW,
    "update: other",
    "total",
)
TOP_ROWS = BREAKDOWN_ROWS[:4]
# Engine phase -> breakdown row (catch-up and the backward phases are handled by hand).
_PHASE_ROW = {
    "coalesce": "update: coalesce",
    "noise": "update: noise sampling",
    "merge": "update: noisy-gradient merge",
    "param_update": "update: parameter update",
    "lazy_bookkeeping": "update: lazy bookkeeping",
}


@dataclass
class ModeResult:
    """One (workload, mode) measurement: breakdown in ms, memory in bytes, or why it did not run."""

    label: str
    mode: str
    status: str = "ok"  # ok | refused | failed
    message: str = ""
    breakdown_ms: dict[str, float] = field(default_factory=dict)
    steps_ms: list[float] = field(default_factory=list)  # total of every iteration (warm-up too)
    peak_rss_bytes: int = 0
    baseline_rss_bytes: int = 0  # RSS before the model was built (interpreter + torch)
    table_bytes: int = 0
    history_bytes: int = 0
    estimate: dict[str, Any] = field(default_factory=dict)
    isolated: bool = False
    spec: dict[str, Any] = field(default_factory=dict)
    timed_with: list[str] = field(default_factory=list)  # columns of its round robin (--interleave)
    tables_shared: bool = False  # its round robin shared one set of tables (shared_tables.py)

    @property
    def column(self) -> str:
        return f"{self.label} {self.mode}"

    @property
    def step_ms(self) -> float:
        return self.breakdown_ms.get("total", float("nan"))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "column": self.column}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModeResult:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def breakdown(
    mode: str, forward_s: float, backward_s: float, step_s: float, phases: dict[str, float]
) -> dict[str, float]:
    """Paper-layout rows (ms) of one step from its three walls and the engine's phase totals.

    Example: ``breakdown("sgd", 0.002, 0.003, 0.001, {})["total"] == 6.0``.
    """
    catch_up = phases.get("lazy_catch_up", 0.0)
    norms = phases.get("norms", 0.0)
    clipped = phases.get("clipped_sum", 0.0)
    total = forward_s + backward_s + step_s
    rows = {
        "forward": forward_s - catch_up,
        "backward (per-example)": norms,
        "backward (per-batch)": backward_s + clipped,
        "update": step_s - norms - clipped + catch_up,
    }
    parts = dict.fromkeys(UPDATE_PARTS, 0.0)
    for phase, row in _PHASE_ROW.items():
        parts[row] += phases.get(phase, 0.0)
    # The catch-up's draw is noise sampling (as dpsgd_f's per-step draws are), the rest of it
    # (grouping ids, history and prefix reads, the row write) lazy bookkeeping.
    catch_up_noise = phases.get("lazy_catch_up_noise", 0.0)
    parts["update: noise sampling"] += catch_up_noise
    parts["update: lazy bookkeeping"] += catch_up - catch_up_noise
    if mode == "sgd":  # no engine: the whole optimizer step is the parameter update
        parts["update: parameter update"] = rows["update"]
    rows.update(parts)
    rows[CATCH_UP_ROW] = catch_up
    rows[CATCH_UP_NOISE_ROW] = catch_up_noise  # nested in catch-up
    rows["update: other"] = rows["update"] - sum(parts.values())
    rows["total"] = total
    return {k: 1e3 * rows[k] for k in BREAKDOWN_ROWS}


def aggregate(steps: list[dict[str, float]], statistic: str = "mean") -> dict[str, float]:
    """One breakdown from per-step breakdowns: the row-wise mean, or the whole step whose
    ``total`` is the median (lower middle) or the minimum -- rows then still sum to the total.

    Example: ``aggregate([{"total": 1.0}, {"total": 3.0}])["total"] == 2.0``.
    """
    if statistic == "mean":
        return {k: sum(s[k] for s in steps) / len(steps) for k in steps[0]}
    ranked = sorted(steps, key=lambda s: s["total"])
    return dict(ranked[(len(ranked) - 1) // 2] if statistic == "median" else ranked[0])


def estimate_for(spec: BenchSpec, mode: str) -> dict[str, Any]:
    """bench.memory's estimate of the peak bytes of ``mode`` on ``spec`` (tables dropped if
    ``dense_only``)."""
    est = memory.estimate_training_bytes(
        spec.model_config, mode, spec.batch_size, momentum=spec.table_momentum > 0
    )
    if spec.dense_only:
        est = {**est, "total": est["total"] - est["row_bytes"], "row_bytes": 0}
    return est


def check_fits(spec: BenchSpec, mode: str) -> dict[str, Any]:
    """Raise ConfigError (naming mode, need, availability, largest scale) if it would not fit."""
    est = estimate_for(spec, mode)
    memory.check_fits(est)
    return est


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux: ``VmHWM`` of /proc/self/status, which starts afresh at exec. ``ru_maxrss`` does not:
    a spawned child inherits its parent's high-water mark, so a small mode measured after a
    large noise floor in the parent reported the parent's peak (941 MB instead of 774 MB).
    Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _private(model: torch.nn.Module, spec: BenchSpec, mode: str) -> tuple[Any, Any]:
    """(optimizer, engine) for ``mode``: plain SGD for ``sgd``, a PrivacyEngine otherwise."""
    opts = build_optimizers(model, spec.lr, spec.table_momentum)
    if mode == "sgd":
        return _Both(opts), None
    from lazydp.engine import PrivacyEngine

    engine = PrivacyEngine(seed=0)  # seeded: a benchmark, not a release
    _, opt, _ = engine.make_private(
        module=model,
        optimizer=opts,
        data_loader=dummy_loader(spec.batch_size),
        noise_multiplier=spec.noise_multiplier,
        max_grad_norm=spec.max_grad_norm,
        mode=mode,
    )
    engine.timer.enabled = True
    return opt, engine


class _Both:
    """Steps several plain optimizers as one (the sgd reference: tables and MLPs)."""

    def __init__(self, opts: list[torch.optim.Optimizer]) -> None:
        self.opts = opts

    def step(self) -> None:
        for o in self.opts:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)


class _ModeRunner:
    """One mode's model, optimizer and batch stream; ``step()`` times one step."""

    def __init__(
        self,
        spec: BenchSpec,
        mode: str,
        steps: int | None = None,
        tables_of: _ModeRunner | None = None,
        index: int = 0,
    ) -> None:
        """``tables_of``: a runner whose tables this one uses (shared_tables.py); ``index``:
        this runner's place in that round robin (it picks the batch seed)."""
        if mode not in BENCH_MODES:
            raise ConfigError(f"mode={mode!r} is unknown; choose from {', '.join(BENCH_MODES)}")
        self.spec, self.mode = spec, mode
        self.result = ModeResult(
            spec.label, mode, spec=spec.to_dict(), table_bytes=spec.table_bytes()
        )
        # A runner on another's tables allocates none: checked against the available memory
        # (now less those tables) it was refused. time_interleaved checked the shared sum.
        self.result.estimate = (
            check_fits(spec, mode) if tables_of is None else estimate_for(spec, mode)
        )
        self.result.baseline_rss_bytes = current_rss_bytes()
        if tables_of is None:
            self.model = build_model(spec, mode)
        else:
            self.model = shared_tables.model_on_tables_of(tables_of.model, spec, mode)
            spec = shared_tables.batch_seed(spec, index)
        self.opt, self.engine = _private(self.model, spec, mode)
        if mode == "lazydp":
            self.result.history_bytes = sum(
                t.history.applied.nbytes for t in self.opt.lazy.values()
            )
        self.batches = make_batches(spec, steps)  # default: spec.iterations
        self.rows: list[dict[str, float]] = []
        # On a GPU (placement "split") the clock is read after the queued kernels finish.
        self.device = spec.mlp_device
        self.sync = clock_sync(self.device)
        if self.engine is not None and self.device.type == "cuda":
            self.engine.timer.sync = self.sync

    def step(self, timed: bool = True) -> None:
        """One training step; ``timed=False`` runs it without recording (a warm-up)."""
        batch = on_device(next(self.batches), self.device)
        if self.engine is not None:
            self.engine.timer.reset()
        sync = self.sync
        sync()
        t0 = time.perf_counter()
        loss = loss_of(self.model, batch)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        phases = self.engine.timer.reset() if self.engine is not None else {}
        if not timed:
            return
        self.rows.append(breakdown(self.mode, t1 - t0, t2 - t1, t3 - t2, phases))
        self.result.steps_ms.append(self.rows[-1]["total"])

    def finish(self) -> ModeResult:
        self.result.breakdown_ms = aggregate(
            self.rows[-self.spec.measure_last :], self.spec.statistic
        )
        self.result.peak_rss_bytes = peak_rss_bytes()
        return self.result


def time_mode(
    spec: BenchSpec, mode: str, progress: Callable[[int], None] | None = None
) -> ModeResult:
    """Time ``mode`` on ``spec`` in this process (peak RSS then includes earlier work).

    Example: ``time_mode(BenchSpec("rmc1", 1e-5, 16, pooling=2, iterations=3, measure_last=2),
    "lazydp").breakdown_ms["total"] > 0``.
    """
    runner = _ModeRunner(spec, mode)
    for i in range(spec.iterations):
        runner.step()
        if progress is not None:
            progress(i + 1)
    return runner.finish()


# One round robin: the (workload, mode) pairs timed in turn in one process.
Pairs = list[tuple[BenchSpec, str]]


def _pairs_label(pairs: Pairs) -> str:
    return ", ".join(f"{spec.label} {mode}" for spec, mode in pairs)


def fits_alone(spec: BenchSpec, mode: str) -> bool:
    """Whether ``mode`` on ``spec`` fits in memory by itself (``check_fits`` without raising)."""
    try:
        check_fits(spec, mode)
    except ConfigError:
        return False
    return True


def memory_together(pairs: Pairs, shared: bool = False) -> str | None:
    """None if the models of all ``pairs`` fit in memory at once (``shared``: with one set of
    tables among them); else why not. Never raises: a sweep asks this of every round robin,
    and one point too large must not abort the sweep."""
    need = sum(estimate_for(spec, mode)["total"] for spec, mode in pairs)
    if shared:
        need -= sum(spec.table_bytes() for spec, _ in pairs[1:])
    available = memory.available_memory_bytes()
    if need <= 0.85 * available:
        return None
    return (
        f"the models of {_pairs_label(pairs)} need ~{need / 1e9:.1f} GB together, and "
        f"{available / 1e9:.1f} GB is available (85% usable)"
    )


def check_fits_together(pairs: Pairs, shared: bool = False) -> None:
    """ConfigError unless the models of all ``pairs`` fit in memory at once (--interleave)."""
    reason = memory_together(pairs, shared)
    if reason is not None:
        raise ConfigError(
            f"--interleave keeps every model in memory at once: {reason}; drop --interleave "
            "(one process per mode) or lower --scale"
        )


def time_interleaved(pairs: Pairs, shared: bool = False) -> list[ModeResult]:
    """Time every (workload, mode) of ``pairs`` in this process, one step of each in turn.

    On a shared machine, bursts of other work then hit every pair alike, so ratios between
    them -- modes of one workload, or one mode at two table sizes -- are far steadier than from
    back-to-back runs. Each timed step follows an untimed step of the same pair, as in real
    training: otherwise the mode after ``dpsgd_f`` (which streams every table) pays for the
    caches it left cold (measured: lazydp +30% on ``basic``). All models live at once (memory
    is checked for their sum) and peak RSS is the process's, so it is not reported per pair.
    Every result names the others in ``timed_with``. ``shared``: the later pairs use the first
    pair's tables (one workload only; see shared_tables.py).
    Example: ``[r.mode for r in time_interleaved([(spec, "sgd"), (spec, "lazydp")])]``.
    """
    if shared and not shared_tables.can_share([spec for spec, _ in pairs]):
        raise ConfigError(
            f"{_pairs_label(pairs)}: only modes of one workload with uniform locality can "
            "share tables (shared_tables.py); time them without shared=True"
        )
    check_fits_together(pairs, shared)
    iterations = max(spec.iterations for spec, _ in pairs)
    runners: list[_ModeRunner] = []
    for i, (spec, m) in enumerate(pairs):
        source = runners[0] if shared and runners else None
        runners.append(_ModeRunner(spec, m, steps=2 * iterations, tables_of=source, index=i))
    for i in range(iterations):
        for runner in runners:
            if i < runner.spec.iterations:
                runner.step(timed=False)
                runner.step()
    results = [r.finish() for r in runners]
    for r in results:
        r.peak_rss_bytes = 0  # shared by every pair: meaningless per pair
        r.timed_with = [o.column for o in results if o is not r]
        r.tables_shared = shared
    return results


def run_isolated(kind: str, spec: BenchSpec, mode: str) -> ModeResult:
    """Measure in a fresh interpreter (own peak RSS): ``kind`` "mode" runs ``time_mode``,
    "opacus" runs ``opacus_compare.time_opacus``; with this process's torch thread count.

    A child killed by the OS (e.g. out of memory) raises RuntimeError naming its exit status.
    Example: ``run_isolated("mode", spec, "lazydp").isolated is True``.
    """
    return ModeResult.from_dict(_run_child(kind, spec, mode))


def run_interleaved_isolated(pairs: Pairs, shared: bool = False) -> list[ModeResult]:
    """``time_interleaved`` in a fresh interpreter: a workload of a sweep then never runs in
    a heap the previous workloads' models fragmented (measured: lazydp on ``basic`` after the
    ``mlperf`` workloads of the same process, 20-40% slower parameter updates and norms)."""
    specs = json.dumps([spec.to_dict() for spec, _ in pairs])
    return [
        ModeResult.from_dict(d)
        for d in _run_child(
            _SHARED if shared else "interleaved", specs, ",".join(m for _, m in pairs)
        )
    ]


def _run_child(kind: str, spec: BenchSpec | str, mode: str) -> Any:
    """Run ``kind`` in a fresh interpreter; ``spec`` is a spec or (interleaved) a JSON list."""
    spec_json = spec if isinstance(spec, str) else json.dumps(spec.to_dict())
    with tempfile.TemporaryDirectory(prefix="lazydp-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "lazydp.bench.harness", kind, spec_json,
               mode, str(out), str(torch.get_num_threads())]  # fmt: skip
        env = {**openmp_env(specs_of(spec_json)), **os.environ}  # the caller's setting wins
        env[_PARENT_ENV] = str(os.getpid())  # _die_with_parent: did we die before it ran?
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, check=False, env=env)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"the {kind} {mode!r} child process exited with status {proc.returncode}"
                + (" (killed: out of memory?)" if proc.returncode in (-9, 137) else "")
            )
        return json.loads(out.read_text())


def specs_of(spec_json: str) -> list[BenchSpec]:
    """The specs a child times: one spec's JSON, or (interleaved) a JSON list of them."""
    data = json.loads(spec_json)
    return [BenchSpec(**d) for d in (data if isinstance(data, list) else [data])]


def openmp_env(specs: list[BenchSpec]) -> dict[str, str]:
    """The OpenMP settings a child timing ``specs`` runs under, every mode alike:
    ``OPENMP_ENV`` (a short spin) when a step's catch-up draws half a noise-pool refill or
    more (lazydp/threads.py: the refills' threads would share a core with a spinning OpenMP
    worker), libgomp's default otherwise (rare refills: the spin spares every small torch op
    a wake-up). Measured, lazydp / sgd with the short spin against without: rmc1 at 1M rows,
    pooling 1 (655k values a step) 1.32-1.55 against 1.27-1.39; pooling 20 (13M) 1.62-1.72
    against 1.69-1.91; basic (3.4M) 1.21-1.26 against 1.24-1.28 (benchmarks/RESULTS.md,
    twenty-second session)."""
    if max((s.catch_up_values() for s in specs), default=0) >= POOL_NUMEL // 2:
        return dict(OPENMP_ENV)
    return {}


def _die_with_parent() -> None:
    """Linux: have the kernel kill this child when its parent dies. A parent killed hard
    (SIGKILL, out of memory) cannot stop it, and it ran on, orphaned, to the end of its mode:
    minutes, possibly with a machine-filling model."""
    prctl = libc_function("prctl", [ctypes.c_int, ctypes.c_ulong], ctypes.c_int)
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        # The parent may have died while this child imported torch (seconds), before the call:
        # nothing would signal it now. The parent gave its pid; we were reparented if it differs.
        parent = os.environ.get(_PARENT_ENV, "")
        if parent.isdigit() and os.getppid() != int(parent):
            sys.exit(1)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_SHARED = "interleaved-shared"  # the child kind of a round robin on shared tables
_PARENT_ENV = "LAZYDP_BENCH_PARENT"


def _child_main(argv: list[str]) -> None:
    _die_with_parent()
    kind, spec_json, mode, out, threads = argv
    tune_malloc()  # as the parent command did (lazydp/malloc.py)
    torch.set_num_threads(int(threads))
    if kind in ("interleaved", _SHARED):
        specs = specs_of(spec_json)
        pairs = list(zip(specs, mode.split(","), strict=True))
        results = time_interleaved(pairs, shared=kind == _SHARED)
        for r in results:
            r.isolated = True
        Path(out).write_text(json.dumps([r.to_dict() for r in results]))
        return
    spec = BenchSpec(**json.loads(spec_json))
    if kind == "opacus":
        from lazydp.bench.opacus_compare import time_opacus

        result = time_opacus(spec, mode)
    else:
        result = time_mode(spec, mode)
    result.isolated = True
    Path(out).write_text(json.dumps(result.to_dict()))


def run_mode(spec: BenchSpec, mode: str, *, isolate: bool = True) -> ModeResult:
    """Time one mode; ``isolate`` runs it in a fresh spawned process (own peak RSS).

    Never raises for a mode that does not fit or fails: the result says ``refused``/``failed``
    and why, so a sweep goes on.
    """
    try:
        est = check_fits(spec, mode)
    except ConfigError as exc:
        return ModeResult(spec.label, mode, "refused", str(exc), spec=spec.to_dict())
    try:
        return run_isolated("mode", spec, mode) if isolate else time_mode(spec, mode)
    except (LazyDPError, RuntimeError, MemoryError, OSError) as exc:
        # BrokenProcessPool (an OS kill) is a RuntimeError: report it, keep the sweep going.
        msg = f"{type(exc).__name__}: {exc}"
        return ModeResult(spec.label, mode, "failed", msg, spec=spec.to_dict(), estimate=est)


if __name__ == "__main__":  # the isolated child of run_isolated
    try:
        _child_main(sys.argv[1:])
    except KeyboardInterrupt:
        # Ctrl-C reaches the whole process group: the parent says it stopped; a traceback
        # from deep inside torch here would only bury that.
        sys.exit(130)
