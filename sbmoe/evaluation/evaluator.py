"""Evaluate a model on BEIR folders and ir-datasets ids: encode (cached, then the tail), index, search, score.

Every evaluation returns one result schema: :func:`score_run` (a run against a dataset's qrels) gives its dataset
part (``dataset``, ``split``, query counts, ``metrics``, ``per_query``, ``warnings``...), :func:`evaluate_model` adds
the encoding, the index (``index``: its type and parameters) and the timings.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from sentence_transformers import SentenceTransformer

from sbmoe.data import RetrievalDataset, load_dataset
from sbmoe.evaluation.coverage import coverage, coverage_warnings
from sbmoe.evaluation.metrics import DEFAULT_METRICS, per_query
from sbmoe.retrieval.build import build_index
from sbmoe.retrieval.cache import model_fingerprint
from sbmoe.retrieval.encoder import Encoder, unit_rows
from sbmoe.retrieval.index import DenseIndex

logger = logging.getLogger("sbmoe.evaluate")


def to_run(
    query_ids: Sequence[str],
    scores: np.ndarray,
    rows: np.ndarray,
    doc_ids: Sequence[str],
    top_k: int,
    ignore_identical_ids: bool = True,
) -> dict[str, dict[str, float]]:
    """Search output -> ``{query id: {doc id: score}}`` with at most ``top_k`` documents per query.

    ``ignore_identical_ids`` drops a document whose id equals the query id, as BEIR does by default.
    """
    run: dict[str, dict[str, float]] = {}
    for qid, q_scores, q_rows in zip(query_ids, scores.tolist(), rows.tolist(), strict=True):
        hits: dict[str, float] = {}
        for score, row in zip(q_scores, q_rows, strict=True):
            if row < 0 or (ignore_identical_ids and doc_ids[row] == qid):
                continue
            hits[doc_ids[row]] = score
            if len(hits) == top_k:
                break
        run[qid] = hits
    return run


def search_embeddings(
    query_embeddings: np.ndarray,
    doc_embeddings: np.ndarray | None,
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    *,
    top_k: int = 1000,
    index: str | DenseIndex = "flat",
    index_params: dict[str, Any] | None = None,
    ignore_identical_ids: bool = True,
    use_gpu: bool | str = "auto",
    show_progress: bool = False,
) -> dict[str, Any]:
    """Index precomputed document embeddings and search the query embeddings (by inner product; pass
    L2-normalised embeddings for cosine similarity).

    Args:
        index: An index type, or a :class:`~sbmoe.retrieval.index.DenseIndex` already holding ``doc_embeddings`` (then
            ``doc_embeddings`` may be None and ``doc_ids`` come from the index).

    Returns:
        ``{"run": {query id: {doc id: score}}, "timings": {"index_s", "search_s"}, "num_queries", "num_docs",
        "index": {"type", "params"}, "dense_index": DenseIndex}``.
    """
    if len(query_embeddings) != len(query_ids):
        raise ValueError(f"{len(query_embeddings)} query vectors for {len(query_ids)} query ids")
    start = time.perf_counter()
    if isinstance(index, DenseIndex):
        dense = index
    else:
        if len(doc_embeddings) != len(doc_ids):
            raise ValueError(f"{len(doc_embeddings)} document vectors for {len(doc_ids)} document ids")
        dense = build_index(doc_embeddings, doc_ids, index, index_params, use_gpu=use_gpu, show_progress=show_progress)
    indexed = time.perf_counter()
    scores, rows = dense.search(np.asarray(query_embeddings), top_k + int(ignore_identical_ids))
    run = to_run(query_ids, scores, rows, dense.doc_ids, top_k, ignore_identical_ids)
    return {
        "run": run,
        "timings": {"index_s": round(indexed - start, 3), "search_s": round(time.perf_counter() - indexed, 3)},
        "num_queries": len(query_ids),
        "num_docs": len(dense),
        "index": {"type": dense.index_type, "params": dense.params},
        "dense_index": dense,
    }


def evaluate_embeddings(
    query_embeddings: np.ndarray,
    doc_embeddings: np.ndarray | None,
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    qrels: dict[str, dict[str, int]],
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    relevance_level: int = 1,
    **search: Any,
) -> dict[str, Any]:
    """:func:`search_embeddings` (``search`` its keyword arguments), then the run scored against ``qrels``.

    Returns:
        :func:`search_embeddings`' result plus ``metrics`` ({name: mean}), ``per_query`` ({name: {query id:
        value}}) and ``timings["eval_s"]``.
    """
    result = search_embeddings(query_embeddings, doc_embeddings, query_ids, doc_ids, **search)
    start = time.perf_counter()
    result["metrics"], result["per_query"] = score(qrels, result["run"], metrics, relevance_level)
    result["timings"]["eval_s"] = round(time.perf_counter() - start, 3)
    return result


def score(
    qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]], metrics: Sequence[str], relevance_level: int
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """``(mean per metric, {metric: {query id: value}})`` of ``run`` (see :func:`~sbmoe.evaluation.metrics.per_query`;
    a metric's mean is 0.0 when no query is evaluated)."""
    scores = per_query(qrels, run, metrics, relevance_level)
    values = {name: {qid: row[name] for qid, row in scores.items()} for name in metrics}
    means = {name: sum(v.values()) / len(v) if v else 0.0 for name, v in values.items()}
    return means, values


def score_run(
    run: dict[str, dict[str, float]],
    dataset: RetrievalDataset,
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    ignore_identical_ids: bool = True,
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    """Score a run against ``dataset``'s qrels: the dataset part of every evaluation's result.

    Only the dataset's queries count, and a document whose id equals the query id is dropped when
    ``ignore_identical_ids`` (BEIR's default). ``warnings`` (e.g. data validation) come before the coverage ones.

    Raises:
        DataError: no query has a relevant document in the corpus (see :func:`~sbmoe.evaluation.coverage.coverage`).

    Returns:
        ``{"dataset", "split", "num_queries", "judged_queries", "answerable_queries", "num_docs" (None: a run file
        does not say), "relevance_level", "metrics", "per_query", "warnings"}``.
    """
    run = {
        qid: {doc: s for doc, s in hits.items() if not ignore_identical_ids or doc != qid}
        for qid, hits in run.items()
        if qid in dataset.queries
    }
    counts = coverage(dataset, run)
    notes = coverage_warnings(dataset.name, dataset, counts, not ignore_identical_ids)
    for line in notes:
        logger.warning(line)
    means, values = score(dataset.qrels, run, metrics, dataset.relevance_level)
    return {
        "dataset": dataset.name,
        "split": dataset.split,
        "num_queries": len(run),
        "judged_queries": counts["judged"],
        "answerable_queries": counts["answerable"],
        "num_docs": None,
        "relevance_level": dataset.relevance_level,
        "metrics": means,
        "per_query": values,
        "warnings": [*warnings, *notes],
    }


def evaluate_model(
    model: SentenceTransformer,
    dataset: RetrievalDataset | str,
    *,
    top_k: int = 1000,
    index: str = "flat",
    index_params: dict[str, Any] | None = None,
    batch_size: int = 64,
    metrics: Sequence[str] = DEFAULT_METRICS,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    ignore_identical_ids: bool = True,
    use_gpu: bool | str = "auto",
    save_index: str | os.PathLike | None = None,
    model_name: str = "",
    show_progress: bool = True,
) -> dict[str, Any]:
    """Encode ``dataset`` with ``model`` (corpus embeddings cached on disk), index, search, score.

    Args:
        model: Any SentenceTransformer; cosine models' embeddings are L2-normalised before the inner product.
        dataset: A :class:`~sbmoe.data.RetrievalDataset` or a spec for :func:`~sbmoe.data.load_dataset`.
        top_k: Documents retrieved per query.
        index: Index type (``flat`` = exact search).
        index_params: Index parameters (see :class:`~sbmoe.retrieval.index.DenseIndex`).
        batch_size: Encoder batch size.
        metrics: Metric names.
        cache: Reuse and store embeddings in the cache (False: encode into a temporary folder).
        cache_dir: Cache root (default ``$SBMOE_CACHE`` or ``~/.cache/sbmoe``).
        ignore_identical_ids: Drop documents whose id equals the query id (BEIR's default).
        use_gpu: Index on GPU (``"auto"``, True, False).
        save_index: Save the built index to this folder; its manifest keeps ``model_name`` and the fingerprint.
        model_name: How the model was named (``--model``), for the index manifest.
        show_progress: tqdm bars for encoding and indexing.

    Raises:
        DataError: no query has a relevant document in the corpus (see :func:`~sbmoe.evaluation.coverage.coverage`).

    Returns:
        A JSON-ready dict: :func:`score_run`'s (with the data validation warnings), plus ``num_docs``, ``top_k``,
        ``index`` (type and parameters), timings, whether the corpus came from the cache, and expert utilization
        (``None`` for a model without an SB-MoE head).
    """
    if isinstance(dataset, str):
        dataset = load_dataset(dataset)
    started = time.perf_counter()
    coverage(dataset)  # fails before encoding when nothing can be scored
    validation = dataset.validate()
    for warning in validation:
        logger.warning(warning)
    with tempfile.TemporaryDirectory(prefix="sbmoe-enc-") as scratch:
        encoder = Encoder(model, cache_dir if cache else scratch, batch_size, show_progress)
        encode_start = time.perf_counter()
        corpus = encoder.encode(dataset, "corpus")
        encoded = time.perf_counter()
        queries = encoder.encode(list(dataset.queries.values()), "queries")
        queries_encoded = time.perf_counter()
    doc_vectors, query_vectors = corpus.vectors, queries.vectors
    if model.similarity_fn_name == "cosine":
        doc_vectors, query_vectors = unit_rows(doc_vectors), unit_rows(query_vectors)
    searched = search_embeddings(
        query_vectors,
        doc_vectors,
        list(dataset.queries),
        [doc.id for doc in dataset.iter_docs()],
        top_k=top_k,
        index=index,
        index_params=index_params,
        ignore_identical_ids=ignore_identical_ids,
        use_gpu=use_gpu,
        show_progress=show_progress,
    )
    if save_index is not None:
        dense = searched["dense_index"]
        dense.model_name, dense.model_hash = model_name, model_fingerprint(model)
        dense.save(save_index)
    scoring = time.perf_counter()
    result = score_run(
        searched["run"], dataset, metrics=metrics, ignore_identical_ids=ignore_identical_ids, warnings=validation
    )
    utilization = None
    if corpus.routing is not None and queries.routing is not None:
        utilization = {"corpus": corpus.routing.as_dict(), "queries": queries.routing.as_dict()}
    scored = time.perf_counter()
    return {
        **result,
        "num_docs": searched["num_docs"],
        "top_k": top_k,
        "index": searched["index"],
        "timings": {
            "encode_corpus_s": round(encoded - encode_start, 3),  # this run's time (reading the cache, if a hit)
            "encode_queries_s": round(queries_encoded - encoded, 3),
            **searched["timings"],
            "eval_s": round(scored - scoring, 3),
            "total_s": round(time.perf_counter() - started, 3),
        },
        "corpus_from_cache": corpus.cached,
        "utilization": utilization,
    }
