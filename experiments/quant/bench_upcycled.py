"""Quantizing the upcycled experts: SciFact test for the MiniLM-L3 model with MoE layers in every encoder layer.

This model encodes about 10 documents/s on one thread here, so the corpus is cut to ``--docs`` documents: every
document judged relevant to a test query, plus a fixed random sample of the others (seed 0); all 300 test queries.

Rows: fp32; every expert linear of the three upcycled layers (8 experts each; routers stay float) at int8, int4,
int3 (uniform, groups of 128) and by mixed-precision plans at 4 and 3 average bits (calibrated output error x
tokens routed). Calibration uses SciFact *train* queries and ``--corpus-sample`` sampled documents, never test.
Each variant is saved with ``quantize_model`` and reloaded through ``load_model`` before it encodes (so the rows
measure the packed files users get). Document vectors are cached per variant under ~/.cache/sbmoe/quant.

Run: ``OMP_NUM_THREADS=1 nice -n 10 python experiments/quant/bench_upcycled.py`` with the model in
``out/quant/upcycled-l3``. Writes ``experiments/results/quant_upcycled.json`` and adds its rows to
``quant_table.json`` / ``.md``. ``--docs 5183 --rows 3`` (the whole corpus; fp32, mixed and uniform 3 bits) writes
``quant_upcycled_5183docs.json`` only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import faiss
import numpy as np
import torch

from sbmoe.data import load_dataset
from sbmoe.data.dataset import beir_text
from sbmoe.evaluation.evaluator import evaluate_embeddings
from sbmoe.evaluation.metrics import per_query as query_scores
from sbmoe.evaluation.significance import paired_test
from sbmoe.files import write_atomic
from sbmoe.model import load_model
from sbmoe.quant.linear import expert_linears
from sbmoe.quant.recipe import calibrate_model, choose_plan, quantize_model

RESULTS = Path(__file__).resolve().parents[1] / "results"
VECTORS = Path.home() / ".cache" / "sbmoe" / "quant"
ROWS = [  # (label, plan arguments; None: fp32), the mixed vs uniform pairs first
    ("upcycled L3: fp32", None),
    ("upcycled L3: experts mixed 3 bits (sensitivity x frequency)", {"budget": 3.0}),
    ("upcycled L3: experts int3 (g128)", {"bits": 3}),
    ("upcycled L3: experts mixed 4 bits (sensitivity x frequency)", {"budget": 4.0}),
    ("upcycled L3: experts int4 (g128)", {"bits": 4}),
    ("upcycled L3: experts int8", {"bits": 8}),
]
DEFAULT_DOCS = 1000
MARK = "<!-- upcycled rows (experiments/quant/bench_upcycled.py) -->"


def sub_corpus(docs: list, qrels: dict[str, dict[str, int]], size: int) -> list:
    """Every document judged relevant, then a seeded random sample of the others, ``size`` in all (file order)."""
    relevant = {d for judged in qrels.values() for d, grade in judged.items() if grade > 0}
    others = [i for i, d in enumerate(docs) if d.id not in relevant]
    rng = np.random.default_rng(0)
    extra = rng.choice(len(others), size=min(len(others), max(0, size - len(relevant))), replace=False)
    keep = {i for i, d in enumerate(docs) if d.id in relevant} | {others[j] for j in extra}
    return [docs[i] for i in sorted(keep)]


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def expert_bytes(model: torch.nn.Module) -> int:
    """Bytes of the expert linears' tensors as stored (packed codes, fp16 scales, float biases; fp32 weights)."""
    names = {name for name, _ in expert_linears(model)}
    return sum(t.numel() * t.element_size() for key, t in model.state_dict().items() if key.rsplit(".", 1)[0] in names)


def encode(model, tag: str, queries: list[str], docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Unit query and document vectors, the documents cached under ``VECTORS``."""
    path = VECTORS / f"upcycled_l3_{len(docs)}_{tag}_corpus.npy"
    if path.exists():
        doc_vectors = np.load(path)
    else:
        doc_vectors = model.encode_document(docs, batch_size=32, convert_to_numpy=True)
        VECTORS.mkdir(parents=True, exist_ok=True)
        np.save(path, doc_vectors)
    return model.encode_query(queries, batch_size=32, convert_to_numpy=True), doc_vectors


def markdown(rows: list[dict], corpus: str) -> str:
    title = f"### Upcycled MiniLM-L3 (MoE in all 3 encoder layers, E=8, top-2; {rows[0]['max_seq_length']} tokens)"
    header = "| setting | avg bits | nDCG@10 | delta | Recall@100 | doc cos. to fp32 | model bytes | expert bytes |"
    note = f"{corpus}; delta in nDCG@10 points against fp32."
    lines = [MARK, "", title, "", note, "", header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        delta = "-" if r["delta_points"] is None else f"{r['delta_points']:+.2f}"
        lines.append(
            f"| {r['setting']} | {r['average_bits']} | {r['ndcg@10']:.4f} | {delta} | {r['recall@100']:.4f} "
            f"| {r['doc_cosine_to_fp32']:.5f} | {r['model_bytes']:,} | {r['expert_bytes']:,} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="out/quant/upcycled-l3")
    parser.add_argument("--corpus-sample", type=int, default=200, help="calibration documents (scifact:train)")
    parser.add_argument("--docs", type=int, default=DEFAULT_DOCS, help="SciFact documents searched")
    parser.add_argument("--rows", type=int, default=len(ROWS), help="the first N rows only (fp32, then the pairs)")
    parser.add_argument("--report", action="store_true", help="only rewrite the tables from quant_upcycled.json")
    cli = parser.parse_args()
    if cli.report:
        record = json.loads((RESULTS / "quant_upcycled.json").read_text())
        write_tables(record["rows"], record["corpus"])
        return
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    dataset = load_dataset("scifact")
    qids, queries = list(dataset.queries), list(dataset.queries.values())
    docs = sub_corpus(list(dataset.iter_docs()), dataset.qrels, cli.docs)
    dids, texts = [d.id for d in docs], [beir_text(d.title, d.text) for d in docs]
    scratch = Path(tempfile.mkdtemp(prefix="sbmoe-upq-"))
    stats = calibrate_model(load_model(cli.model, device="cpu"), "scifact:train", cli.corpus_sample)
    rows, plans, base, per_query = [], {}, None, {}
    for label, arguments in ROWS[: cli.rows]:
        model = load_model(cli.model, device="cpu")
        if arguments is not None:
            plans[label] = plan = choose_plan(stats, **arguments)
            quantize_model(model, plan).save(str(scratch / "q"))
            model = load_model(str(scratch / "q"), device="cpu")
        else:
            model.save(str(scratch / "q"))
        tag = "fp32" if arguments is None else "_".join(f"{k}{v}" for k, v in arguments.items())
        q, d = encode(model, tag, queries, texts)
        result = evaluate_embeddings(q, d, qids, dids, dataset.qrels, top_k=100, use_gpu=False)
        ndcg = result["metrics"]["nDCG@10"]
        per_query[label] = {q: v["nDCG@10"] for q, v in query_scores(dataset.qrels, result["run"]).items()}
        if base is None:
            base, base_docs = ndcg, d
        rows.append(
            {
                "setting": label,
                "average_bits": 32 if arguments is None else round(plans[label]["average_bits"], 3),
                "ndcg@10": round(ndcg, 4),
                "delta_points": None if arguments is None else round(100 * (ndcg - base), 2),
                "recall@100": round(result["metrics"]["Recall@100"], 4),
                "doc_cosine_to_fp32": round(float(np.mean(np.sum(unit(d) * unit(base_docs), axis=1))), 5),
                "model_bytes": folder_bytes(scratch / "q"),
                "expert_bytes": expert_bytes(model),
                "max_seq_length": model.max_seq_length,
            }
        )
        print(rows[-1], flush=True)
        shutil.rmtree(scratch / "q")
        write_record(cli, rows, plans, len(docs), per_query)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_record(
    cli: argparse.Namespace, rows: list[dict], plans: dict, docs: int, per_query: dict[str, dict[str, float]]
) -> None:
    """Write quant_upcycled.json (after every row, so an interrupted run keeps what it measured) and the tables;
    with the paired test (per-query nDCG@10) of each mixed plan against uniform bits at the same budget."""
    pairs = {}
    for bits in (3, 4):
        mixed, uniform = (next((r for r in per_query if key in r), None) for key in (f"mixed {bits}", f"int{bits}"))
        if mixed and uniform:
            pairs[f"mixed {bits} - uniform {bits}"] = paired_test(per_query[mixed], per_query[uniform])
    bits_by_layer = {
        label: {
            str(layer): sorted(p["bits"] for n, p in plan["linears"].items() if f".layer.{layer}." in n)
            for layer in range(3)
        }
        for label, plan in plans.items()
        if "mixed" in label
    }
    record = {
        "model": cli.model,
        "calibration": f"scifact:train, {cli.corpus_sample} docs",
        "corpus": f"300 SciFact test queries, {docs} of its documents (all judged relevant, random others)",
        "rows": rows,
        "mixed_vs_uniform_ndcg@10": pairs,
        "mixed_bits_by_layer": bits_by_layer,
        "plans": plans,
    }
    if cli.docs != DEFAULT_DOCS:  # another corpus size: its own file, the tables keep the default run's rows
        write_atomic(RESULTS / f"quant_upcycled_{cli.docs}docs.json", json.dumps(record, indent=1))
        return
    write_atomic(RESULTS / "quant_upcycled.json", json.dumps(record, indent=1))
    write_tables(rows, record["corpus"])


def write_tables(rows: list[dict], corpus: str) -> None:
    """Put the rows into quant_table.json (``upcycled_rows``) and under their own heading in quant_table.md."""
    table = json.loads((RESULTS / "quant_table.json").read_text())
    table["upcycled_rows"] = rows
    write_atomic(RESULTS / "quant_table.json", json.dumps(table, indent=1))
    md = (RESULTS / "quant_table.md").read_text()
    md = md.split(MARK)[0].rstrip() + "\n\n" + markdown(rows, corpus)
    write_atomic(RESULTS / "quant_table.md", md)


if __name__ == "__main__":
    main()
