"""Choosing and checking IVF and IVF-PQ parameters: defaults that scale with the corpus, exact search for corpora
too small for IVF, and refusals (with the numbers) of settings the training vectors cannot meet."""

from __future__ import annotations

import math
from typing import Any

from sbmoe.data.dataset import DataError

IVF_TYPES = ("ivf", "ivfpq")
MIN_SCAN = 8192  # vectors a default IVF search scans at least: enough for a reliable top 1,000 (bench_ivf_defaults)
EXACT_BELOW = 2 * MIN_SCAN  # smaller corpora: default IVF would scan half of them, so exact search is used instead
POINTS_PER_LIST = 39  # faiss asks for 39 training points per centroid; the default nlist keeps to it


def searches_exactly(index_type: str, n: int, nlist: int | None) -> bool:
    """Whether an ``index_type`` index on ``n`` vectors falls back to exact (flat) search: an IVF type without a
    given ``nlist`` on fewer than :data:`EXACT_BELOW` vectors."""
    return index_type in IVF_TYPES and nlist is None and n < EXACT_BELOW


def fallback_message(index_type: str, n: int) -> str:
    """The warning that an ``index_type`` index on ``n`` vectors searches exactly, and why."""
    nlist, nprobe = ivf_defaults(n)
    return (
        f"{index_type} index on {n} vectors: searching exactly (flat) instead: below {EXACT_BELOW} vectors IVF "
        f"would have to scan at least half of them (default: {nprobe} of {nlist} lists) to find the top results "
        "reliably; pass nlist to force IVF"
    )


def ivf_defaults(n: int, nlist: int | None = None) -> tuple[int, int]:
    """``(nlist, nprobe)`` for ``n`` vectors: nlist = min(4 sqrt(n), n / 39) unless given; nprobe = nlist / 8,
    or more, to scan :data:`MIN_SCAN` vectors."""
    if nlist is None:
        nlist = max(1, min(int(4 * math.sqrt(n)), n // POINTS_PER_LIST))
    scan_min = math.ceil(MIN_SCAN * nlist / n)
    nprobe = min(nlist, max(1, nlist // 8, scan_min))
    return nlist, nprobe


def filled_params(index_type: str, dim: int, n: int, train_size: int, params: dict[str, Any]) -> dict[str, Any]:
    """The parameters an ``index_type`` index on ``n`` ``dim``-d vectors is built with.

    Args:
        index_type: Any index type; only ``ivf`` and ``ivfpq`` get defaults here, other types keep ``params``.
        dim: Vector dimension.
        n: Vectors the index will hold (they size the default lists).
        train_size: Vectors it is trained on.
        params: The requested parameters of that type; None: the default.

    Returns:
        ``params`` with the IVF defaults filled in; or, for IVF that searches exactly (see
        :func:`searches_exactly`), every parameter None and ``fallback="flat"`` (recorded in the manifest).

    Raises:
        DataError: a setting the training vectors or the dimension cannot meet, with the numbers.
    """
    if searches_exactly(index_type, n, params.get("nlist")):
        return {key: None for key in params} | {"fallback": "flat"}
    if index_type not in IVF_TYPES:
        return dict(params)
    filled = {**params, **ivf_settings(n, train_size, params["nlist"], params["nprobe"])}
    if index_type == "ivfpq":
        filled["pq_m"] = pq_subquantizers(dim, train_size, params["pq_m"], params["pq_bits"])
    return filled


def ivf_settings(n: int, train_size: int, nlist: int | None, nprobe: int | None) -> dict[str, int]:
    """``nlist`` and ``nprobe`` for ``n`` vectors (defaults where None), checked against ``train_size`` vectors."""
    where = "" if nlist else f" (the default for {n} vectors)"
    nlist, default_nprobe = ivf_defaults(n, nlist)
    if nlist > train_size:
        advised = max(1, train_size // POINTS_PER_LIST)
        raise DataError(
            f"nlist={nlist}: {nlist} lists need at least {nlist} training vectors, got {train_size}; lower nlist "
            f"(faiss advises {POINTS_PER_LIST} vectors per list: nlist={advised}) or leave it out to get a default"
        )
    if nprobe is not None and nprobe > nlist:
        raise DataError(f"nprobe={nprobe} > nlist={nlist}{where}: a search cannot probe more lists than there are")
    return {"nlist": nlist, "nprobe": nprobe or default_nprobe}


def pq_subquantizers(dim: int, train_size: int, pq_m: int | None, pq_bits: int) -> int:
    """``pq_m`` (default: the largest divisor of ``dim`` up to dim / 4), checked against ``dim`` and the sample."""
    divisors = [m for m in range(1, dim + 1) if dim % m == 0]
    if pq_m is None:
        pq_m = max(m for m in divisors if m <= max(1, dim // 4))
    if dim % pq_m:
        raise DataError(f"pq_m={pq_m} does not divide the dimension {dim}; divisors: {', '.join(map(str, divisors))}")
    centroids = 2**pq_bits
    if train_size < centroids:
        raise DataError(
            f"pq_bits={pq_bits}: {centroids} centroids per sub-quantizer need at least {centroids} training "
            f"vectors, got {train_size}; lower pq_bits (at most {int(math.log2(train_size))} here)"
        )
    return pq_m
