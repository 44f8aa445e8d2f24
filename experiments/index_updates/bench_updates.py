"""What an index update costs: a full build against re-indexing a corpus with one changed and one removed
document (only that text is encoded; the faiss index is rebuilt from the cached vectors), flat and HNSW.

    PYTHONPATH=. python experiments/index_updates/bench_updates.py --corpus scifact --repeats 3

Writes ``results.json`` and ``results.md`` beside this file. Timings vary +-8% on a shared machine: updates are
repeated, interleaved across index types, and compared to the build by ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from sentence_transformers import SentenceTransformer

from sbmoe.data import Doc
from sbmoe.files import write_atomic
from sbmoe.model import load_any_model
from sbmoe.retrieval import Retriever
from sbmoe.retrieval.documents import unique_docs

HERE = Path(__file__).resolve().parent


def counted_encoding() -> list[int]:
    """Count the texts given to ``encode_document`` from now on (one entry per call)."""
    calls: list[int] = []
    real = SentenceTransformer.encode_document

    def counting(self, texts, *args, **kwargs):
        calls.append(len(texts))
        return real(self, texts, *args, **kwargs)

    SentenceTransformer.encode_document = counting
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="scifact")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--table-only", action="store_true", help="rewrite results.md from results.json")
    args = parser.parse_args()
    if args.table_only:
        write_atomic(HERE / "results.md", table(json.loads((HERE / "results.json").read_text())))
        return
    model = load_any_model(args.model)
    docs = unique_docs(args.corpus)
    edited = [Doc(d.id, d.title, d.text + " (revised)") if i == 7 else d for i, d in enumerate(docs) if i != 11]
    calls = counted_encoding()
    record: dict = {"corpus": args.corpus, "model": args.model, "documents": len(docs), "runs": []}
    with tempfile.TemporaryDirectory() as cache:
        for index_type in ("flat", "hnsw"):
            calls.clear()
            start = time.perf_counter()
            built = Retriever.build(model, docs, index=index_type, cache_dir=cache, show_progress=False)
            seconds = time.perf_counter() - start
            record["runs"].append({"type": index_type, "step": "build", "seconds": seconds, "encoded": sum(calls)})
        for repeat in range(args.repeats):
            for index_type in ("flat", "hnsw"):
                retriever = Retriever.build(model, docs, index=index_type, cache_dir=cache, show_progress=False)
                calls.clear()
                start = time.perf_counter()
                changes = retriever.sync(edited, show_progress=False)
                seconds = time.perf_counter() - start
                step = {"type": index_type, "step": "update", "repeat": repeat, "seconds": seconds}
                record["runs"].append({**step, "encoded": sum(calls), "changes": str(changes)})
                hit = retriever.search(edited[7].full_text, k=1)[0][0]
                assert hit.id == edited[7].id and hit.text == edited[7].text, hit
                assert all(h.id != docs[11].id for h in retriever.search(docs[11].full_text, k=10)[0])
    del built
    write_atomic(HERE / "results.json", json.dumps(record, indent=1))
    write_atomic(HERE / "results.md", table(record))
    print(table(record))


def table(record: dict) -> str:
    """The runs as a markdown table: seconds, texts encoded, and each run's share of the first build (the one that
    encodes the corpus; the second build reads the cached vectors)."""
    full = record["runs"][0]["seconds"]
    lines = [
        f"{record['corpus']}, {record['documents']} documents, {record['model']}: one document changed, one removed",
        "",
        "| type | step | seconds | texts encoded | of the first build |",
        "|---|---|---|---|---|",
    ]
    for run in record["runs"]:
        share = run["seconds"] / full
        lines.append(f"| {run['type']} | {run['step']} | {run['seconds']:.2f} | {run['encoded']} | {share:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
