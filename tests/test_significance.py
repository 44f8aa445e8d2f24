"""Hierarchical bootstrap over seeds and queries, seeded systems compared, and Holm's correction."""

from __future__ import annotations

import numpy as np
import pytest

from sbmoe.evaluation.significance import compare_seeded, hierarchical_bootstrap, holm

TRUE_DELTA = 0.02


def synthetic_pair(rng: np.random.Generator, seeds: int = 5, queries: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Per-seed, per-query scores of two systems whose population mean difference is :data:`TRUE_DELTA`: query
    difficulty shared, a per-query gain around the true one, a per-seed offset and per-(seed, query) noise."""
    difficulty = rng.uniform(0.2, 0.8, queries)
    gain = TRUE_DELTA + rng.normal(0, 0.15, queries)
    a = difficulty + gain + rng.normal(0, 0.02, (seeds, 1)) + rng.normal(0, 0.05, (seeds, queries))
    b = difficulty + rng.normal(0, 0.02, (seeds, 1)) + rng.normal(0, 0.05, (seeds, queries))
    return a, b


def test_bootstrap_interval_covers_the_true_difference_at_its_nominal_rate() -> None:
    rng = np.random.default_rng(0)
    covered = 0
    for draw in range(200):
        a, b = synthetic_pair(rng)
        result = hierarchical_bootstrap(a, b, resamples=1000, seed=draw)
        covered += result["low"] <= TRUE_DELTA <= result["high"]
        assert result["low"] < result["delta"] < result["high"]
    assert 0.93 <= covered / 200 <= 0.97


def test_bootstrap_interval_widens_with_the_spread_between_seeds() -> None:
    rng = np.random.default_rng(1)
    a, b = synthetic_pair(rng)
    calm = hierarchical_bootstrap(a, b, resamples=2000)
    shaky = hierarchical_bootstrap(a + np.array([[-0.1], [0.1], [0.0], [0.05], [-0.05]]), b, resamples=2000)
    assert shaky["delta"] == pytest.approx(calm["delta"])
    assert shaky["high"] - shaky["low"] > 1.5 * (calm["high"] - calm["low"])


def test_bootstrap_of_a_clear_gain_excludes_zero_and_a_deterministic_baseline_works() -> None:
    rng = np.random.default_rng(2)
    base = rng.uniform(0, 1, (1, 200))
    better = base + 0.1 + rng.normal(0, 0.05, (3, 200))
    result = hierarchical_bootstrap(better, base, resamples=2000)
    assert result["low"] > 0 and result["p_bootstrap"] < 0.01
    assert result["delta"] == pytest.approx(float((better - base).mean()))
    with pytest.raises(ValueError, match="the same queries"):
        hierarchical_bootstrap(better, base[:, :10])


def test_holm_multiplies_by_the_remaining_tests_in_order_and_stays_monotone() -> None:
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    p = np.random.default_rng(3).uniform(0, 0.2, 12)
    adjusted = np.array(holm(p.tolist()))
    order = np.argsort(p)
    assert np.all(np.diff(adjusted[order]) >= 0) and np.all(adjusted >= p) and np.all(adjusted <= 1)
    assert holm([]) == []


def test_seeded_systems_compare_by_query_name_whatever_the_order_of_each_run() -> None:
    a, b = synthetic_pair(np.random.default_rng(3), seeds=3, queries=60)
    names = [f"q{i}" for i in range(60)]
    runs_a = [dict(zip(names, row.tolist(), strict=True)) for row in a]
    runs_b = [dict(reversed(list(zip(names, row.tolist(), strict=True)))) for row in b[:2]]  # another order
    result = compare_seeded(runs_a, runs_b, resamples=2000)
    assert result["seeds"] == [3, 2]
    assert result["delta"] == pytest.approx(a.mean() - b[:2].mean())
    assert result["low"] < result["delta"] < result["high"] and 0 <= result["p_ttest"] <= 1
    with pytest.raises(ValueError, match="b lacks 'q5'"):
        compare_seeded(runs_a, [{q: v for q, v in runs_b[0].items() if q != "q5"}])
