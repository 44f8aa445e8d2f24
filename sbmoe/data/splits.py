"""Dev split of training queries whose relevant documents are unseen by the remaining training queries (or, where
shared positives link nearly every query, a random query-disjoint one)."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)

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


@dataclass
class DevSplit:
    """A dev split of training queries and how it was made.

    Attributes:
        train: The remaining training qrels.
        dev: The dev qrels.
        method: ``unseen-positives`` (no dev positive is a positive of a training query) or ``random`` (the
            fallback when shared positives link too many queries to reach the requested size).
        seen_positive_share: Share of the dev queries' positives that training queries also have (0 for
            ``unseen-positives``).
    """

    train: dict[str, dict[str, int]]
    dev: dict[str, dict[str, int]]
    method: str
    seen_positive_share: float

    def summary(self) -> dict[str, object]:
        """What run.json records of the split."""
        return {"method": self.method, "queries": len(self.dev), "seen_positive_share": self.seen_positive_share}


def dev_split(qrels: Qrels, dev_size: int, seed: int = 0, name: str = "training data") -> DevSplit:
    """:func:`unseen_dev_split`, or a random query-disjoint split of ``dev_size`` queries when that one falls short
    of the size (one connected component of shared positives holds most queries, as in NFCorpus); the fallback is
    logged and the share of dev positives seen in training is recorded."""
    train, dev = unseen_dev_split(qrels, dev_size, seed)
    method = "unseen-positives"
    if len(dev) < dev_size:
        judged = sorted(q for q, docs in qrels.items() if any(s > 0 for s in docs.values()))
        chosen = set(random.Random(seed).sample(judged, min(dev_size, len(judged) - 1)))
        reached = f"reaches only {len(dev)} of {dev_size} queries (shared positives link the rest)"
        logger.warning("%s: the unseen-positives dev split %s; using a random query-disjoint split", name, reached)
        train = {q: dict(d) for q, d in qrels.items() if q not in chosen}
        dev, method = {q: dict(qrels[q]) for q in sorted(chosen)}, "random"
    train_positives = {d for docs in train.values() for d, s in docs.items() if s > 0}
    dev_positives = [d for docs in dev.values() for d, s in docs.items() if s > 0]
    seen = sum(d in train_positives for d in dev_positives) / max(len(dev_positives), 1)
    return DevSplit(train, dev, method, seen)
