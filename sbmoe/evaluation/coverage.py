"""How many of a dataset's queries a result really scores; a result over no evaluable query is an error."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sbmoe.data.dataset import DataError, Problem, RetrievalDataset


def coverage(dataset: RetrievalDataset, run: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, Any]:
    """Count the judged queries a result averages over, and those among them that can score above zero.

    pytrec_eval (and BEIR) average over the queries both in the qrels and in the run; a query whose relevant
    documents are all missing from the corpus is averaged as 0.

    Args:
        dataset: The dataset (its corpus is scanned once, cached).
        run: A run file's ``{query id: {doc id: score}}``; None for a model's own run (which has every query).

    Returns:
        ``{"judged", "scored", "answerable", "notes"}``: queries in the qrels, queries in the means, scored queries
        with a relevant document in the corpus, and one line per kind of query left out or scored as 0.

    Raises:
        DataError: no query has a relevant document in the corpus to be found, saying why.
    """
    found = dataset.scan.qrel_docs_found
    missing = Problem("judged queries are not in the run file")
    unanswerable = Problem("scored queries have no relevant document in the corpus and count as 0, as in BEIR")
    scored = answerable = 0
    for qid in dataset.queries:
        if run is not None and qid not in run:
            missing.add(qid)
            continue
        scored += 1
        if any(d in found for d, grade in dataset.qrels[qid].items() if grade >= dataset.relevance_level):
            answerable += 1
        else:
            unanswerable.add(qid)
    notes = [str(p) for p in (dataset.unknown_queries, missing, unanswerable) if p.count]
    judged = len(dataset.qrels)
    if not answerable:
        why = "; ".join(notes) if judged else f"the qrels of split {dataset.split!r} are empty"
        raise DataError(f"{dataset.name} ({dataset.split}): nothing to evaluate among {judged} judged queries: {why}")
    return {"judged": judged, "scored": scored, "answerable": answerable, "notes": notes}


def describe(name: str, counts: dict[str, Any]) -> str | None:
    """A warning line for a partial result (``None`` when every judged query can score)."""
    if counts["answerable"] == counts["judged"]:
        return None
    return f"{name}: scored {counts['scored']} of {counts['judged']} judged queries: {'; '.join(counts['notes'])}"


def identical_id_warning(dataset: RetrievalDataset) -> str | None:
    """A warning when dropping documents whose id equals the query id (BEIR's rule) removes judged-relevant ones.

    Where query and document numbering overlap by chance (Cranfield), such a document can never be retrieved.
    """
    dropped = Problem("judged-relevant documents have the query's own id and are dropped by the identical-id rule")
    found = dataset.scan.qrel_docs_found
    for qid in dataset.queries:
        if dataset.qrels[qid].get(qid, 0) >= dataset.relevance_level and qid in found:
            dropped.add(qid)
    if not dropped.count:
        return None
    return f"{dataset.name}: {dropped}; pass --keep-identical-ids to keep them"


def coverage_warnings(
    name: str, dataset: RetrievalDataset, counts: dict[str, Any], keep_identical_ids: bool
) -> list[str]:
    """The warnings a result carries besides data validation: a partial result, and relevant documents the
    identical-id rule drops (unless ``keep_identical_ids``)."""
    notes = [describe(name, counts), None if keep_identical_ids else identical_id_warning(dataset)]
    return [line for line in notes if line]
