"""The benchmark harness: breakdown arithmetic, timing runs, refusals, noise floor, Opacus."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lazydp.bench.floor import measure_noise_floor, unique_rows
from lazydp.bench.harness import (
    BREAKDOWN_ROWS,
    CATCH_UP_NOISE_ROW,
    CATCH_UP_ROW,
    TOP_ROWS,
    UPDATE_PARTS,
    _ModeRunner,
    aggregate,
    breakdown,
    run_mode,
    time_interleaved,
    time_mode,
)
from lazydp.bench.opacus_compare import opacus_version, speedups, time_opacus
from lazydp.bench.workload import BenchSpec, build_model, make_batches
from lazydp.errors import ConfigError

TINY = BenchSpec("rmc1", scale=1e-5, batch_size=16, pooling=3, iterations=3, measure_last=2)


def _update_sum(rows: dict[str, float]) -> float:
    return sum(rows[r] for r in UPDATE_PARTS) + rows["update: other"]


def test_breakdown_moves_catch_up_from_forward_to_update_and_sums_to_total():
    phases = {
        "norms": 0.010,
        "clipped_sum": 0.020,
        "coalesce": 0.001,
        "noise": 0.004,
        "param_update": 0.003,
        "lazy_bookkeeping": 0.002,
        "lazy_catch_up": 0.005,
        "lazy_catch_up_noise": 0.001,  # nested inside lazy_catch_up: never added twice
    }
    rows = breakdown("lazydp", forward_s=0.030, backward_s=0.040, step_s=0.050, phases=phases)
    assert list(rows) == list(BREAKDOWN_ROWS)
    assert rows["forward"] == pytest.approx(25.0)  # 30 ms wall - 5 ms catch-up
    assert rows["backward (per-example)"] == pytest.approx(10.0)
    assert rows["backward (per-batch)"] == pytest.approx(60.0)  # 40 autograd + 20 clipped sum
    assert rows["update"] == pytest.approx(50 - 10 - 20 + 5)
    # the catch-up's 1 ms draw is noise sampling, its other 4 ms lazy bookkeeping
    assert rows["update: noise sampling"] == pytest.approx(5.0)
    assert rows["update: lazy bookkeeping"] == pytest.approx(6.0)
    assert rows[CATCH_UP_ROW] == pytest.approx(5.0)
    assert rows[CATCH_UP_NOISE_ROW] == pytest.approx(1.0)
    assert rows["update: other"] == pytest.approx(25 - 1 - 5 - 3 - 6)
    assert sum(rows[r] for r in TOP_ROWS) == pytest.approx(rows["total"]) == pytest.approx(120.0)
    assert _update_sum(rows) == pytest.approx(rows["update"])


def test_breakdown_of_sgd_puts_the_optimizer_step_in_parameter_update():
    rows = breakdown("sgd", 0.002, 0.003, 0.001, {})
    assert rows["total"] == pytest.approx(6.0)
    assert rows["update: parameter update"] == pytest.approx(1.0)
    assert rows["update: other"] == pytest.approx(0.0)


def test_aggregate_mean_and_whole_step_statistics():
    steps = [{"a": 1.0, "total": 5.0}, {"a": 3.0, "total": 1.0}, {"a": 2.0, "total": 3.0}]
    assert aggregate(steps, "mean") == {"a": 2.0, "total": 3.0}
    assert aggregate(steps, "median") == {"a": 2.0, "total": 3.0}
    assert aggregate(steps, "min") == {"a": 3.0, "total": 1.0}  # the whole fastest step


@pytest.mark.parametrize("mode", ["sgd", "dpsgd_f", "lazydp"])
def test_time_mode_breakdown_is_consistent(mode):
    r = time_mode(TINY, mode)
    rows = r.breakdown_ms
    assert r.status == "ok" and len(r.steps_ms) == TINY.iterations
    assert sum(rows[k] for k in TOP_ROWS) == pytest.approx(rows["total"], rel=1e-9)
    assert _update_sum(rows) == pytest.approx(rows["update"], rel=1e-9)
    # Phases are nested inside the walls they are subtracted from: nothing is counted twice.
    assert rows["update: other"] >= -0.05 and rows["forward"] > 0
    assert rows["total"] == pytest.approx(sum(r.steps_ms[-2:]) / 2)
    if mode == "sgd":
        assert rows["update: noise sampling"] == 0 and rows["backward (per-example)"] == 0
    else:
        assert rows["update: noise sampling"] > 0 and rows["backward (per-example)"] > 0
    assert (rows[CATCH_UP_ROW] > 0) == (mode == "lazydp")
    assert 0 <= rows[CATCH_UP_NOISE_ROW] <= rows[CATCH_UP_ROW]
    # lazydp's history table: one int32 per row of every table.
    expected_history = 4 * TINY.model_config.total_rows if mode == "lazydp" else 0
    assert r.history_bytes == expected_history
    assert r.table_bytes == TINY.model_config.total_rows * TINY.model_config.embedding_dim * 4


def test_interleaved_returns_every_mode_with_a_full_breakdown():
    results = time_interleaved([(TINY, "sgd"), (TINY, "lazydp")])
    assert [r.mode for r in results] == ["sgd", "lazydp"]
    for r in results:
        assert len(r.steps_ms) == TINY.iterations and r.peak_rss_bytes == 0
        assert r.breakdown_ms["total"] == pytest.approx(sum(r.steps_ms[-2:]) / 2)
    assert results[0].timed_with == [results[1].column]


def test_mlp_only_model_has_no_tables_and_times():
    spec = BenchSpec(
        "mlperf", scale=1e-6, batch_size=8, iterations=2, measure_last=1, dense_only=True
    )
    model = build_model(spec, "dpsgd_f")
    assert not any(isinstance(m, torch.nn.EmbeddingBag) for m in model.modules())
    assert spec.table_bytes() == 0 and "mlp-only" in spec.label
    r = time_mode(spec, "dpsgd_f")
    assert r.breakdown_ms["total"] > 0 and r.breakdown_ms[CATCH_UP_ROW] == 0


def test_memory_refusal_before_allocating():
    huge = BenchSpec("mlperf", scale=50.0, batch_size=2048, iterations=1, measure_last=1)
    with pytest.raises(ConfigError, match=r"mlperf at scale 50 needs .* lower --scale"):
        time_mode(huge, "lazydp")
    r = run_mode(huge, "dpsgd_f", isolate=False)
    assert r.status == "refused" and "GB" in r.message and not r.breakdown_ms


def test_spec_validation_names_the_argument():
    with pytest.raises(ConfigError, match="measure_last=10 exceeds iterations=5"):
        BenchSpec(iterations=5, measure_last=10)
    with pytest.raises(ConfigError, match="scale"):
        BenchSpec(scale=-1.0)
    with pytest.raises(ConfigError, match="statistic"):
        BenchSpec(statistic="max")


def test_noise_floor_counts_distinct_rows_of_the_same_batches():
    assert (
        unique_rows([(torch.tensor([4, 4, 1]), torch.tensor([0])), (torch.tensor([2]), None)]) == 3
    )
    floor = measure_noise_floor(TINY)
    batches = list(make_batches(TINY))[-TINY.measure_last :]
    expected = sum(unique_rows(s) for _, s, _ in batches) / len(batches)
    assert floor.unique_rows == pytest.approx(expected)
    assert floor.elements == pytest.approx(expected * TINY.model_config.embedding_dim)
    assert floor.floor_ms > 0 and math.isfinite(floor.samples_per_s)
    # table momentum: the velocity owes noise too (two Gaussians per element of a row read)
    with_momentum = measure_noise_floor(dataclasses.replace(TINY, table_momentum=0.9))
    assert with_momentum.elements == pytest.approx(2 * floor.elements)


@pytest.mark.skipif(opacus_version() is None, reason="Opacus not installed (lazydp[bench])")
@pytest.mark.parametrize("gsm", ["hooks", "ghost"])
def test_opacus_runs_on_the_same_workload(gsm):
    spec = BenchSpec("small8", scale=1e-3, batch_size=8, iterations=2, measure_last=1)
    r = time_opacus(spec, gsm)
    assert r.status == "ok", r.message
    assert r.mode == f"opacus_{gsm}" and r.breakdown_ms["total"] == pytest.approx(r.steps_ms[-1])
    ours = time_mode(spec, "lazydp")
    (row,) = speedups([r, ours])
    assert row["opacus_over_lazydp"] == pytest.approx(r.step_ms / ours.step_ms)


def test_opacus_refuses_what_would_not_fit():
    spec = BenchSpec("mlperf", scale=0.01, batch_size=2048, iterations=1, measure_last=1)
    r = time_opacus(spec, "hooks")
    assert r.status in ("refused", "failed")  # failed only when Opacus is absent
    if opacus_version() is not None:
        assert "per-sample gradients" in r.message and "GB" in r.message


def test_child_processes_get_the_openmp_spin_setting_unless_the_caller_has_one(monkeypatch):
    """A short spin only for workloads whose catch-up draws half a noise-pool refill a step or
    more (harness.openmp_env); the caller's own setting always wins."""
    from lazydp.bench import harness

    seen: list[dict[str, str]] = []

    def fake_run(cmd, **kwargs):
        seen.append(kwargs["env"])
        Path(cmd[-2]).write_text("[]")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(harness.subprocess, "run", fake_run)
    many = BenchSpec("rmc1", 1e-3, 2048, pooling=20, iterations=2, measure_last=1)  # 13M
    few = BenchSpec("rmc1", 1e-3, 2048, pooling=1, iterations=2, measure_last=1)  # 655k
    assert many.catch_up_values() == 10 * 2048 * 20 * 32
    assert few.catch_up_values() == 10 * 2048 * 32
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    harness.run_interleaved_isolated([(many, "sgd")])
    harness.run_interleaved_isolated([(few, "sgd"), (few, "lazydp")])
    harness.run_interleaved_isolated([(few, "sgd"), (many, "lazydp")])  # the larger decides
    monkeypatch.setenv("GOMP_SPINCOUNT", "7")
    harness.run_interleaved_isolated([(many, "sgd")])
    assert [env.get("GOMP_SPINCOUNT") for env in seen] == ["1000", None, "1000", "7"]
    # Tables smaller than a batch's reads cap them; a model without tables draws nothing.
    tiny = BenchSpec("rmc1", 1e-6, 2048, pooling=20, iterations=2, measure_last=1)
    assert tiny.catch_up_values() == sum(tiny.model_config.table_rows) * 32
    assert BenchSpec("rmc1", 1e-3, 64, dense_only=True).catch_up_values() == 0


def test_suite_interleaves_a_subset_of_modes_and_isolates_the_rest():
    from lazydp.bench import suite as suite_module

    suite = suite_module.run_suite(
        [TINY], ["sgd", "dpsgd_f", "lazydp"], isolate=False, interleave=["lazydp", "sgd"],
        progress=False,
    )  # fmt: skip
    assert [r.mode for r in suite.results] == ["sgd", "dpsgd_f", "lazydp"]
    assert all(r.status == "ok" for r in suite.results)
    peaks = {r.mode: r.peak_rss_bytes for r in suite.results}
    assert peaks["sgd"] == peaks["lazydp"] == 0  # timed together: no per-mode peak
    assert peaks["dpsgd_f"] > 0  # timed alone
    with pytest.raises(ConfigError, match="not among the modes"):
        suite_module.run_suite([TINY], ["sgd", "lazydp"], interleave=["dpsgd_f"], progress=False)


def test_suite_times_a_group_that_does_not_fit_together_one_mode_at_a_time(monkeypatch):
    from lazydp.bench import suite as suite_module

    monkeypatch.setattr(
        suite_module, "memory_together", lambda pairs, shared=False: "~99 GB for both"
    )
    suite = suite_module.run_suite(
        [TINY], ["sgd", "lazydp"], isolate=False, interleave=True, progress=False
    )
    assert [r.status for r in suite.results] == ["ok", "ok"]
    assert all(r.peak_rss_bytes > 0 for r in suite.results)  # each timed on its own
    assert any("99 GB" in n and "its own process" in n for n in suite.notes)


def test_suite_interleaves_on_shared_tables_where_only_one_set_fits(monkeypatch):
    from lazydp.bench import suite as suite_module

    def together(pairs, shared=False):
        return None if shared else "~20 GB for both"

    monkeypatch.setattr(suite_module, "memory_together", together)
    suite = suite_module.run_suite(
        [TINY], ["sgd", "lazydp"], isolate=False, interleave=True, progress=False
    )
    assert [r.status for r in suite.results] == ["ok", "ok"]
    assert all(r.tables_shared and r.timed_with for r in suite.results)
    assert any("shared one set of tables" in n for n in suite.notes)
    assert not any("its own process" in n for n in suite.notes)
    # A round robin across table sizes cannot share: it falls back to one process per mode.
    monkeypatch.setattr(suite_module, "memory_together", lambda pairs, shared=False: "too big")
    large = replace(TINY, scale=3e-5)
    suite = suite_module.run_suite(
        [large, TINY], ["lazydp"], isolate=False, interleave_scales=True, progress=False
    )
    assert not any(r.tables_shared for r in suite.results)


def test_shared_tables_are_the_first_models_own_and_batches_differ(monkeypatch):
    from lazydp.bench import harness, shared_tables

    first = _ModeRunner(TINY, "sgd")

    def refuse(spec, mode):  # the memory left once the first model holds the tables
        raise ConfigError(f"no room for a second {mode} model")

    monkeypatch.setattr(harness, "check_fits", refuse)
    # It allocates no tables: it must not be measured against memory as if it did (10M rows:
    # "needs ~13.2 GB but only 11.2 GB is available", the first model holding the 12.8 GB).
    second = _ModeRunner(TINY, "lazydp", tables_of=first, index=1)
    monkeypatch.undo()
    bags = [
        [m for m in r.model.modules() if isinstance(m, torch.nn.EmbeddingBag)]
        for r in (first, second)
    ]
    assert bags[0] and all(a.weight is b.weight for a, b in zip(*bags, strict=True))
    assert all(b.num_embeddings == b.weight.shape[0] for b in bags[1])
    # Own MLPs, own batches: the same ids would find the rows the other mode left in the cache.
    assert first.model.top is not second.model.top
    ids = [next(r.batches)[1] for r in (first, second)]
    assert not torch.equal(ids[0][0][0], ids[1][0][0])
    for _ in range(2):  # both step on the one set of tables
        first.step()
        second.step()
    assert all(math.isfinite(r.finish().step_ms) for r in (first, second))
    assert shared_tables.can_share([TINY, TINY]) and not shared_tables.can_share(
        [TINY, replace(TINY, scale=3e-5)]
    )
    results = time_interleaved([(TINY, "sgd"), (TINY, "lazydp")], shared=True)
    assert all(r.tables_shared and r.status == "ok" for r in results)
    with pytest.raises(ConfigError, match="one workload"):
        time_interleaved([(TINY, "sgd"), (replace(TINY, scale=3e-5), "sgd")], shared=True)


def test_two_private_modes_share_tables_in_a_round_robin():
    # Each engine's capture hooks the shared Parameter: the second engine took the first's
    # hook for a user's gradient hook and refused make_private (and the first its steps).
    results = time_interleaved([(TINY, "lazydp"), (TINY, "dpsgd_f")], shared=True)
    assert [(r.mode, r.status, r.tables_shared) for r in results] == [
        ("lazydp", "ok", True),
        ("dpsgd_f", "ok", True),
    ]


def test_a_round_robin_with_skewed_locality_does_not_share_tables():
    # The hot rows of a zipf layout do not move with the batch seed: on shared tables a mode
    # found most of its rows in the cache where the other mode had just read them.
    from lazydp.bench import shared_tables

    skewed = replace(TINY, locality="zipf:1.1")
    assert not shared_tables.can_share([skewed, skewed])
    with pytest.raises(ConfigError, match="uniform locality"):
        time_interleaved([(skewed, "sgd"), (skewed, "lazydp")], shared=True)


def test_suite_times_each_mode_across_scales_in_one_round_robin_and_reports_growth():
    from lazydp.bench import suite as suite_module

    small, large = replace(TINY, scale=1e-5), replace(TINY, scale=3e-5)
    suite = suite_module.run_suite(
        [large, small], ["sgd", "lazydp"], isolate=False, interleave_scales=True, progress=False
    )
    assert all(r.status == "ok" for r in suite.results)
    by = {r.column: r for r in suite.results}
    # Each mode's two sizes were timed together, and never with the other mode.
    assert by[f"{small.label} lazydp"].timed_with == [f"{large.label} lazydp"]
    assert by[f"{large.label} sgd"].timed_with == [f"{small.label} sgd"]
    growth = suite_module.summarise(suite)["growth"]
    assert [(g["mode"], g["from"], g["to"], g["side_by_side"]) for g in growth] == [
        ("sgd", small.label, large.label, True),
        ("lazydp", small.label, large.label, True),
    ]
    g = growth[1]
    assert g["growth"] == pytest.approx(g["to_ms"] / g["from_ms"] - 1)
    assert g["to_ms"] == by[f"{large.label} lazydp"].step_ms
    with pytest.raises(ConfigError, match="not both"):
        suite_module.run_suite(
            [small, large], ["sgd", "lazydp"], interleave=True, interleave_scales=True,
            progress=False,
        )  # fmt: skip


def test_growth_of_modes_timed_apart_says_so():
    from lazydp.bench import suite as suite_module

    small, large = replace(TINY, scale=1e-5), replace(TINY, scale=3e-5)
    suite = suite_module.run_suite([small, large], ["sgd"], isolate=False, progress=False)
    (g,) = suite_module.summarise(suite)["growth"]
    assert g["side_by_side"] is False and g["mode"] == "sgd"


def test_scale_groups_put_together_only_specs_that_differ_in_scale():
    from lazydp.bench.suite import scale_groups

    a, b = replace(TINY, scale=3e-5), replace(TINY, scale=1e-5)
    other = replace(TINY, pooling=5)
    groups = scale_groups([a, other, b])
    assert groups == [[b, a], [other]]


# --- audit fixes: sweeps keyed by spec, interleaving with a point too large, floor, validation ---


@pytest.mark.parametrize("interleave", [False, True])
def test_suite_keeps_points_that_share_a_label_apart(interleave):
    """iterations is not in the label: the second point must be timed, not the first reused."""
    from lazydp.bench import suite as suite_module

    longer = replace(TINY, iterations=4)
    assert longer.label == TINY.label
    suite = suite_module.run_suite(
        [TINY, longer], ["sgd", "lazydp"], isolate=False, interleave=interleave, progress=False
    )
    assert [len(r.steps_ms) for r in suite.results] == [3, 3, 4, 4]
    assert [r.label for r in suite.results[::2]] == [
        f"{TINY.label} iterations=3",
        f"{TINY.label} iterations=4",
    ]
    if interleave:  # partners named by their own (distinct) columns
        assert suite.results[3].timed_with == [suite.results[2].column]
    summary = suite_module.summarise(suite)
    assert len({w["label"] for w in summary["workloads"]}) == 2
    assert [f.label for f in suite.floors] == [r.label for r in suite.results[::2]]


def test_labels_are_distinct_and_the_same_point_twice_is_refused():
    from lazydp.bench.labels import labels_of

    labels = labels_of([TINY, replace(TINY, lr=0.1), replace(TINY, scale=2e-5)])
    assert list(labels.values()) == [
        f"{TINY.label} lr=0.01",
        f"{TINY.label} lr=0.1",
        replace(TINY, scale=2e-5).label,  # its label is its own: nothing to tell apart
    ]
    with pytest.raises(ConfigError, match="same point more than once"):
        labels_of([TINY, replace(TINY)])


@pytest.mark.parametrize("how", [{"interleave": True}, {"interleave_scales": True}])
def test_interleaved_sweep_refuses_a_point_too_large_and_times_the_rest(how):
    from lazydp.bench import suite as suite_module

    small = replace(TINY, config="mlperf", pooling=None, batch_size=8, scale=1e-6)
    huge = replace(small, scale=50.0)
    suite = suite_module.run_suite(
        [small, huge], ["sgd", "lazydp"], isolate=False, progress=False, **how
    )
    by = {r.column: r for r in suite.results}
    assert by[f"{huge.label} lazydp"].status == "refused"
    assert "lower --scale" in by[f"{huge.label} lazydp"].message
    ok = [r for r in suite.results if r.label == small.label]
    assert [r.status for r in ok] == ["ok", "ok"]
    if "interleave" in how:  # the two modes of the point that fits still ran together
        assert ok[1].timed_with == [ok[0].column]
    assert [f.label for f in suite.floors] == [small.label]  # no floor beside a refused lazydp


def test_noise_floor_warms_its_whole_buffer(monkeypatch):
    from lazydp.bench import floor

    sizes: list[int] = []

    class Recording:
        def __init__(self, **kwargs):
            pass

        def normal_(self, t):
            sizes.append(t.numel())

    monkeypatch.setattr(floor, "GaussianNoise", Recording)
    measure_noise_floor(TINY)
    # The warm-up covers every element any measured step draws into: no first touch is timed.
    assert sizes[0] == max(sizes[1:]) > 0


@pytest.mark.parametrize(("statistic", "ms"), [("mean", 4.0), ("median", 2.0), ("min", 1.0)])
def test_noise_floor_uses_the_specs_statistic(monkeypatch, statistic, ms):
    from types import SimpleNamespace

    from lazydp.bench import floor

    ticks = iter([0.0, 0.001, 1.0, 1.009, 2.0, 2.002])  # three draws: 1, 9 and 2 ms
    monkeypatch.setattr(floor, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    spec = replace(TINY, measure_last=3, statistic=statistic)
    result = measure_noise_floor(spec)
    assert result.floor_ms == pytest.approx(ms)
    assert result.samples_per_s > 0


@pytest.mark.parametrize(
    ("field", "value"),
    [("lr", 0.0), ("lr", -1.0), ("lr", float("nan")), ("lr", float("inf")), ("lr", "0.1"),
     ("lr", True), ("dense_only", "false"), ("dense_only", 1), ("seed", -1), ("seed", 1.5),
     ("seed", True), ("locality", "zipf:"), ("locality", 2), ("table_momentum", 1.0),
     ("table_momentum", -0.1)],
)  # fmt: skip
def test_spec_refuses_bad_values_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        replace(TINY, **{field: value})


@pytest.mark.parametrize("mode", ["sgd", "dpsgd_f", "lazydp"])
def test_table_momentum_reaches_every_mode_and_its_label(mode):
    spec = replace(TINY, table_momentum=0.9)
    assert spec.label.endswith(" mu=0.9") and TINY.label != spec.label
    r = time_mode(spec, mode)
    assert r.status == "ok" and r.breakdown_ms["total"] > 0
    assert r.estimate["velocity"] == r.table_bytes
    opt = _ModeRunner(spec, mode).opt
    groups = [g for o in (opt.opts if mode == "sgd" else opt.originals) for g in o.param_groups]
    assert [g["momentum"] for g in groups] == [0, 0.9]  # MLPs plain, tables with momentum


def test_a_child_process_peak_is_its_own_not_its_parents():
    # ru_maxrss survives exec: an isolated mode measured after the parent had touched a large
    # buffer (a noise floor) reported the parent's peak. VmHWM starts afresh at exec.
    import subprocess
    import sys

    from lazydp.bench.harness import peak_rss_bytes

    big = torch.ones(400 * 2**20 // 4)  # 400 MB touched in this process
    parent = peak_rss_bytes()
    code = "from lazydp.bench.harness import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
    )
    del big
    assert parent > 400 * 2**20 and child < parent - 300 * 2**20, (parent, child)


def test_the_printed_table_shows_opacus_backward_row():
    # Without it an Opacus column's forward + update did not add up to its total.
    from lazydp.bench.harness import ModeResult
    from lazydp.bench.opacus_compare import OPACUS_BACKWARD_ROW
    from lazydp.bench.report import format_table
    from lazydp.bench.suite import SuiteResult

    suite = SuiteResult(specs=[TINY], modes=["sgd"])
    label = suite.label(TINY)
    suite.results = [
        ModeResult(label, "sgd", breakdown_ms={"forward": 1.0, "total": 3.0}),
        ModeResult(
            label,
            "opacus_hooks",
            breakdown_ms={"forward": 1.0, OPACUS_BACKWARD_ROW: 40.0, "update": 3.0, "total": 44.0},
        ),
    ]
    table = format_table(suite)
    line = next(x for x in table.splitlines() if x.startswith(OPACUS_BACKWARD_ROW))
    assert float(line.split()[-1]) == 40.0


def test_the_phase_timer_adds_every_block_even_one_that_raises():
    from lazydp._timing import PhaseTimer

    timer = PhaseTimer()
    assert timer.phase("x") is timer.phase("y")  # disabled: one shared no-op, nothing allocated
    timer.enabled = True
    with timer.phase("a"), timer.phase("a"):  # nested and repeated names add up
        time.sleep(0.002)
    with pytest.raises(ValueError), timer.phase("b"):
        raise ValueError
    totals = timer.reset()
    assert totals["a"] >= 0.004 and "b" in totals and timer.totals == {}


def test_the_phase_timer_waits_for_the_device_at_each_phase_edge():
    # On a GPU (bench placement "split") a phase is charged its kernels' time: the timer calls
    # its sync (torch.cuda.synchronize) as a phase starts and as it ends, and only when on.
    from lazydp._timing import PhaseTimer

    calls = []
    timer = PhaseTimer()
    timer.sync = lambda: calls.append(1)
    with timer.phase("x"):
        pass
    assert calls == []  # disabled: no sync either
    timer.enabled = True
    with timer.phase("x"), timer.phase("y"):
        assert len(calls) == 2
    assert len(calls) == 4 and set(timer.reset()) == {"x", "y"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_the_papers_gpu_placement_is_refused_clearly_without_cuda(tmp_path, capsys):
    from lazydp.bench.workload import BenchSpec
    from lazydp.cli import main

    with pytest.raises(ConfigError, match="no CUDA device. Use placement='cpu'"):
        BenchSpec("rmc1", 1e-5, 16, placement="split")
    with pytest.raises(ConfigError, match="placement"):
        BenchSpec("rmc1", 1e-5, 16, placement="gpu")
    assert BenchSpec("rmc1", 1e-5, 16).mlp_device == torch.device("cpu")
    args = ["bench", "--config", "rmc1", "--scale", "1e-5", "--placement", "split"]
    assert main([*args, "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "host memory" in err and "Traceback" not in err


def test_opacus_ratios_are_printed_to_two_decimals_below_ten():
    # Rounded to whole numbers, opacus/lazydp 1.55 printed as "2x" and 0.4 as "0x".
    from lazydp.bench import report

    row = {"label": "w", "opacus_mode": "opacus_hooks", "opacus_ms": 31.0}
    text = report.markdown_summary(
        {"workloads": [], "opacus": [{**row, "opacus_over_lazydp": 1.55}]}
    )
    assert text.endswith("opacus_hooks: 31 ms/step; lazydp 1.55x")
    assert [report.times(r) for r in (0.4, 1.55, 9.994, 48.3)] == ["0.40x", "1.55x", "9.99x", "48x"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_a_measuring_child_dies_with_a_hard_killed_parent(tmp_path):
    # SIGKILL (or the OOM killer) on `lazydp bench` left its child measuring on, orphaned.
    armed = tmp_path / "armed"
    child_code = (
        "import os, pathlib, time, lazydp.bench.harness as h; "
        "getattr(h, '_die_with_parent', lambda: None)(); "
        f"pathlib.Path({str(armed)!r}).write_text(str(os.getpid())); time.sleep(60)"
    )
    parent = (
        "import os, subprocess, sys, time\n"
        f"env = dict(os.environ, LAZYDP_BENCH_PARENT=str(os.getpid()))\n"
        f"subprocess.Popen([sys.executable, '-c', {child_code!r}], env=env)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent])
    deadline = time.monotonic() + 120  # the child imports torch first: slow on a busy machine
    while not armed.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.2)  # the pid is written whole
    child = int(armed.read_text())
    proc.kill()
    proc.wait()

    def gone() -> bool:  # exited, or killed and not yet reaped by its new parent
        stat = Path(f"/proc/{child}/stat")
        return not stat.exists() or stat.read_text().split()[2] == "Z"

    deadline = time.monotonic() + 10
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.1)
    survived = not gone()
    if survived:
        os.kill(child, 9)
    assert not survived
