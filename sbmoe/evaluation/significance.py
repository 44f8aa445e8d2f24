"""Significance of two systems' per-query scores: paired t-test and sign-flip randomization, a hierarchical
bootstrap over seeds and queries, the two together for systems run with several seeds, and Holm's correction
across the tests of one table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats


def paired_test(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Mean difference a - b over shared queries, paired t-test p and paired randomization (sign-flip) p."""
    queries = sorted(set(a) & set(b))
    x, y = np.array([a[q] for q in queries]), np.array([b[q] for q in queries])
    diff = x - y
    if not diff.any():
        return {"delta": 0.0, "se": 0.0, "p_ttest": 1.0, "p_randomization": 1.0, "n": len(queries)}
    ttest = stats.ttest_rel(x, y)
    perm = stats.permutation_test(
        (x, y),
        lambda u, v, axis: np.mean(u - v, axis=axis),
        permutation_type="samples",
        vectorized=True,
        n_resamples=10000,
        random_state=0,
    )
    se = float(diff.std(ddof=1) / np.sqrt(len(diff)))
    return {
        "delta": float(diff.mean()),
        "se": se,
        "p_ttest": float(ttest.pvalue),
        "p_randomization": float(perm.pvalue),
        "n": len(queries),
    }


def hierarchical_bootstrap(
    a: np.ndarray, b: np.ndarray, resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Percentile interval of the mean difference a - b, resampling seeds and queries (a two-level bootstrap).

    Each resample draws the queries with replacement (the same draw for both systems: they are paired by query) and
    each system's seeds with replacement (seeds are not paired across systems), so the interval carries the spread
    between seeds that averaging per-query scores over seeds hides.

    Args:
        a: S_a x Q per-seed, per-query scores of system a (one row for a deterministic system).
        b: S_b x Q scores of system b over the same queries in the same order.
        resamples: Bootstrap resamples.
        confidence: Interval coverage.
        seed: Seed of the resampling.

    Returns:
        ``{"delta", "low", "high", "p_bootstrap"}``: the observed mean difference, the interval, and the two-sided
        bootstrap p (twice the smaller share of resampled differences on either side of 0).
    """
    a, b = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must score the same queries: {a.shape[1]} != {b.shape[1]}")
    rng = np.random.default_rng(seed)
    queries = a.shape[1]
    query_counts = rng.multinomial(queries, np.full(queries, 1 / queries), size=resamples)

    def resampled_means(x: np.ndarray) -> np.ndarray:
        seeds = x.shape[0]
        seed_counts = rng.multinomial(seeds, np.full(seeds, 1 / seeds), size=resamples)
        return np.einsum("rs,sq,rq->r", seed_counts, x, query_counts) / (seeds * queries)

    diffs = resampled_means(a) - resampled_means(b)
    tail = (1 - confidence) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    p = min(1.0, 2 * min((diffs <= 0).mean(), (diffs >= 0).mean()))
    return {"delta": float(a.mean() - b.mean()), "low": float(low), "high": float(high), "p_bootstrap": float(p)}


def compare_seeded(
    a: Sequence[Mapping[str, float]], b: Sequence[Mapping[str, float]], resamples: int = 10_000
) -> dict[str, float | list[int]]:
    """System a against system b, each run with one or more seeds (one per-query score mapping per seed).

    Returns:
        ``{"seeds", "delta", "low", "high", "p_bootstrap", "p_ttest"}``: the seed counts, the mean difference a - b
        with its seeds x queries bootstrap interval (:func:`hierarchical_bootstrap`), and the paired t-test p on the
        per-query means over seeds.

    Raises:
        ValueError: a run of either system lacks a query of a's first run.
    """
    queries = sorted(a[0])
    missing = [(name, q) for name, runs in (("a", a), ("b", b)) for run in runs for q in queries if q not in run]
    if missing:
        raise ValueError(f"every run must score the same queries: {missing[0][0]} lacks {missing[0][1]!r}")
    x, y = (np.array([[run[q] for q in queries] for run in runs]) for runs in (a, b))
    boot = hierarchical_bootstrap(x, y, resamples=resamples)
    t = paired_test(*(dict(zip(queries, m.mean(axis=0).tolist(), strict=True)) for m in (x, y)))
    return {"seeds": [len(a), len(b)], **boot, "p_ttest": t["p_ttest"]}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values of the tests of one table, in the input order.

    The i-th smallest p (from 0) is multiplied by ``m - i``; the adjusted values never decrease along that order
    and never exceed 1.
    """
    order = np.argsort(p_values, kind="stable")
    adjusted = np.empty(len(order))
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * float(p_values[index])))
        adjusted[index] = running
    return adjusted.tolist()
