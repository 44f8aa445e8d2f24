"""Retrieval metrics through pytrec_eval, named like BEIR reports them (``nDCG@10``, ``MAP@100``, ``MRR@10``...)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import pytrec_eval

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]

DEFAULT_METRICS: tuple[str, ...] = (
    "nDCG@1",
    "nDCG@3",
    "nDCG@5",
    "nDCG@10",
    "nDCG@100",
    "MAP@100",
    "MRR@10",
    "Recall@10",
    "Recall@100",
    "Recall@1000",
    "P@1",
    "Success@1",
    "Success@5",
)
# our name -> pytrec_eval measure family; MRR@k is recip_rank on the run cut to its top k. Success@k: 1 when a
# relevant document is in the top k (what someone checking a search of their own corpus measures first).
TREC_NAMES = {
    "ndcg": "ndcg_cut",
    "map": "map_cut",
    "recall": "recall",
    "p": "P",
    "mrr": "recip_rank",
    "success": "success",
}
PATTERN = re.compile(r"^(nDCG|MAP|MRR|Recall|P|Success)@(\d+)$", re.IGNORECASE)


def parse_metric(name: str) -> tuple[str, int]:
    """``"nDCG@10"`` -> ``("ndcg", 10)``; raises ValueError naming the accepted forms."""
    match = PATTERN.match(name.strip())
    if not match or int(match.group(2)) < 1:
        raise ValueError(
            f"unknown metric {name!r}: expected nDCG@k, MAP@k, MRR@k, Recall@k, P@k or Success@k with k >= 1"
        )
    return match.group(1).lower(), int(match.group(2))


def per_query(
    qrels: Qrels, run: Run, metrics: Sequence[str] = DEFAULT_METRICS, relevance_level: int = 1
) -> dict[str, dict[str, float]]:
    """Each metric for each query that is both in ``qrels`` and in ``run`` (pytrec_eval's rule, as in BEIR).

    Args:
        qrels: Query id -> {doc id: graded relevance}.
        run: Query id -> {doc id: score}; higher scores rank first.
        metrics: Metric names, e.g. ``("nDCG@10", "MRR@10")``.
        relevance_level: Lowest grade that MAP, Recall, P, MRR and Success count as relevant (nDCG uses the grades).
    """
    parsed = {name: parse_metric(name) for name in metrics}
    cutoffs: dict[str, set[int]] = {}
    for family, k in parsed.values():
        if family != "mrr":
            cutoffs.setdefault(family, set()).add(k)
    measures = {f"{TREC_NAMES[family]}.{','.join(map(str, sorted(ks)))}" for family, ks in cutoffs.items()}
    qrels = {qid: dict(rels) for qid, rels in qrels.items()}
    results: dict[str, dict[str, float]] = {}
    if measures:
        scores = pytrec_eval.RelevanceEvaluator(qrels, measures, relevance_level).evaluate(_plain(run))
        for qid, values in scores.items():
            results[qid] = {
                name: values[f"{TREC_NAMES[family]}_{k}"] for name, (family, k) in parsed.items() if family != "mrr"
            }
    for name, (family, k) in parsed.items():
        if family != "mrr":
            continue
        rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}, relevance_level).evaluate(cut_run(run, k))
        for qid, values in rr.items():
            results.setdefault(qid, {})[name] = values["recip_rank"]
    return results


def evaluate_run(
    qrels: Qrels, run: Run, metrics: Sequence[str] = DEFAULT_METRICS, relevance_level: int = 1
) -> dict[str, float]:
    """Mean of each metric over the evaluated queries (see :func:`per_query`); 0.0 when none are evaluated."""
    scores = per_query(qrels, run, metrics, relevance_level)
    return {name: _mean(values[name] for values in scores.values()) for name in metrics}


def cut_run(run: Run, k: int) -> dict[str, dict[str, float]]:
    """Each query's top ``k`` documents, ranked as trec_eval ranks them (score, then doc id, descending)."""
    return {
        qid: dict(sorted(((doc, float(s)) for doc, s in docs.items()), key=lambda x: (x[1], x[0]), reverse=True)[:k])
        for qid, docs in run.items()
    }


def _plain(run: Run) -> dict[str, dict[str, float]]:
    return {qid: {doc: float(score) for doc, score in docs.items()} for qid, docs in run.items()}


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
