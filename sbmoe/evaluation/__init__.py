"""Evaluation: score a model or a run file against qrels with pytrec_eval, BEIR's conventions and numbers."""

from sbmoe.evaluation.evaluator import evaluate_embeddings, evaluate_model, to_run
from sbmoe.evaluation.metrics import DEFAULT_METRICS, evaluate_run, per_query
from sbmoe.evaluation.runs import read_trec_run, write_trec_run

__all__ = [
    "DEFAULT_METRICS",
    "evaluate_embeddings",
    "evaluate_model",
    "evaluate_run",
    "per_query",
    "read_trec_run",
    "to_run",
    "write_trec_run",
]
