"""Index benchmark: recall@100 against flat, QPS, bytes per vector, and sbmoe's search overhead over raw faiss.

Two collections: SciFact's 5,183 MiniLM document embeddings, and >= 200k synthetic vectors drawn as a mixture
centred on those embeddings (a document embedding plus Gaussian noise, renormalised), so the synthetic set keeps
the neighbour structure of real embeddings. Queries are SciFact's real queries (test + train, 1,109; the first
300 on the synthetic set). Search-time settings (HNSW ef_search, IVF nprobe) are swept on one built index.

Run: ``python experiments/bench_index.py`` (about 10 minutes on 2 cores). Writes
``experiments/results/bench_index.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from sbmoe.data import load_dataset
from sbmoe.files import write_atomic
from sbmoe.model import build_model
from sbmoe.retrieval.build import build_index
from sbmoe.retrieval.encoder import Encoder
from sbmoe.retrieval.index import DenseIndex
from sbmoe.retrieval.rescore import binary_codes

K = 100
RESULTS = Path(__file__).resolve().parent / "results"


def configs(n: int) -> list[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """(type, build parameters, search settings to sweep on the built index) for ``n`` vectors."""
    nlist = 1024 if n > 100_000 else max(1, min(int(4 * np.sqrt(n)), n // 39))
    probes = [{"nprobe": max(1, nlist // div)} for div in (16, 8, 4, 2)] + [{"nprobe": nlist * 3 // 4}]
    return [
        ("flat", {}, [{}]),
        ("hnsw", {"hnsw_m": 16, "ef_construction": 100}, [{"ef_search": ef} for ef in (128, 256, 512, 1024)]),
        ("ivf", {"nlist": nlist}, probes),
        ("ivfpq", {"nlist": nlist, "pq_m": 48, "pq_bits": 8}, probes[1:3]),
        ("sq8", {}, [{}]),
        ("binary", {"rescore": 10}, [{}]),
    ]


def synthetic(docs: np.ndarray, n: int, noise: float, seed: int = 0) -> tuple[np.ndarray, float]:
    """``n`` vectors: a random document embedding plus N(0, noise^2) per dimension, renormalised.

    Returns:
        The vectors and their mean cosine to the document they were drawn around.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((n, docs.shape[1]), dtype=np.float32)
    cosines = []
    for start in range(0, n, 50_000):
        size = min(50_000, n - start)
        centres = docs[rng.integers(0, len(docs), size)]
        chunk = centres + noise * rng.standard_normal((size, docs.shape[1]))
        out[start : start + size] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
        cosines.append(np.sum(out[start : start + size] * centres, axis=1).mean())
    return out, float(np.mean(cosines))


def raw_search(index: DenseIndex, queries: np.ndarray, k: int) -> Any:
    """The same search through faiss directly (binary: Hamming candidates, then faiss's exact re-scoring)."""
    if index.index_type != "binary":
        return index.faiss_index.search(queries, k)
    candidates = k * index.params["rescore"]
    _, cand = index.faiss_index.codes.search(binary_codes(queries), candidates)
    vectors = np.ascontiguousarray(index.faiss_index.vectors)
    scores, ids = np.empty((len(queries), k), dtype=np.float32), np.empty((len(queries), k), dtype=np.int64)
    ptr = faiss.swig_ptr
    faiss.knn_inner_products_by_idx(
        ptr(queries),
        ptr(vectors),
        ptr(cand),
        index.dim,
        len(queries),
        len(vectors),
        candidates,
        k,
        ptr(scores),
        ptr(ids),
        candidates,
    )
    return scores, ids


def timed_pair(index: DenseIndex, queries: np.ndarray, repeats: int) -> dict[str, float]:
    """QPS of sbmoe's search and of raw faiss, interleaved (order alternating), compared by per-round ratios."""
    ours, raw, ratios = [], [], []
    for r in range(repeats):
        times = {}
        for name in ("ours", "raw") if r % 2 == 0 else ("raw", "ours"):
            start = time.perf_counter()
            index.search(queries, K) if name == "ours" else raw_search(index, queries, K)
            times[name] = time.perf_counter() - start
        ours.append(len(queries) / times["ours"])
        raw.append(len(queries) / times["raw"])
        ratios.append(times["raw"] / times["ours"])
    return {
        "qps": round(statistics.median(ours), 1),
        "raw_faiss_qps": round(statistics.median(raw), 1),
        "ratio_vs_raw_faiss": round(statistics.median(ratios), 3),
    }


def bench(name: str, docs: np.ndarray, queries: np.ndarray, repeats: int) -> list[dict[str, Any]]:
    """Every config on one collection; recall@100 is measured against the flat index's top 100."""
    rows, truth = [], None
    for index_type, build_params, settings in configs(len(docs)):
        start = time.perf_counter()
        index = build_index(docs, None, index_type, build_params, use_gpu="auto", show_progress=False)
        build_s = time.perf_counter() - start
        sizes = index.bytes_per_vector()
        for setting in settings:
            index.params.update(setting)  # search-time settings (ef_search, nprobe) need no rebuild
            _, ids = index.search(queries, K)
            if truth is None:
                truth = ids
            recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, truth, strict=True)]))
            row = {
                "collection": name,
                "n": len(docs),
                "type": index_type,
                "params": dict(index.params),
                "recall@100": round(recall, 4),
                "build_s": round(build_s, 2),
                **timed_pair(index, queries, repeats),
                "bytes_per_vector": round(sizes["index"], 1),
                "rescore_bytes_per_vector": sizes["rescore"],
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(report: dict[str, Any]) -> str:
    """The result table in markdown."""
    lines = [
        f"# Index benchmark ({report['machine']['cpus']} CPUs, {report['machine']['faiss_threads']} faiss thread(s), "
        f"faiss {report['machine']['faiss']}, k = {K})",
        "",
        f"Load average before/after: {report['machine']['load_before']} / {report['machine']['load_after']} "
        "(other engineers share these cores: QPS are noisy; the sbmoe/raw ratio is measured in interleaved rounds).",
        "",
        "| collection | n | type | params | recall@100 | QPS | raw faiss QPS | ratio | bytes/vec | build s |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        size = f"{r['bytes_per_vector']:.0f}"
        if r["rescore_bytes_per_vector"]:
            size += f" + {r['rescore_bytes_per_vector']:.0f}"
        lines.append(
            f"| {r['collection']} | {r['n']} | {r['type']} | {params} | {r['recall@100']:.4f} | {r['qps']:.0f} | "
            f"{r['raw_faiss_qps']:.0f} | {r['ratio_vs_raw_faiss']:.2f} | {size} | {r['build_s']:.1f} |"
        )
    lines += ["", *report["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Encode (or read cached) SciFact embeddings, build the synthetic set, measure, write JSON and markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", type=int, default=200_000, help="synthetic collection size")
    parser.add_argument("--noise", type=float, default=0.02, help="per-dimension noise around each document")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds per index")
    parser.add_argument("--synthetic-queries", type=int, default=300, help="queries used on the synthetic set")
    parser.add_argument("--threads", type=int, default=1, help="faiss threads (1: steady on a shared machine)")
    parser.add_argument("--output", default=str(RESULTS / "bench_index.json"))
    args = parser.parse_args()
    load_before = os.getloadavg()
    faiss.omp_set_num_threads(args.threads)
    model = build_model("minilm")
    test, train = load_dataset("scifact"), load_dataset("scifact", split="train")
    encoder = Encoder(model)
    docs = encoder.encode(test, "corpus").vectors
    queries = np.concatenate([encoder.encode(list(ds.queries.values()), "queries").vectors for ds in (test, train)])
    synth, cos_to_centre = synthetic(np.asarray(docs), args.synthetic, args.noise)
    rows = bench("scifact", np.asarray(docs), queries, args.repeats)
    rows += bench(f"synthetic-{args.synthetic // 1000}k", synth, queries[: args.synthetic_queries], args.repeats)
    report = {
        "k": K,
        "queries": {"scifact": len(queries), "synthetic": min(len(queries), args.synthetic_queries)},
        "synthetic": {"n": args.synthetic, "noise_per_dim": args.noise, "mean_cos_to_centre": round(cos_to_centre, 4)},
        "machine": {
            "cpus": os.cpu_count(),
            "faiss": faiss.__version__,
            "faiss_threads": faiss.omp_get_max_threads(),
            "python": platform.python_version(),
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()],
        },
        "notes": [
            "- recall@100: overlap of each index's top 100 with the flat (exact) top 100, averaged over queries.",
            "- ratio: raw faiss time / sbmoe time for the same index and queries (1.0 = no overhead), median of "
            "interleaved rounds. For binary, raw faiss makes the same calls: Hamming candidates, exact re-scoring.",
            "- bytes/vec: the serialized faiss index per vector; binary also keeps 4 x dim bytes of floats for "
            "re-scoring (memory-mapped after load).",
        ],
        "rows": rows,
    }
    output = Path(args.output)
    write_atomic(output, json.dumps(report, indent=1) + "\n")
    write_atomic(output.with_suffix(".md"), markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
