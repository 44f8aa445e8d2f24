"""The harness end to end: BEIR agreement, the CLI, caching, utilization, irds datasets, bad arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from beir.retrieval.custom_metrics import mrr
from beir.retrieval.evaluation import EvaluateRetrieval
from beir.retrieval.search.dense import DenseRetrievalExactSearch
from conftest import write_beir_slice

from sbmoe.commands.evaluate import main
from sbmoe.data import RetrievalDataset, load_dataset
from sbmoe.evaluation.evaluator import evaluate_embeddings, evaluate_model
from sbmoe.heads import HeadConfig
from sbmoe.model import build_model, load_any_model

SLICE_QUERIES = 40
SLICE_DOCS = 400


@pytest.fixture(scope="module")
def scifact_slice(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BEIR folder: 40 SciFact test queries, their relevant documents and other documents up to 400."""
    return write_beir_slice(tmp_path_factory.mktemp("data") / "scifact-slice", shared_data, SLICE_QUERIES, SLICE_DOCS)


def test_agrees_with_beir_exact_search(scifact_slice: Path, tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 on 12 queries and 100 documents (the random tiny encoder ties too often to rank)."""
    model = build_model("minilm", max_seq_length=128)
    full = load_dataset(str(scifact_slice))
    qids = list(full.queries)[:12]
    relevant = {d for q in qids for d in full.qrels[q]}
    docs = [d for d in full.iter_docs() if d.id in relevant]
    docs += [d for d in full.iter_docs() if d.id not in relevant][: 100 - len(docs)]
    dataset = RetrievalDataset(
        "slice", "test", {q: full.queries[q] for q in qids}, {q: full.qrels[q] for q in qids}, lambda: iter(docs)
    )
    ours = evaluate_model(model, dataset, top_k=100, cache_dir=tmp_path, show_progress=False)
    retriever = EvaluateRetrieval(DenseRetrievalExactSearch(model, batch_size=64), score_function="cos_sim")
    results = retriever.retrieve(dataset.corpus(), dataset.queries)
    ndcg, _map, recall, _ = retriever.evaluate(dataset.qrels, results, [10, 100])
    beir = {"nDCG@10": ndcg["NDCG@10"], "MAP@100": _map["MAP@100"], "Recall@100": recall["Recall@100"]}
    beir["MRR@10"] = mrr(dataset.qrels, results, [10])["MRR@10"]
    assert (ours["num_queries"], ours["num_docs"]) == (12, 100)
    assert ours["metrics"]["nDCG@10"] > 0.5  # a real encoder on an easy slice
    for name, value in beir.items():
        assert ours["metrics"][name] == pytest.approx(value, abs=1e-3), name


def test_cli_writes_results_and_reuses_the_cache(
    tiny_bert: str, scifact_slice: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out" / "eval.json"
    argv = [
        "--model",
        tiny_bert,
        "--datasets",
        str(scifact_slice),
        "--top-k",
        "100",
        "--output",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--quiet",
    ]
    assert main(argv) == 0
    first = json.loads(out.read_text())
    assert main(argv) == 0
    second = json.loads(out.read_text())
    (a,), (b,) = first["results"], second["results"]
    assert (a["corpus_from_cache"], b["corpus_from_cache"]) == (False, True)
    assert a["metrics"] == b["metrics"] and a["dataset"] == "scifact-slice" and a["utilization"] is None
    names = "nDCG@1 nDCG@3 nDCG@5 nDCG@10 nDCG@100 MAP@100 MRR@10 Recall@10 Recall@100 Recall@1000 P@1"
    names += " Success@1 Success@5"
    assert set(a["metrics"]) == set(names.split())
    assert {"encode_corpus_s", "encode_queries_s", "index_s", "search_s", "eval_s", "total_s"} <= set(a["timings"])
    table = out.with_suffix(".md").read_text()
    assert f"| scifact-slice (test) | flat | {SLICE_QUERIES} | {SLICE_DOCS} | {a['metrics']['nDCG@10']:.4f} |" in table
    assert "(cached)" in table and "(cached)" in capsys.readouterr().out


def test_head_model_reports_expert_utilization(tiny_bert: str, scifact_slice: Path, tmp_path: Path) -> None:
    build_model(tiny_bert, HeadConfig(num_experts=3), max_seq_length=128).save(str(tmp_path / "moe"))
    out = tmp_path / "eval.json"
    argv = [
        "--model",
        str(tmp_path / "moe"),
        "--datasets",
        str(scifact_slice),
        "--index",
        "hnsw",
        "--top-k",
        "50",
        "--output",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--save-index",
        str(tmp_path / "idx"),
        "--quiet",
    ]
    assert main(argv) == 0
    (result,) = json.loads(out.read_text())["results"]
    use = result["utilization"]
    assert sum(use["corpus"]["counts"]) == use["corpus"]["total"] == SLICE_DOCS
    assert sum(use["queries"]["counts"]) == SLICE_QUERIES and len(use["corpus"]["shares"]) == 3
    manifest = json.loads((tmp_path / "idx" / "scifact-slice" / "manifest.json").read_text())
    assert (manifest["type"], manifest["count"], manifest["model"]["name"]) == (
        "hnsw",
        SLICE_DOCS,
        str(tmp_path / "moe"),
    )


def test_bad_arguments_and_missing_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "minilm", "--datasets", "scifact", "--index", "annoy"])
    assert exit_info.value.code == 2 and "invalid choice: 'annoy'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "minilm", "--datasets", "scifact", "--metrics", "nDCG@10,F1@5"])
    assert "unknown metric 'F1@5'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "minilm", "--datasets", "scifact", "--index", "ivf", "--index-param", "nprobe=many"])
    assert "expected KEY=INTEGER" in capsys.readouterr().err
    assert main(["--model", "minilm", "--datasets", "nope", "--data-dir", str(tmp_path)]) == 1
    assert "sbmoe evaluate: error: dataset 'nope' not found" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "no-model"), "--datasets", "cranfield"]) == 1
    assert f"sbmoe evaluate: error: no such folder: {tmp_path / 'no-model'}" in capsys.readouterr().err


def test_cranfield_recall_is_the_same_through_irds_and_beir(tiny_bert: str, shared_data: Path, tmp_path: Path) -> None:
    model = load_any_model(tiny_bert)
    runs = {}
    for spec in ("cranfield", "irds:cranfield"):
        dataset = load_dataset(spec, data_dir=shared_data)
        dataset.qrels = {q: {d: s for d, s in r.items() if s > 0} for q, r in dataset.qrels.items()}  # drop -1 rows
        runs[spec] = evaluate_model(model, dataset, top_k=100, batch_size=256, cache_dir=tmp_path, show_progress=False)
    beir, irds = runs["cranfield"]["metrics"], runs["irds:cranfield"]["metrics"]
    assert runs["irds:cranfield"]["num_docs"] == runs["cranfield"]["num_docs"] == 1400
    assert irds["Recall@100"] == pytest.approx(beir["Recall@100"], abs=1e-6) and beir["Recall@100"] > 0.05
    assert irds["nDCG@10"] != pytest.approx(beir["nDCG@10"], abs=1e-6)  # graded labels differ by design


def stage_msmarco(home: Path, shared: Path) -> None:
    """An ir-datasets home holding the 5,000-passage slice as the MS MARCO collection, plus the DL19 topics."""
    base = home / "msmarco-passage"
    (base / "trec-dl-2019").mkdir(parents=True)
    (base / "irds_version.txt").write_text("v2")
    with (base / "collection.tsv").open("w") as out:
        for line in (shared / "msmarco-sample" / "corpus.jsonl").open():
            doc = json.loads(line)
            out.write(f"{doc['_id']}\t{doc['text']}\n")
    (base / "trec-dl-2019" / "queries.tsv").write_text((shared / "msmarco-topics" / "queries.dl19.tsv").read_text())
    rows = (shared / "msmarco-topics" / "qrels.dl19.tsv").read_text().splitlines()[1:]
    (base / "trec-dl-2019" / "qrels").write_text("".join(f"{q} 0 {d} {s}\n" for q, d, s in map(str.split, rows)))


def test_msmarco_dl19_through_irds_matches_the_sample_folder(
    tiny_bert: str, shared_data: Path, tmp_path: Path
) -> None:
    stage_msmarco(tmp_path / "irds", shared_data)
    out = tmp_path / "dl19.json"
    env = {
        **os.environ,
        "IR_DATASETS_HOME": str(tmp_path / "irds"),
        "SBMOE_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    argv = [
        sys.executable,
        "-m",
        "sbmoe",
        "evaluate",
        "--model",
        tiny_bert,
        "--datasets",
        "irds:msmarco-passage/trec-dl-2019/judged",
        "--top-k",
        "100",
        "--batch-size",
        "256",
        "--output",
        str(out),
        "--quiet",
    ]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (irds,) = json.loads(out.read_text())["results"]
    assert (irds["num_queries"], irds["num_docs"], irds["relevance_level"]) == (43, 5000, 2)
    assert irds["warnings"] == [irds["warnings"][0]] and "5158 qrels doc ids not in the corpus" in irds["warnings"][0]
    sample = evaluate_model(
        load_any_model(tiny_bert),
        load_dataset("msmarco-sample", data_dir=shared_data),
        top_k=100,
        cache_dir=tmp_path / "cache",
        show_progress=False,
    )
    assert sample["corpus_from_cache"]  # same passages, same order: the subprocess's cache entry is reused
    assert irds["metrics"]["nDCG@10"] == pytest.approx(sample["metrics"]["nDCG@10"], abs=1e-6)  # grade-0 rows: gain 0


def test_evaluate_embeddings_scores_precomputed_vectors() -> None:
    """Query i's nearest document is doc i; document "q1" shares query q1's id and is dropped, as in BEIR."""
    rng = np.random.default_rng(0)
    docs = rng.normal(size=(50, 16)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    doc_ids = [f"d{i}" for i in range(50)]
    doc_ids[1] = "q1"
    queries = docs[:3] + 0.01 * rng.normal(size=(3, 16)).astype(np.float32)
    qrels = {"q0": {"d0": 1}, "q1": {"q1": 1}, "q2": {"d2": 1, "d49": 1}}
    out = evaluate_embeddings(
        queries, docs, ["q0", "q1", "q2"], doc_ids, qrels, top_k=10, index="hnsw", metrics=["MRR@10", "Recall@1"]
    )
    assert out["metrics"] == {"MRR@10": pytest.approx(2 / 3), "Recall@1": pytest.approx((1 + 0 + 0.5) / 3)}
    assert "q1" not in out["run"]["q1"] and len(out["run"]["q1"]) == 10 and list(out["run"]["q0"])[0] == "d0"
    kept = evaluate_embeddings(
        queries, docs, ["q0", "q1", "q2"], doc_ids, qrels, top_k=10, metrics=["MRR@10"], ignore_identical_ids=False
    )
    assert kept["metrics"]["MRR@10"] == pytest.approx(1.0)
