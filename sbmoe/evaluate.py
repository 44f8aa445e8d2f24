"""Evaluate a model on BEIR folders and ir-datasets ids: encode (cached), index, search, score.

Run ``python -m sbmoe.evaluate --model minilm --datasets scifact`` (``--help`` lists every flag).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sentence_transformers import SentenceTransformer

from sbmoe.backbones import HUB_IDS, OFFLINE_DEFAULT, BackboneUnavailableError
from sbmoe.cache import cached_embeddings, model_fingerprint
from sbmoe.data import DataError, RetrievalDataset, load_dataset
from sbmoe.files import write_atomic
from sbmoe.index import INDEX_TYPES, DenseIndex, IndexLoadError
from sbmoe.metrics import DEFAULT_METRICS, evaluate_run, parse_metric
from sbmoe.model import build_model, load_model

logger = logging.getLogger("sbmoe.evaluate")

TABLE_METRICS = ("nDCG@10", "MAP@100", "MRR@10", "Recall@100", "Recall@1000", "P@1")
PLAIN_SUFFIX = "-plain"


def load_any_model(spec: str, device: str | None = None) -> SentenceTransformer:
    """A model from a name or path.

    Args:
        spec: A backbone name (``minilm``, ``minilm-plain``, ``bert-base``...: the plain backbone, mean pooling,
            normalised, max 256 tokens, no head), a SentenceTransformer folder (a saved sbmoe model keeps its
            head), a plain Hugging Face encoder folder (mean pooling added), or a Hub id of a SentenceTransformer.
        device: torch device; None picks CUDA when available.
    """
    name = spec.removesuffix(PLAIN_SUFFIX)
    path = Path(spec).expanduser()
    if name == OFFLINE_DEFAULT or name in HUB_IDS:
        model = build_model(name, head=False, device=device)
    elif (path / "modules.json").is_file():
        model = load_model(str(path), device=device)
    elif path.is_dir():
        model = build_model(str(path), head=False, device=device)
    elif path.suffix or spec.startswith((".", "/", "~")):
        raise DataError(f"model folder {path} not found")
    else:
        model = load_model(spec, device=device)
    return _cap_length(model)


def _cap_length(model: SentenceTransformer) -> SentenceTransformer:
    """Lower ``max_seq_length`` to the encoder's position limit (small encoders have fewer than 256)."""
    config = getattr(getattr(model[0], "auto_model", None), "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if limit and model.max_seq_length and model.max_seq_length > limit:
        model.max_seq_length = limit
    return model


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
        cache_dir: Cache root (default ``$SBMOE_CACHE`` or ``.cache/sbmoe``).
        ignore_identical_ids: Drop documents whose id equals the query id (BEIR's default).
        use_gpu: Index on GPU (``"auto"``, True, False).
        save_index: Save the built index to this folder; its manifest keeps ``model_name`` and the fingerprint.
        model_name: How the model was named (``--model``), for the index manifest.
        show_progress: tqdm bars for encoding and indexing.

    Returns:
        A JSON-ready dict: dataset, split, counts, metrics, timings, whether the corpus came from the cache,
        expert utilization (``None`` for a model without an SB-MoE head) and data warnings.
    """
    if isinstance(dataset, str):
        dataset = load_dataset(dataset)
    started = time.perf_counter()
    warnings = dataset.validate()
    for warning in warnings:
        logger.warning(warning)
    with tempfile.TemporaryDirectory(prefix="sbmoe-enc-") as scratch:
        where = cache_dir if cache else scratch
        docs, doc_meta = cached_embeddings(model, dataset, "corpus", where, batch_size, show_progress)
        queries, query_meta = cached_embeddings(
            model, list(dataset.queries.values()), "queries", where, batch_size, show_progress=False
        )
        if model.similarity_fn_name == "cosine":
            docs, queries = _unit(docs), _unit(queries)
        doc_ids = [doc.id for doc in dataset.iter_docs()]
        result = evaluate_embeddings(
            queries, docs, list(dataset.queries), doc_ids, dataset.qrels, top_k, index, index_params, metrics,
            dataset.relevance_level, ignore_identical_ids, use_gpu, show_progress,
        )  # fmt: skip
    if save_index is not None:
        result["index"].model_name = model_name
        result["index"].model_hash = doc_meta["model_fingerprint"]
        result["index"].save(save_index)
    utilization = None
    if doc_meta["utilization"] is not None:
        utilization = {"corpus": doc_meta["utilization"], "queries": query_meta["utilization"]}
    return {
        "dataset": dataset.name,
        "split": dataset.split,
        "num_queries": result["num_queries"],
        "num_docs": result["num_docs"],
        "top_k": top_k,
        "index": {"type": result["index"].index_type, "params": result["index"].params},
        "relevance_level": dataset.relevance_level,
        "metrics": result["metrics"],
        "timings": {
            "encode_corpus_s": doc_meta["seconds"],
            "encode_queries_s": query_meta["seconds"],
            **result["timings"],
            "total_s": round(time.perf_counter() - started, 3),
        },
        "corpus_from_cache": doc_meta["cached"],
        "utilization": utilization,
        "warnings": warnings,
    }


def _unit(x: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """Rows scaled to unit length, chunk by chunk (returned as is, e.g. still memory-mapped, when they already are)."""
    norms = np.concatenate([np.linalg.norm(x[i : i + chunk], axis=1) for i in range(0, len(x), chunk)] or [[]])
    if np.allclose(norms, 1.0, atol=1e-4):
        return x
    out = np.empty(x.shape, dtype=np.float32)
    for i in range(0, len(x), chunk):
        out[i : i + chunk] = x[i : i + chunk] / np.maximum(norms[i : i + chunk, None], 1e-12)
    return out


def markdown_table(model: str, results: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the main metrics, one row per dataset."""
    names = [m for m in TABLE_METRICS if all(m in r["metrics"] for r in results)]
    lines = [
        f"| model | dataset | queries | docs | {' | '.join(names)} | encode s | search s |",
        "|---|---|---:|---:|" + "---:|" * len(names) + "---:|---:|",
    ]
    for r in results:
        values = " | ".join(f"{r['metrics'][m]:.4f}" for m in names)
        cached = " (cached)" if r["corpus_from_cache"] else ""
        lines.append(
            f"| {model} | {r['dataset']} ({r['split']}) | {r['num_queries']} | {r['num_docs']} | {values} | "
            f"{r['timings']['encode_corpus_s']:.1f}{cached} | {r['timings']['search_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _index_params(pairs: Sequence[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not value.lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"--index-param {pair!r}: expected KEY=INTEGER, e.g. nprobe=32")
        params[key] = int(value)
    return params


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments of ``python -m sbmoe.evaluate``."""
    parser = argparse.ArgumentParser(prog="python -m sbmoe.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="backbone name (minilm = minilm-plain, no head), "
                        "SentenceTransformer or sbmoe folder, HF encoder folder, or Hub id")  # fmt: skip
    parser.add_argument("--datasets", required=True, help="comma-separated BEIR folder names, paths or irds:<id>")
    parser.add_argument("--data-dir", help="where BEIR folder names live (default $SBMOE_DATA or ../shared/data)")
    parser.add_argument("--split", default="test", help="qrels split of BEIR folders (default: test)")
    parser.add_argument("--index", default="flat", choices=INDEX_TYPES, help="index type (default: flat, exact)")
    parser.add_argument("--index-param", action="append", default=[], metavar="KEY=INT",
                        help="index parameter, repeatable: nprobe=32, ef_search=512, nlist=1024, ...")  # fmt: skip
    parser.add_argument("--top-k", type=int, default=1000, help="documents retrieved per query (default: 1000)")
    parser.add_argument("--batch-size", type=int, default=64, help="encoder batch size (default: 64)")
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated metric names")
    parser.add_argument("--output", help="JSON result path (default runs/evaluate/<model>.json); .md beside it")
    parser.add_argument("--cache-dir", help="embedding cache (default $SBMOE_CACHE or .cache/sbmoe)")
    parser.add_argument("--no-cache", action="store_true", help="encode without reading or writing the cache")
    parser.add_argument("--save-index", metavar="DIR", help="also save each built index to DIR/<dataset>/")
    parser.add_argument("--keep-identical-ids", action="store_true",
                        help="keep documents whose id equals the query id (BEIR drops them by default)")  # fmt: skip
    parser.add_argument("--device", help="torch device (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be >= 1")
    try:
        args.index_params = _index_params(args.index_param)
        DenseIndex(8, args.index, use_gpu=False, **args.index_params)
        args.metric_names = [m.strip() for m in args.metrics.split(",") if m.strip()]
        for name in args.metric_names:
            parse_metric(name)
    except (argparse.ArgumentTypeError, ValueError) as err:
        parser.error(str(err))
    args.dataset_specs = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if not args.dataset_specs:
        parser.error("--datasets is empty")
    return args


def slug(text: str) -> str:
    """A file-name-safe form of a model or dataset name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 data/model error; argparse exits with 2 on bad arguments)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        datasets = [load_dataset(spec, args.split, args.data_dir) for spec in args.dataset_specs]
        model = load_any_model(args.model, args.device)
        results = []
        for dataset in datasets:
            logger.info("evaluating %s on %s (%d queries)", args.model, dataset.name, len(dataset.queries))
            result = evaluate_model(
                model, dataset, args.top_k, args.index, args.index_params, args.batch_size, args.metric_names,
                not args.no_cache, args.cache_dir, not args.keep_identical_ids,
                save_index=Path(args.save_index) / slug(dataset.name) if args.save_index else None,
                model_name=args.model,
                show_progress=not args.quiet,
            )  # fmt: skip
            results.append(result)
            logger.info("%s: %s", dataset.name, json.dumps({k: round(v, 4) for k, v in result["metrics"].items()}))
    except (DataError, BackboneUnavailableError, IndexLoadError, OSError) as err:
        print(f"sbmoe.evaluate: error: {err}", file=sys.stderr)
        return 1
    output = Path(args.output or Path("runs") / "evaluate" / f"{slug(args.model)}.json")
    report = {"model": args.model, "model_fingerprint": model_fingerprint(model), "results": results}
    write_atomic(output, json.dumps(report, indent=1) + "\n")
    write_atomic(output.with_suffix(".md"), markdown_table(args.model, results))
    print(markdown_table(args.model, results), end="")
    print(f"wrote {output} and {output.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
