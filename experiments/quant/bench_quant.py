"""What each compression choice costs on SciFact test, for the fine-tuned MiniLM SB-MoE model (query-only head).

Rows: fp32; the head's experts quantized uniformly (8 / 4 / 3 / 2 bits) and by mixed-precision plans at 3 and 4
average bits (sensitivity x frequency, and the outlier criterion); int8 backbones (from quant_encoders.json);
compressed indexes (SQ8, PQ / OPQ with 48-byte codes, binary; exact re-scoring from memory-mapped float vectors);
and the best combination. Calibration uses SciFact *train* queries and 1,000 sampled documents, never test.
Retrieval is top 100 (nDCG@10 and Recall@100 need no more); re-scored indexes re-score ``rescore x 101``
candidates.

Run: ``OMP_NUM_THREADS=1 nice -n 10 python experiments/quant/bench_quant.py`` after bench_encoders.py (about 15
minutes on a busy 2-core machine; ``--part fp32`` makes the fp32-backbone rows alone, ``--part encoders`` then adds
the int8-backbone rows). Writes ``experiments/results/quant_table.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from sbmoe.data import load_dataset
from sbmoe.evaluation.evaluator import evaluate_embeddings
from sbmoe.files import write_atomic
from sbmoe.model import load_model
from sbmoe.quant import calibrate_head, calibration_vectors, choose_plan, quantize_head
from sbmoe.quant.encoder import export_onnx
from sbmoe.retrieval.build import build_index
from sbmoe.retrieval.cache import cached_embeddings
from sbmoe.retrieval.encoder import Encoder, pooled_model, unit_rows
from sbmoe.retrieval.index import DenseIndex

MODEL = "out/rows/recipe-query-only-routing"
RESULTS = Path(__file__).resolve().parents[1] / "results"
VECTORS = Path.home() / ".cache" / "sbmoe" / "quant"
TOP_K = 100
EXPERT_ROWS = [  # (label, plan arguments)
    ("experts int8", {"bits": 8}),
    ("experts int4 (g128)", {"bits": 4}),
    ("experts int3 (g128)", {"bits": 3}),
    ("experts int2 (g128)", {"bits": 2}),
    ("experts mixed 4 bits (sensitivity x frequency)", {"budget": 4.0}),
    ("experts mixed 3 bits (sensitivity x frequency)", {"budget": 3.0}),
    ("experts mixed 4 bits (outlier)", {"budget": 4.0, "criterion": "outlier"}),
    ("experts mixed 3 bits (outlier)", {"budget": 3.0, "criterion": "outlier"}),
]
INDEXES = [  # (label, type, build parameters, re-score multipliers swept on the built index)
    ("index sq8", "sq8", {}, [None]),
    ("index pq48 (48 B)", "pq", {"pq_m": 48}, [1, 4]),
    ("index opq48 (48 B)", "opq", {"pq_m": 48}, [1, 4]),
    ("index binary (48 B)", "binary", {}, [1, 4]),
]


def speed_ratios() -> dict[str, float]:
    """Encode speed ratio to fp32 per backbone: the median over interleaved rounds of fp32's seconds over its own,
    from quant_encoder_speed.json when it exists (the longer speed-only run), else quant_encoders.json."""
    path = RESULTS / "quant_encoder_speed.json"
    if not path.exists():
        path = RESULTS / "quant_encoders.json"
    speed = json.loads(path.read_text())["speed"]
    base = speed["fp32"]["seconds"]
    return {
        name: statistics.median(b / x for b, x in zip(base, s["seconds"], strict=True)) for name, s in speed.items()
    }


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def tail(model, vectors: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The model's tail on pooled ``vectors``: embeddings and each row's top-1 expert."""
    encoded = Encoder(model).tail(vectors, task)
    return encoded.vectors, encoded.experts


def score(queries: np.ndarray, docs: np.ndarray | DenseIndex, qids: list, dids: list, qrels: dict) -> dict:
    """Metrics and search QPS of unit query vectors against document vectors (flat) or a built index."""
    index = docs if isinstance(docs, DenseIndex) else "flat"
    result = evaluate_embeddings(
        unit_rows(queries),
        None if index != "flat" else unit_rows(docs),
        qids,
        dids,
        qrels,
        top_k=TOP_K,
        index=index,
        use_gpu=False,
    )
    result["qps"] = len(qids) / max(result["timings"]["search_s"], 1e-9)
    return result


def row(label: str, result: dict, base: dict | None, **extra: Any) -> dict:
    metrics = result["metrics"]
    ndcg = metrics["nDCG@10"]
    return {
        "setting": label,
        "ndcg@10": round(ndcg, 4),
        "delta_points": None if base is None else round(100 * (ndcg - base["metrics"]["nDCG@10"]), 2),
        "recall@100": round(metrics["Recall@100"], 4),
        "search_qps": round(result["qps"]),
        **extra,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part",
        choices=("all", "fp32", "encoders"),
        default="all",
        help="fp32: the fp32-backbone rows; encoders: add the int8-backbone rows to an earlier table",
    )
    part = parser.parse_args().part
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    dataset = load_dataset("scifact")
    qids, query_texts = list(dataset.queries), list(dataset.queries.values())
    docs = list(dataset.iter_docs())
    dids = [d.id for d in docs]
    model = load_model(MODEL, device="cpu")
    scratch = Path(tempfile.mkdtemp(prefix="sbmoe-quant-"))
    model.save(str(scratch / "fp32"))
    head_dir = next((scratch / "fp32").glob("2_*"))
    fp32_head = folder_bytes(head_dir)
    backbone = folder_bytes(scratch / "fp32") - fp32_head
    pooled_docs = np.asarray(cached_embeddings(pooled_model(model), dataset, "corpus", show_progress=False)[0])
    doc_vectors, doc_experts = tail(model, pooled_docs, "document")
    pooled_queries = Encoder(model).pooled(query_texts, "queries").numpy()
    query_vectors, query_experts = tail(model, pooled_queries, "query")
    base = score(query_vectors, doc_vectors, qids, dids, dataset.qrels)
    common = {"index_ram_b_per_doc": 1536, "index_disk_b_per_doc": 1536, "encode_speed_ratio": 1.0}
    rows = [
        row(
            "fp32",
            base,
            None,
            model_bytes=backbone + fp32_head,
            head_bytes=fp32_head,
            **common,
            docs_top_expert_changed=0.0,
            queries_top_expert_changed=0.0,
        ),
    ]

    table = RESULTS / "quant_table.json"
    if part == "encoders":  # keep the fp32-backbone rows of an earlier run
        earlier = json.loads(table.read_text())
        rows = [r for r in earlier["rows"] if not r["setting"].startswith(("encoder ", "combined"))]
        plans = earlier["plans"]
        head_sizes = {r["setting"]: r["head_bytes"] for r in rows}
    else:
        calibration = calibration_vectors(model, "scifact:train", corpus_sample=1000)
        stats = calibrate_head(model, calibration)
        plans, head_sizes = {}, {}
        for label, arguments in EXPERT_ROWS:
            plan = choose_plan(stats, **arguments)
            plans[label] = plan
            quantized = quantize_head(load_model(MODEL, device="cpu"), plan)
            quantized.save(str(scratch / "q"))
            head_bytes = head_sizes[label] = folder_bytes(next((scratch / "q").glob("2_*")))
            q_queries, q_experts = tail(quantized, pooled_queries, "query")
            q_docs, d_experts = tail(quantized, pooled_docs, "document")
            result = score(q_queries, q_docs, qids, dids, dataset.qrels)
            rows.append(
                row(
                    label,
                    result,
                    base,
                    model_bytes=backbone + head_bytes,
                    head_bytes=head_bytes,
                    **common,
                    average_bits=round(plan["average_bits"], 3),
                    docs_top_expert_changed=float(np.mean(d_experts != doc_experts)),
                    queries_top_expert_changed=float(np.mean(q_experts != query_experts)),
                )
            )
            print(rows[-1], flush=True)

        for label, index_type, params, rescores in INDEXES:
            rows += index_rows(
                label,
                index_type,
                params,
                rescores,
                query_vectors,
                doc_vectors,
                qids,
                dids,
                dataset,
                base,
                scratch,
                backbone + fp32_head,
                fp32_head,
            )
            print(rows[-len(rescores) :], flush=True)

    if part == "fp32":
        write_record(rows, plans)
        return
    encoder_file = RESULTS / "quant_encoders.json"
    encoders = json.loads(encoder_file.read_text()) if encoder_file.exists() else None
    sizes = {"torch-int8": None, "onnx-int8": None}
    if encoders:
        ratios = speed_ratios()
        q8 = load_model(MODEL, device="cpu")
        torch.ao.quantization.quantize_dynamic(q8[0].model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
        torch.save(q8[0].model.state_dict(), scratch / "torch_int8.pt")
        sizes["torch-int8"] = (scratch / "torch_int8.pt").stat().st_size
        sizes["onnx-int8"] = export_onnx(load_model(MODEL, device="cpu"), scratch / "onnx", int8=True).stat().st_size
        for name in encoders["quality"]:
            if name == "fp32" or not (VECTORS / f"scifact_{name}_corpus.npy").exists():
                continue
            e_docs, e_doc_experts = tail(model, np.load(VECTORS / f"scifact_{name}_corpus.npy"), "document")
            e_queries, e_query_experts = tail(model, np.load(VECTORS / f"scifact_{name}_queries.npy"), "query")
            result = score(e_queries, e_docs, qids, dids, dataset.qrels)
            rows.append(
                row(
                    f"encoder {name}",
                    result,
                    base,
                    model_bytes=sizes[name] + fp32_head,
                    head_bytes=fp32_head,
                    index_ram_b_per_doc=1536,
                    index_disk_b_per_doc=1536,
                    encode_speed_ratio=round(ratios[name], 3),
                    docs_top_expert_changed=float(np.mean(e_doc_experts != doc_experts)),
                    queries_top_expert_changed=float(np.mean(e_query_experts != query_experts)),
                )
            )
            print(rows[-1], flush=True)

    ready = [n for n in ("onnx-int8", "torch-int8") if sizes[n] and (VECTORS / f"scifact_{n}_corpus.npy").exists()]
    best = ready[0] if ready else None
    if best is not None:
        plan = "experts mixed 4 bits (sensitivity x frequency)"
        quantized = quantize_head(load_model(MODEL, device="cpu"), plans[plan])
        c_docs, c_doc_experts = tail(quantized, np.load(VECTORS / f"scifact_{best}_corpus.npy"), "document")
        c_queries, c_query_experts = tail(quantized, np.load(VECTORS / f"scifact_{best}_queries.npy"), "query")
        label = f"combined: encoder {best} + {plan} + opq48 (48 B)"
        rows += index_rows(
            label,
            "opq",
            {"pq_m": 48},
            [4],
            c_queries,
            c_docs,
            qids,
            dids,
            dataset,
            base,
            scratch,
            sizes[best] + head_sizes[plan],
            head_sizes[plan],
            encode_speed_ratio=round(ratios[best], 3),
            docs_top_expert_changed=float(np.mean(c_doc_experts != doc_experts)),
            queries_top_expert_changed=float(np.mean(c_query_experts != query_experts)),
        )
        print(rows[-1], flush=True)

    write_record(rows, plans)


def write_record(rows: list[dict], plans: dict) -> None:
    record = {"model": MODEL, "dataset": "scifact test", "top_k": TOP_K, "threads": 1, "rows": rows, "plans": plans}
    write_atomic(RESULTS / "quant_table.json", json.dumps(record, indent=1))
    write_atomic(RESULTS / "quant_table.md", markdown(rows))


def index_rows(
    label,
    index_type,
    params,
    rescores,
    queries,
    docs,
    qids,
    dids,
    dataset,
    base,
    scratch,
    model_bytes,
    head_bytes,
    **extra,
):
    """Build, save and reload (vectors memory-mapped) an index; score it at each re-score multiplier and measure
    its bytes per document: RAM (codes; codebooks apart) and disk (the index folder, float vectors included)."""
    built = build_index(unit_rows(docs), dids, index_type, params, use_gpu=False, show_progress=False)
    folder = built.save(scratch / f"index-{index_type}")
    loaded = DenseIndex.load(folder, use_gpu=False)
    sizes = loaded.bytes_per_vector()
    ram = sizes["code"] or sizes["index"]
    rows = []
    for rescore in rescores:
        name = label
        if rescore is not None:
            loaded.params["rescore"] = rescore
            name += f", re-score top {rescore * (TOP_K + 1)}"
        result = score(queries, loaded, qids, dids, dataset.qrels)
        rows.append(
            row(
                name,
                result,
                base,
                model_bytes=model_bytes,
                head_bytes=head_bytes,
                index_ram_b_per_doc=round(ram, 1),
                index_ram_fixed_b_per_doc=round(sizes["index"] - ram, 1),
                index_disk_b_per_doc=round(folder_bytes(folder) / len(loaded), 1),
                **{
                    "encode_speed_ratio": 1.0,
                    "docs_top_expert_changed": 0.0,
                    "queries_top_expert_changed": 0.0,
                    **extra,
                },
            )
        )
    return rows


def markdown(rows: list[dict]) -> str:
    head = (
        "| setting | nDCG@10 | delta (points) | Recall@100 | model MB | head KB | index RAM B/doc | "
        "index disk B/doc | encode speed x | search QPS | docs' top expert changed | queries' changed |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        delta = "" if r["delta_points"] is None else f"{r['delta_points']:+.2f}"
        ram = f"{r['index_ram_b_per_doc']:g}"
        if r.get("index_ram_fixed_b_per_doc"):
            ram += f" (+{r['index_ram_fixed_b_per_doc']:g} codebooks)"
        lines.append(
            f"| {r['setting']} | {r['ndcg@10']:.4f} | {delta} | {r['recall@100']:.4f} | {r['model_bytes'] / 1e6:.1f} "
            f"| {r['head_bytes'] / 1e3:.0f} | {ram} | {r['index_disk_b_per_doc']:g} | {r['encode_speed_ratio']:.2f} "
            f"| {r['search_qps']} | {r['docs_top_expert_changed']:.1%} | {r['queries_top_expert_changed']:.1%} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
