"""Paired significance tests of two systems' per-query scores (t-test and sign-flip randomization)."""

from __future__ import annotations

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
