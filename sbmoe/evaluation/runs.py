"""TREC run files (qid Q0 docid rank score tag): written by `sbmoe search --queries`, scored by `evaluate --run`."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from sbmoe.data.ids import check_id
from sbmoe.errors import DataError
from sbmoe.files import write_atomic

Run = Mapping[str, Mapping[str, float]]


def write_trec_run(path: str | os.PathLike, run: Run, tag: str = "sbmoe") -> Path:
    """Write ``{query id: {doc id: score}}`` as a TREC run file (ranked by score, best first), atomically.

    Raises:
        DataError: a query or document id that a run file cannot hold (whitespace, line breaks), named.
    """
    lines = []
    for qid, hits in run.items():
        check_id(qid, f"{path}: query")
        for doc_id in hits:
            check_id(doc_id, f"{path}: document")
        ranked = sorted(hits.items(), key=lambda item: -item[1])
        lines += [f"{qid} Q0 {doc_id} {rank} {float(score)!r} {tag}" for rank, (doc_id, score) in enumerate(ranked, 1)]
    return write_atomic(path, "".join(f"{line}\n" for line in lines))


def read_trec_run(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """Read a TREC run file into ``{query id: {doc id: score}}``.

    Raises:
        DataError: a missing file, or a line without 6 whitespace-separated fields or with a score that is not a
            finite number (``nan``, ``inf``), named by file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: run file not found (expected lines 'qid Q0 docid rank score tag')")
    run: dict[str, dict[str, float]] = {}
    with path.open(encoding="utf-8-sig") as handle:
        for line_no, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 6:
                raise DataError(f"{path}:{line_no}: {len(fields)} fields, expected 6 (qid Q0 docid rank score tag)")
            try:
                score = float(fields[4])
            except ValueError as err:
                raise DataError(f"{path}:{line_no}: score {fields[4]!r} is not a number") from err
            if not math.isfinite(score):
                raise DataError(f"{path}:{line_no}: score {fields[4]!r} is not finite; fix the run that wrote it")
            run.setdefault(fields[0], {})[fields[2]] = score
    if not run:
        raise DataError(f"{path}: the run file is empty")
    return run
