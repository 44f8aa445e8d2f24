"""IVF defaults before and after they scaled with the corpus: SciFact and a 300-document slice, real MiniLM.

    .venv/bin/python experiments/bench_ivf_defaults.py   # writes experiments/results/ivf_defaults.json

Real rows: all-MiniLM-L6-v2 (``build_model("minilm")``) evaluated through ``evaluate_model`` on SciFact
(5,183 documents, 300 test queries) and on a slice of it (the first 40 test queries, their relevant documents and
others up to 300, as ``tests/conftest.py`` builds it): flat, IVF with the old defaults (nlist = min(4 sqrt(n), n / 39),
nprobe = nlist / 8), and IVF with the current defaults (below 16,384 vectors: exact search, recorded as
``fallback=flat``). Synthetic rows: 20k-100k vectors drawn around the SciFact document embeddings (as
``bench_index.py`` draws them), where IVF stays IVF: recall of the top 10/100/1000 against exact search and the share
of lists probed, old against current nprobe. Recall and probed share are deterministic; no timing is measured.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from sbmoe.data import RetrievalDataset, load_dataset  # noqa: E402
from sbmoe.evaluation import evaluate_model  # noqa: E402
from sbmoe.files import write_atomic  # noqa: E402
from sbmoe.model import build_model  # noqa: E402
from sbmoe.retrieval.build import build_index  # noqa: E402
from sbmoe.retrieval.encoder import Encoder, unit_rows  # noqa: E402
from sbmoe.retrieval.ivf import ivf_defaults  # noqa: E402

OUTPUT = REPO / "experiments" / "results" / "ivf_defaults.json"
METRICS = ("nDCG@10", "Recall@100", "Recall@1000")
SYNTHETIC_SIZES = (20_000, 50_000, 100_000)
NOISE = 0.02  # per-dimension noise around a document embedding (bench_index.py's default)


def old_defaults(n: int) -> dict[str, int]:
    """IVF parameters as the defaults gave them before: nlist = min(4 sqrt(n), n / 39), nprobe = nlist / 8."""
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    return {"nlist": nlist, "nprobe": max(1, nlist // 8)}


def slice_of(full: RetrievalDataset, num_queries: int, num_docs: int) -> RetrievalDataset:
    """The first ``num_queries`` queries, their relevant documents, then others in file order up to ``num_docs``."""
    qids = list(full.qrels)[:num_queries]
    relevant = {d for q in qids for d in full.qrels[q]}
    docs = [d for d in full.iter_docs() if d.id in relevant]
    docs += [d for d in full.iter_docs() if d.id not in relevant][: num_docs - len(docs)]
    queries, qrels = {q: full.queries[q] for q in qids}, {q: full.qrels[q] for q in qids}
    return RetrievalDataset(f"{full.name}-{num_queries}q-{num_docs}d", full.split, queries, qrels, lambda: iter(docs))


def real_rows(model: Any, dataset: RetrievalDataset) -> list[dict[str, Any]]:
    """flat, old-default IVF and current-default IVF on ``dataset``: metrics and the parameters the index used."""
    n = sum(1 for _ in dataset.iter_docs())
    rows = []
    for label, index, params in (
        ("flat", "flat", {}),
        ("ivf, old defaults", "ivf", old_defaults(n)),
        ("ivf, current defaults", "ivf", {}),
    ):
        result = evaluate_model(model, dataset, index=index, index_params=params, metrics=METRICS, show_progress=False)
        rows.append(
            {
                "dataset": result["dataset"],
                "docs": result["num_docs"],
                "queries": result["num_queries"],
                "index": label,
                "params": result["index"]["params"],
                **{m: round(result["metrics"][m], 4) for m in METRICS},
            }
        )
        print(json.dumps(rows[-1]))
    return rows


def synthetic(docs: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors: a random document embedding plus N(0, NOISE^2) per dimension, renormalised."""
    rng = np.random.default_rng(seed)
    x = docs[rng.integers(0, len(docs), n)] + NOISE * rng.standard_normal((n, docs.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic_rows(docs: np.ndarray, queries: np.ndarray) -> list[dict[str, Any]]:
    """Recall of the top 10/100/1000 against exact search, old against current nprobe, on one IVF per size."""
    rows = []
    for n in SYNTHETIC_SIZES:
        vectors = synthetic(docs, n)
        exact = build_index(vectors, use_gpu=False, show_progress=False)
        _, truth = exact.search(queries, 1000)
        nlist, nprobe = ivf_defaults(n)
        index = build_index(vectors, None, "ivf", use_gpu=False, show_progress=False)
        assert index.params == {"nlist": nlist, "nprobe": nprobe}, index.params
        for label, probes in (("old", old_defaults(n)["nprobe"]), ("current", nprobe)):
            index.params["nprobe"] = probes
            _, found = index.search(queries, 1000)
            recall = {f"recall@{k}": round(overlap(found, truth, k), 4) for k in (10, 100, 1000)}
            rows.append(
                {
                    "n": n,
                    "nprobe": label,
                    "nlist": nlist,
                    "probes": probes,
                    "probed_share": round(probes / nlist, 3),
                    **recall,
                }
            )
            print(json.dumps(rows[-1]))
    return rows


def overlap(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean share of each query's exact top ``k`` that ``found`` also has in its top ``k``."""
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth, strict=True)]))


def main() -> None:
    """Evaluate the real cases, measure the synthetic ones, write the JSON report."""
    faiss.omp_set_num_threads(1)
    model = build_model("minilm")
    scifact = load_dataset("scifact")
    real = real_rows(model, scifact) + real_rows(model, slice_of(scifact, 40, 300))
    encoder = Encoder(model, show_progress=False)
    docs = unit_rows(encoder.encode(scifact, "corpus").vectors)
    queries = unit_rows(encoder.encode(list(scifact.queries.values()), "queries").vectors)
    report = {
        "command": "python experiments/bench_ivf_defaults.py",
        "model": "all-MiniLM-L6-v2 (minilm, no head), max 256 tokens, cosine",
        "faiss": faiss.__version__,
        "cpus": os.cpu_count(),
        "real": real,
        "synthetic": {"noise_per_dim": NOISE, "queries": len(queries), "rows": synthetic_rows(docs, queries)},
    }
    write_atomic(OUTPUT, json.dumps(report, indent=1) + "\n")
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
