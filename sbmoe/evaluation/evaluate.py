"""Evaluate a model on BEIR folders and ir-datasets ids: encode (cached, then the head), index, search, score."""

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
from sbmoe.evaluation.metrics import DEFAULT_METRICS, evaluate_run
from sbmoe.retrieval.cache import model_fingerprint
from sbmoe.retrieval.encode import encode_cached, unit_rows
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


def evaluate_embeddings(
    query_embeddings: np.ndarray,
    doc_embeddings: np.ndarray | None,
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    qrels: dict[str, dict[str, int]],
    top_k: int = 1000,
    index: str | DenseIndex = "flat",
    index_params: dict[str, Any] | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    relevance_level: int = 1,
    ignore_identical_ids: bool = True,
    use_gpu: bool | str = "auto",
    show_progress: bool = False,
) -> dict[str, Any]:
    """Index precomputed document embeddings, search the query embeddings, and score the run.

    Embeddings are compared by inner product; pass L2-normalised ones for cosine similarity.

    Args:
        index: An index type, or a :class:`~sbmoe.index.DenseIndex` already holding ``doc_embeddings`` (then
            ``doc_embeddings`` may be None and ``doc_ids`` come from the index).

    Returns:
        ``{"metrics": {name: mean}, "timings": {"index_s", "search_s", "eval_s"}, "num_queries", "num_docs",
        "index": DenseIndex, "run": {query id: {doc id: score}}}``.
    """
    if len(query_embeddings) != len(query_ids):
        raise ValueError(f"{len(query_embeddings)} query vectors for {len(query_ids)} query ids")
    start = time.perf_counter()
    if isinstance(index, DenseIndex):
        dense = index
    else:
        if len(doc_embeddings) != len(doc_ids):
            raise ValueError(f"{len(doc_embeddings)} document vectors for {len(doc_ids)} document ids")
        dense = DenseIndex(doc_embeddings.shape[1], index, use_gpu=use_gpu, **(index_params or {}))
        dense.build(doc_embeddings, list(doc_ids), show_progress=show_progress)
    indexed = time.perf_counter()
    scores, rows = dense.search(np.asarray(query_embeddings), top_k + int(ignore_identical_ids))
    run = to_run(query_ids, scores, rows, dense.doc_ids, top_k, ignore_identical_ids)
    searched = time.perf_counter()
    means = evaluate_run(qrels, run, metrics, relevance_level)
    return {
        "metrics": means,
        "timings": {
            "index_s": round(indexed - start, 3),
            "search_s": round(searched - indexed, 3),
            "eval_s": round(time.perf_counter() - searched, 3),
        },
        "num_queries": len(query_ids),
        "num_docs": len(dense),
        "index": dense,
        "run": run,
    }


def evaluate_model(
    model: SentenceTransformer,
    dataset: RetrievalDataset | str,
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
        index_params: Index parameters (see :class:`~sbmoe.index.DenseIndex`).
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
        A JSON-ready dict: dataset, split, counts (queries scored, judged, and scored with a relevant document in
        the corpus), metrics, timings, whether the corpus came from the cache,
        expert utilization (``None`` for a model without an SB-MoE head) and data warnings.
    """
    if isinstance(dataset, str):
        dataset = load_dataset(dataset)
    started = time.perf_counter()
    counts = coverage(dataset)
    warnings = dataset.validate() + coverage_warnings(dataset.name, dataset, counts, not ignore_identical_ids)
    for warning in warnings:
        logger.warning(warning)
    with tempfile.TemporaryDirectory(prefix="sbmoe-enc-") as scratch:
        where = cache_dir if cache else scratch
        encode_start = time.perf_counter()
        docs, doc_meta = encode_cached(model, dataset, "corpus", where, batch_size, show_progress)
        encoded = time.perf_counter()
        queries, query_meta = encode_cached(
            model, list(dataset.queries.values()), "queries", where, batch_size, show_progress
        )
        queries_encoded = time.perf_counter()
        if model.similarity_fn_name == "cosine":
            docs, queries = unit_rows(docs), unit_rows(queries)
        doc_ids = [doc.id for doc in dataset.iter_docs()]
        result = evaluate_embeddings(
            queries, docs, list(dataset.queries), doc_ids, dataset.qrels, top_k, index, index_params, metrics,
            dataset.relevance_level, ignore_identical_ids, use_gpu, show_progress,
        )  # fmt: skip
    if save_index is not None:
        result["index"].model_name = model_name
        result["index"].model_hash = model_fingerprint(model)
        result["index"].save(save_index)
    utilization = None
    if doc_meta["utilization"] is not None:
        utilization = {"corpus": doc_meta["utilization"], "queries": query_meta["utilization"]}
    return {
        "dataset": dataset.name,
        "split": dataset.split,
        "num_queries": result["num_queries"],
        "judged_queries": counts["judged"],
        "answerable_queries": counts["answerable"],
        "num_docs": result["num_docs"],
        "top_k": top_k,
        "index": {"type": result["index"].index_type, "params": result["index"].params},
        "relevance_level": dataset.relevance_level,
        "metrics": result["metrics"],
        "timings": {
            "encode_corpus_s": round(encoded - encode_start, 3),  # this run's time (reading the cache, if a hit)
            "encode_queries_s": round(queries_encoded - encoded, 3),
            **result["timings"],
            "total_s": round(time.perf_counter() - started, 3),
        },
        "corpus_from_cache": doc_meta["cached"],
        "utilization": utilization,
        "warnings": warnings,
    }


