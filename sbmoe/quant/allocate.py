"""Bits per expert linear under an average-bit budget: an exact solver (a small integer program, scipy's HiGHS).

The cost of giving linear ``l`` ``b`` bits is ``frequency_l * error_l(b)`` (``sensitivity``: calibrated output
error weighted by how often its expert is used) or ``outlier_l * 4**-b`` (``outlier``: the weight outlier score
times the round-to-nearest error's scaling). The plan minimises the total cost with
``sum_l params_l * b_l <= budget * sum_l params_l``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from sbmoe.data.dataset import DataError
from sbmoe.quant.calibrate import LinearStats, group_for

CRITERIA = ("sensitivity", "outlier")


def costs(stats: Sequence[LinearStats], bit_widths: Sequence[int], criterion: str) -> np.ndarray:
    """Cost matrix (linears x bit widths) of a criterion."""
    if criterion == "sensitivity":
        return np.array([[s.frequency * s.error[b] for b in bit_widths] for s in stats])
    if criterion == "outlier":
        return np.array([[s.outlier * 4.0**-b for b in bit_widths] for s in stats])
    raise ValueError(f"unknown criterion {criterion!r}: expected one of {CRITERIA}")


def allocate(
    stats: Sequence[LinearStats], budget: float, bit_widths: Sequence[int], criterion: str = "sensitivity"
) -> dict[str, int]:
    """The bits of each linear minimising the criterion's total cost at an average of at most ``budget`` bits.

    Raises:
        DataError: a budget below the smallest bit width.
    """
    bit_widths = sorted(bit_widths)
    if budget < bit_widths[0]:
        raise DataError(f"budget {budget} bits is below the smallest bit width {bit_widths[0]}")
    n, m = len(stats), len(bit_widths)
    params = np.array([s.params for s in stats], dtype=float)
    one_each = np.kron(np.eye(n), np.ones(m))  # each linear gets exactly one width
    bits_used = np.kron(params, np.array(bit_widths, dtype=float))
    constraints = [
        LinearConstraint(one_each, 1, 1),
        LinearConstraint(bits_used[None, :], 0, budget * params.sum() + 1e-6),
    ]
    result = milp(
        costs(stats, bit_widths, criterion).reshape(-1),
        constraints=constraints,
        integrality=np.ones(n * m),
        bounds=Bounds(0, 1),
    )
    if not result.success:
        raise DataError(f"no bit plan found at budget {budget}: {result.message}")
    chosen = result.x.reshape(n, m).argmax(axis=1)
    return {s.name: bit_widths[j] for s, j in zip(stats, chosen, strict=True)}


def uniform(stats: Sequence[LinearStats], bits: int) -> dict[str, int]:
    """Every linear at ``bits``."""
    return {s.name: bits for s in stats}


def make_plan(
    bits: dict[str, int], stats: Sequence[LinearStats], group_size: int | None, criterion: str
) -> dict[str, Any]:
    """A plan: per linear its bits, group size and the figures behind the choice; plus the average bits."""
    by_name = {s.name: s for s in stats}
    total = sum(s.params for s in stats)
    linears = {
        name: {
            "bits": b,
            "group_size": group_for(b, group_size),
            "frequency": round(by_name[name].frequency, 4),
            "error": by_name[name].error.get(b),
            "outlier": round(by_name[name].outlier, 2),
        }
        for name, b in bits.items()
    }
    average = sum(by_name[n].params * b for n, b in bits.items()) / max(1, total)
    return {"criterion": criterion, "average_bits": average, "linears": linears}


def plan_table(plan: dict[str, Any]) -> str:
    """The plan as aligned text lines: name, bits, group, frequency, relative output error, outlier score."""
    width = max([28, *map(len, plan["linears"])])
    lines = [f"{'linear':<{width}} bits group  freq   rel.err   outlier"]
    for name, p in plan["linears"].items():
        error = "-" if p["error"] is None else f"{p['error']:.2e}"
        lines.append(
            f"{name:<{width}} {p['bits']:>4} {str(p['group_size']):>5} {p['frequency']:>5.3f} {error:>9} "
            f"{p['outlier']:>8}"
        )
    lines.append(f"average bits per expert weight: {plan['average_bits']:.3f} ({plan['criterion']})")
    return "\n".join(lines)
