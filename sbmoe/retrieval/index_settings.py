"""Index settings from a RAM budget and a corpus size, the way autofaiss chooses them: the most exact index whose
estimated memory fits (flat, then IVF with flat lists, then IVF-PQ with as many sub-quantizers as fit).

autofaiss itself pins numpy < 2 and pandas < 3 (autofaiss 2.18), which this project's stack does not allow, so its
rule is kept here in a few lines, on this project's IVF defaults (:func:`sbmoe.retrieval.ivf.ivf_defaults`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sbmoe.data.dataset import DataError
from sbmoe.retrieval.ivf import EXACT_BELOW, ivf_defaults

ID_BYTES = 8  # an IVF list stores an int64 id per vector
PQ_BITS = 8
DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
BINARY = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
UNITS = {"": 1, "b": 1, **DECIMAL, **{f"{prefix}b": size for prefix, size in DECIMAL.items()}, **BINARY}


@dataclass
class IndexSettings:
    """A chosen index: type, :class:`~sbmoe.retrieval.index.DenseIndex` parameters, estimated bytes, and why."""

    index_type: str
    params: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    reason: str = ""


def parse_bytes(text: str) -> int:
    """``"4GB"``, ``"512MiB"``, ``"2e9"`` -> bytes; raises DataError for anything else."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    unit = match[2].lower() if match else ""
    try:
        value = float(match[1]) if match else -1.0
    except ValueError:
        value = -1.0
    if value <= 0 or unit not in UNITS:
        raise DataError(f"RAM budget {text!r}: expected a size such as 4GB, 512MiB or 2e9 (bytes)")
    return int(value * UNITS[unit])


def choose_index(n: int, dim: int, ram_budget: int) -> IndexSettings:
    """The index for ``n`` ``dim``-d float vectors within ``ram_budget`` bytes of index memory.

    Raises:
        DataError: not even IVF-PQ with one byte per vector fits, with the numbers.
    """
    flat = 4 * dim * n
    if n < EXACT_BELOW and flat <= ram_budget:
        return IndexSettings("flat", {}, flat, f"{n} vectors: exact search is cheap below {EXACT_BELOW}")
    nlist, nprobe = ivf_defaults(n)
    centroids = 4 * dim * nlist
    ivf = flat + ID_BYTES * n + centroids
    if ivf <= ram_budget:
        return IndexSettings("ivf", {"nlist": nlist, "nprobe": nprobe}, ivf, "full vectors in IVF lists fit")
    codebooks = 4 * dim * 2**PQ_BITS
    for pq_m in sorted((m for m in range(1, dim + 1) if dim % m == 0 and m <= dim // 2), reverse=True):
        need = (pq_m * PQ_BITS // 8 + ID_BYTES) * n + centroids + codebooks
        if need <= ram_budget:
            params = {"nlist": nlist, "nprobe": nprobe, "pq_m": pq_m, "pq_bits": PQ_BITS}
            reason = f"full vectors need {ivf:,} bytes; {pq_m}-byte PQ codes fit"
            return IndexSettings("ivfpq", params, need, reason)
    smallest = (1 + ID_BYTES) * n + centroids + codebooks
    raise DataError(
        f"RAM budget {ram_budget:,} bytes: {n:,} vectors need at least {smallest:,} (IVF-PQ, 1 byte per vector "
        "plus its id); raise the budget or shard the index across machines"
    )
