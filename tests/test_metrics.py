"""Metrics: hand-computed values, relevance levels, and agreement with BEIR's own evaluator."""

from __future__ import annotations

import math

import numpy as np
import pytest
from beir.retrieval.custom_metrics import mrr, top_k_accuracy
from beir.retrieval.evaluation import EvaluateRetrieval

from sbmoe.evaluation.metrics import DEFAULT_METRICS, cut_run, evaluate_run, parse_metric, per_query

QRELS = {"q1": {"d1": 1, "d2": 2}, "q2": {"d4": 1}}
RUN = {"q1": {"d3": 0.9, "d1": 0.8, "d2": 0.7}, "q2": {"d4": 0.5, "d5": 0.4}}


def test_hand_computed_values() -> None:
    scores = per_query(QRELS, RUN, ["nDCG@10", "MRR@10", "MRR@1", "P@1", "Recall@1", "Recall@10", "MAP@100"])
    # q1: ranks d3 (0), d1 (gain 1), d2 (gain 2); ideal d2, d1. trec_eval's nDCG uses linear gains.
    dcg = 1 / math.log2(3) + 2 / math.log2(4)
    idcg = 2 + 1 / math.log2(3)
    assert scores["q1"]["nDCG@10"] == pytest.approx(dcg / idcg)
    assert scores["q1"]["MRR@10"] == pytest.approx(0.5)
    assert scores["q1"]["MRR@1"] == 0.0
    assert scores["q1"]["P@1"] == 0.0
    assert scores["q1"]["Recall@1"] == 0.0
    assert scores["q1"]["Recall@10"] == 1.0
    assert scores["q1"]["MAP@100"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert scores["q2"] == {
        "nDCG@10": 1.0,
        "MRR@10": 1.0,
        "MRR@1": 1.0,
        "P@1": 1.0,
        "Recall@1": 1.0,
        "Recall@10": 1.0,
        "MAP@100": 1.0,
    }
    means = evaluate_run(QRELS, RUN, ["MRR@10", "P@1"])
    assert means == {"MRR@10": pytest.approx(0.75), "P@1": pytest.approx(0.5)}


def test_success_at_k_counts_a_relevant_document_in_the_top_k() -> None:
    scores = per_query(QRELS, RUN, ["Success@1", "Success@2", "Success@5"])
    assert scores["q1"] == {"Success@1": 0.0, "Success@2": 1.0, "Success@5": 1.0}  # d1 is second
    assert scores["q2"] == {"Success@1": 1.0, "Success@2": 1.0, "Success@5": 1.0}
    assert per_query(QRELS, RUN, ["Success@2"], relevance_level=2)["q1"] == {"Success@2": 0.0}  # d2 is third
    assert parse_metric("success@5") == ("success", 5)


def test_relevance_level_applies_to_binary_metrics_only() -> None:
    level2 = per_query(QRELS, RUN, ["MRR@10", "Recall@2", "nDCG@10"], relevance_level=2)
    assert level2["q1"]["MRR@10"] == pytest.approx(1 / 3)  # d1 (grade 1) no longer counts
    assert level2["q1"]["Recall@2"] == 0.0
    assert level2["q1"]["nDCG@10"] == pytest.approx(per_query(QRELS, RUN, ["nDCG@10"])["q1"]["nDCG@10"])


def test_queries_missing_from_run_are_not_averaged_as_in_beir() -> None:
    means = evaluate_run(QRELS, {"q2": RUN["q2"]}, ["nDCG@10"])
    assert means["nDCG@10"] == 1.0
    assert evaluate_run(QRELS, {}, ["nDCG@10"]) == {"nDCG@10": 0.0}


def test_cut_run_ranks_like_trec_eval() -> None:
    run = {"q": {"a": 1.0, "b": 1.0, "c": 2.0, "d": 0.5}}
    assert list(cut_run(run, 3)["q"]) == ["c", "b", "a"]  # ties: higher doc id first, as trec_eval


def test_unknown_metric_names_the_accepted_forms() -> None:
    assert parse_metric("ndcg@10") == ("ndcg", 10)
    with pytest.raises(ValueError, match=r"unknown metric 'F1@10': expected nDCG@k, MAP@k, MRR@k"):
        parse_metric("F1@10")
    with pytest.raises(ValueError, match="k >= 1"):
        evaluate_run(QRELS, RUN, ["nDCG@0"])


def test_agrees_with_beir_evaluator_on_a_random_run() -> None:
    rng = np.random.default_rng(0)
    docs = [f"d{i}" for i in range(300)]
    qrels = {f"q{q}": {d: int(rng.integers(1, 3)) for d in rng.choice(docs, 4, replace=False)} for q in range(40)}
    run = {q: {d: float(s) for d, s in zip(docs, rng.random(len(docs)), strict=True)} for q in qrels}
    ours = evaluate_run(qrels, run, DEFAULT_METRICS)
    ndcg, _map, recall, precision = EvaluateRetrieval.evaluate(qrels, run, [1, 3, 5, 10, 100, 1000])
    beir = {**ndcg, **_map, **recall, **precision, **mrr(qrels, run, [10]), **top_k_accuracy(qrels, run, [1, 5])}
    for name in DEFAULT_METRICS:
        key = name.replace("nDCG", "NDCG").replace("Success", "Accuracy")
        assert ours[name] == pytest.approx(beir[key], abs=1e-5), name


def test_paired_test_sees_a_consistent_gain_and_not_an_identical_run() -> None:
    from sbmoe.evaluation.significance import paired_test

    base = {f"q{i}": 0.1 * (i % 7) for i in range(40)}
    assert paired_test(base, base) == {"delta": 0.0, "se": 0.0, "p_ttest": 1.0, "p_randomization": 1.0, "n": 40}
    better = {q: v + 0.05 + 0.01 * (int(q[1:]) % 3) for q, v in base.items()}
    test = paired_test(better, base)
    assert abs(test["delta"] - 0.0598) < 1e-3 and test["p_ttest"] < 1e-6 and test["p_randomization"] < 1e-3
