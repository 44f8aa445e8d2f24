"""Dev split of training queries whose relevant documents are unseen by the remaining training queries."""

from __future__ import annotations

import random
from collections.abc import Mapping

Qrels = Mapping[str, Mapping[str, int]]


def positive_components(qrels: Qrels) -> list[list[str]]:
    """Group query ids that are linked through shared positive documents (connected components).

    Args:
        qrels: ``{query_id: {doc_id: score}}``; scores > 0 count as positive.

    Returns:
        Lists of query ids, sorted for determinism; queries in different groups share no positive document.
    """
    parent = {qid: qid for qid in qrels}

    def root(qid: str) -> str:
        while parent[qid] != qid:
            parent[qid] = parent[parent[qid]]
            qid = parent[qid]
        return qid

    owner: dict[str, str] = {}
    for qid in sorted(qrels):
        for did, score in qrels[qid].items():
            if score <= 0:
                continue
            if did in owner:
                parent[root(qid)] = root(owner[did])
            else:
                owner[did] = qid
    groups: dict[str, list[str]] = {}
    for qid in sorted(qrels):
        groups.setdefault(root(qid), []).append(qid)
    return sorted(groups.values())


def unseen_dev_split(qrels: Qrels, dev_size: int, seed: int = 0) -> tuple[dict, dict]:
    """Split training qrels so that no dev positive is a positive of any remaining training query.

    Whole groups of queries linked by shared positives go to one side, so the dev split behaves like
    SciFact's ``test-unseen``: it rewards generalisation, not memorising which documents tend to be relevant.

    Args:
        qrels: Training qrels ``{query_id: {doc_id: score}}``.
        dev_size: Target number of dev queries (never exceeded).
        seed: Seed of the shuffle over groups.

    Returns:
        ``(train_qrels, dev_qrels)``.
    """
    groups = positive_components({q: docs for q, docs in qrels.items() if any(s > 0 for s in docs.values())})
    random.Random(seed).shuffle(groups)
    dev: set[str] = set()
    for group in groups:
        if len(dev) + len(group) <= dev_size:
            dev.update(group)
        if len(dev) == dev_size:
            break
    train = {q: dict(d) for q, d in qrels.items() if q not in dev}
    return train, {q: dict(qrels[q]) for q in sorted(dev)}
