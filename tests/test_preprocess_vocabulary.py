"""DP vocabulary calibration: threshold and noise match the stated (epsilon, delta)."""

from __future__ import annotations

import math
from collections import Counter

import duckdb
import numpy as np
import pytest
from scipy import stats

from lazydp.errors import ConfigError
from lazydp.preprocess import sql
from lazydp.preprocess.dialect import DuckDBDialect, quote
from lazydp.preprocess.spec import Categorical, raw
from lazydp.preprocess.vocabulary import PartitionSelection, split_budget


def test_threshold_matches_korolova_formula_for_one_value_per_row():
    # Korolova et al. / Gopi et al.: Laplace(1/eps), keep iff noisy count > 1 + ln(1/(2 delta))/eps
    eps, delta = 0.7, 1e-6
    sel = PartitionSelection(eps, delta, 1)
    assert sel.scale == pytest.approx(1 / eps)
    assert sel.threshold == pytest.approx(1 + math.log(1 / (2 * delta)) / eps)
    assert sel.keep_probability(1) == pytest.approx(delta)


def test_multi_valued_bound_scales_noise_and_union_bounds_delta():
    sel = PartitionSelection(1.0, 1e-5, 10)
    assert sel.scale == pytest.approx(10.0)
    # each of the <= k values only the extra row holds survives with prob delta / k
    assert 10 * sel.keep_probability(1) == pytest.approx(1e-5)
    # counts present in both neighbours: keep probabilities within e^(eps / k) of each other
    for c in [1, 5, 50, 200, 400]:
        ratio = sel.keep_probability(c + 1) / sel.keep_probability(c)
        assert 1.0 <= ratio <= math.exp(1.0 / 10) + 1e-12


def test_budget_split_over_features_composes_to_the_total():
    sels = split_budget(2.0, 1e-6, {"a": 1, "b": 1, "g": 10})
    assert sum(s.epsilon for s in sels.values()) == pytest.approx(2.0)
    assert sum(s.delta for s in sels.values()) == pytest.approx(1e-6)
    with pytest.raises(ConfigError, match="vocab_epsilon"):
        split_budget(0.0, 1e-6, {"a": 1})
    with pytest.raises(ConfigError, match="vocab_delta"):
        split_budget(1.0, 1.5, {"a": 1})
    # The noise's 52-bit grid is exact to ~2e-16 per value: a per-value delta near that would
    # be overstated (vocabulary audit), so it is refused with the smallest usable delta.
    with pytest.raises(ConfigError, match="too small for 3 features"):
        split_budget(1.0, 1e-13, {"a": 1, "b": 1, "g": 10})
    split_budget(1.0, 1e-10, {"a": 1, "b": 1, "g": 10})


def _kept_fraction(count: int, sel: PartitionSelection, n_values: int, threshold: float) -> float:
    """Run the engine's SQL keep rule on ``n_values`` distinct values that all have ``count``."""
    d = DuckDBDialect()
    con = duckdb.connect()
    con.execute(
        f"CREATE TABLE k AS SELECT 'v' || CAST(i AS VARCHAR) AS value, {count} AS c "
        f"FROM range({n_values}) t(i)"
    )
    namespace = f"{quote('fixed-test')} || chr(31) || {quote('f')}"
    noise = sql.laplace_noise_sql(d, namespace, "value", sel.scale)
    kept = con.execute(f"SELECT COUNT(*) FROM k WHERE CAST(c AS DOUBLE) + {noise} > {threshold!r}")
    return kept.fetchone()[0] / n_values


def test_sql_keeps_a_count_one_value_with_probability_delta():
    sel = PartitionSelection(epsilon=1.0, delta=0.01, max_values=1)  # large delta: measurable
    n = 100_000
    frac = _kept_fraction(1, sel, n, sel.threshold)
    # two-sided binomial test at the stated delta
    assert stats.binomtest(round(frac * n), n, sel.delta).pvalue > 1e-3
    # and it can fail: a threshold one count lower keeps e^eps times as many (rejected)
    wrong = _kept_fraction(1, sel, n, sel.threshold - 1.0)
    assert stats.binomtest(round(wrong * n), n, sel.delta).pvalue < 1e-6
    assert wrong == pytest.approx(sel.delta * math.e, rel=0.1)


def test_sql_noise_is_laplace_with_the_stated_scale():
    d = DuckDBDialect()
    con = duckdb.connect()
    noise = sql.laplace_noise_sql(d, quote("fixed-k"), "CAST(i AS VARCHAR)", 3.0)
    draws = np.array(
        [r[0] for r in con.execute(f"SELECT {noise} FROM range(20000) t(i)").fetchall()]
    )
    assert stats.kstest(draws, stats.laplace(scale=3.0).cdf).pvalue > 1e-3
    for wrong in (2.0, 4.5):  # 2/3 and 3/2 of the scale are rejected
        assert stats.kstest(draws, stats.laplace(scale=wrong).cdf).pvalue < 1e-6


def _selected_sets(rows: list[str], k: int, sel: PartitionSelection, trials: int) -> Counter:
    """How often each set of values is kept, over ``trials`` independent selections of the
    multi-valued feature ``g`` (list split on ``|``, capped at ``k`` as the genres are) on the
    rows ``rows``, by the engine's SQL. Trial t prefixes every value with ``t~``: one key, and
    every (trial, value) its own noise."""
    d = DuckDBDialect()
    cat = Categorical("g", lambda d: d.slice(d.split(raw("g"), "|"), k), True, k)
    con = duckdb.connect()
    values = ", ".join(f"({i}, {quote(r)})" for i, r in enumerate(rows))
    con.execute(f"CREATE TABLE base AS SELECT * FROM (VALUES {values}) v(line_no, r_g)")
    prefixed = (
        "array_to_string(list_transform(string_split(r_g, '|'), "
        "lambda x: CAST(t AS VARCHAR) || '~' || x), '|')"
    )
    con.execute(
        "CREATE TABLE prepared AS SELECT CAST(t AS INT) AS file_idx, "
        f"CAST(line_no AS BIGINT) AS line_no, FALSE AS is_test, "
        f"{cat.value(d).replace('r_g', prefixed)} AS v_g FROM base, range({trials}) r(t)"
    )
    kept = con.execute(
        sql.vocab_sql(d, cat, sql.LaplaceSelection(sel.scale, sel.threshold, "fixed-n"))
    ).fetchall()
    sets: dict[int, set[str]] = {t: set() for t in range(trials)}
    for value, _ in kept:
        t, v = value.split("~", 1)
        sets[int(t)].add(v)
    return Counter(frozenset(s) for s in sets.values())


def _hockey_stick(p: Counter, q: Counter, eps: float, n: int) -> float:
    """Estimated sup over events E of P(E) - e^eps Q(E): the delta that (eps, delta)-DP bounds."""
    return sum(max(0.0, p[s] - math.exp(eps) * q[s]) for s in p) / n


@pytest.mark.parametrize(
    ("rows", "extra", "bound"),
    [
        # the added row's values are new (count 0 -> 1): delta bounds it (0.0975 exactly); z is
        # past the cap k = 2 and must not count
        (["a|b"] * 3 + ["b"] * 2, "x|y|z", "delta"),
        # values both neighbours hold: e^eps alone bounds the ratios, below the threshold
        # (where they are largest, e^(eps / k) each) and across it
        (["a|b"] * 2, "a|b|z", "none"),
        (["a|b"] * 5 + ["b"], "a|b|z", "none"),
    ],
)
def test_neighbouring_data_sets_meet_the_stated_epsilon_delta(rows, extra, bound):
    # Empirical (eps, delta) check of the whole SQL mechanism (counts, per-row cap, noise,
    # threshold) on neighbours that differ by one row. A threshold computed for k = 1 instead
    # of k = 2 gives 0.19 in the first case, a scale for k = 1 0.09 in the second.
    eps, delta, k, trials = 1.0, 0.1, 2, 40_000
    sel = PartitionSelection(eps, delta, k)
    without, with_row = (_selected_sets(r, k, sel, trials) for r in (rows, [*rows, extra]))
    allowed = delta if bound == "delta" else 0.0
    slack = 4 * math.sqrt(0.25 / trials)  # four standard errors of an estimated probability
    assert _hockey_stick(with_row, without, eps, trials) <= allowed + slack
    assert _hockey_stick(without, with_row, eps, trials) <= allowed + slack
    assert not any("z" in s for s in with_row)  # past the cap: never counted
