"""int8 encoders on CPU for the fine-tuned MiniLM SB-MoE model: encode speed (interleaved) and SciFact test quality.

Speed: a seeded sample of SciFact documents is encoded by every backbone (fp32 torch, torch dynamic int8, ONNX
Runtime fp32, ONNX Runtime dynamic int8; one thread each) in interleaved rounds; docs/s is reported as the ratio
of medians to fp32 within the same run. Quality: each int8 backbone encodes the full SciFact corpus and test
queries once; its pooled vectors are saved under ``~/.cache/sbmoe/quant`` (bench_quant.py reuses them for the
combined rows), the unchanged head runs after it, and nDCG@10 / Recall@100 are scored with exact search.

Run: ``OMP_NUM_THREADS=1 nice -n 10 python experiments/quant/bench_encoders.py`` (about 40 minutes on a busy
2-core machine). Writes ``experiments/results/quant_encoders.json``; with ``--speed-only --sample 100 --rounds 7``
only the speed rounds, to ``quant_encoder_speed.json`` (which bench_quant.py prefers for the speed column).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sbmoe.data import beir_text, load_dataset
from sbmoe.evaluation.evaluator import evaluate_embeddings
from sbmoe.files import write_atomic
from sbmoe.model import load_model
from sbmoe.quant.encoder import ENCODERS, with_encoder
from sbmoe.retrieval.encoder import Encoder, pooled_model, unit_rows

MODEL = "out/rows/recipe-query-only-routing"
RESULTS = Path(__file__).resolve().parents[1] / "results"
VECTORS = Path.home() / ".cache" / "sbmoe" / "quant"


def pooled(model, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """Pooled backbone vectors (no cache: int8 backbones must not share fp32's cache entry)."""
    return pooled_model(model).encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)


def speed(models: dict, texts: list[str], rounds: int) -> dict:
    """Docs/s of each model over interleaved rounds, and its speed ratio to fp32: the median over rounds of
    (fp32's seconds / its seconds) in the same round, robust to a machine whose load changes between rounds."""
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            pooled(model, texts)
            seconds[name].append(time.perf_counter() - start)
    return {
        name: {
            "docs_per_s": round(len(texts) / statistics.median(s), 2),
            "speed_ratio": round(statistics.median(b / x for b, x in zip(seconds["fp32"], s, strict=True)), 3),
            "seconds": [round(x, 2) for x in s],
        }
        for name, s in seconds.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=300, help="documents in the speed sample")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--encoders", default="torch-int8,onnx-int8", help="int8 backbones scored on the full corpus")
    parser.add_argument("--speed-only", action="store_true", help="only the speed rounds (quant_encoder_speed.json)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset = load_dataset("scifact")
    docs = list(dataset.iter_docs())
    texts = [beir_text(d.title, d.text) for d in docs]
    rng = np.random.default_rng(0)
    sample = [texts[i] for i in rng.choice(len(texts), size=args.sample, replace=False)]
    scratch = Path(tempfile.mkdtemp(prefix="sbmoe-onnx-"))
    models = {n: with_encoder(load_model(MODEL, device="cpu"), n, scratch / n, threads=1) for n in ENCODERS}
    record = {"model": MODEL, "threads": 1, "sample_docs": args.sample, "rounds": args.rounds}
    record["speed"] = speed(models, sample, args.rounds)
    print(json.dumps(record["speed"], indent=1), flush=True)
    if args.speed_only:
        write_atomic(RESULTS / "quant_encoder_speed.json", json.dumps(record, indent=1))
        return
    qids = list(dataset.queries)
    query_texts = list(dataset.queries.values())
    reference = models["fp32"]
    reference_encoder = Encoder(reference, show_progress=False)
    base = reference_encoder.encode(dataset, "corpus")
    base_docs, base_experts = base.vectors, base.experts
    base_queries = reference_encoder.encode(query_texts, "queries").vectors
    quality = {}
    VECTORS.mkdir(parents=True, exist_ok=True)
    for name in ["fp32", *args.encoders.split(",")]:
        model = models[name]
        if name == "fp32":
            doc_emb, doc_experts, query_emb = base_docs, base_experts, base_queries
        else:
            start = time.perf_counter()
            doc_pooled, query_pooled = pooled(model, texts), pooled(model, query_texts)
            np.save(VECTORS / f"scifact_{name}_corpus.npy", doc_pooled)
            np.save(VECTORS / f"scifact_{name}_queries.npy", query_pooled)
            print(f"{name}: encoded in {time.perf_counter() - start:.0f} s", flush=True)
            encoder = Encoder(model)
            tail = encoder.tail(doc_pooled, "document")
            doc_emb, doc_experts = tail.vectors, tail.experts
            query_emb = encoder.tail(query_pooled, "query").vectors
        result = evaluate_embeddings(
            unit_rows(query_emb), unit_rows(doc_emb), qids, [d.id for d in docs], dataset.qrels, top_k=100
        )
        cosine = np.sum(unit_rows(doc_emb) * unit_rows(base_docs), axis=1)
        quality[name] = {
            "metrics": result["metrics"],
            "top_expert_changed": float(np.mean(doc_experts != base_experts)),
            "doc_cosine_to_fp32": {"mean": float(cosine.mean()), "min": float(cosine.min())},
        }
        print(name, json.dumps(quality[name]), flush=True)
    record["quality"] = quality
    write_atomic(RESULTS / "quant_encoders.json", json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
