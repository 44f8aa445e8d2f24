"""``python -m sbmoe.demo``: MiniLM + an SB-MoE head ranks a slice of SciFact and shows each text's expert."""

from __future__ import annotations

import argparse
from itertools import islice

import numpy as np
from rich.console import Console
from rich.table import Table

import sbmoe
from sbmoe.data import load_dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default=None, help="folder with scifact/ (default: $SBMOE_DATA, ../shared/data)")
    parser.add_argument("--docs", type=int, default=300, help="how many SciFact documents to rank")
    parser.add_argument("--queries", type=int, default=5)
    args = parser.parse_args(argv)

    dataset = load_dataset("scifact", split="test", data_dir=args.data_dir)
    docs = list(islice(dataset.iter_docs(), args.docs))
    doc_ids = {doc.id for doc in docs}
    query_ids = [qid for qid, rels in dataset.qrels.items() if doc_ids & set(rels)][: args.queries]
    model = sbmoe.build_model("minilm", num_experts=6).eval()
    doc_rows = model.encode_document([doc.full_text for doc in docs], output_value=None, batch_size=32)
    query_rows = model.encode_query([dataset.queries[qid] for qid in query_ids], output_value=None)
    doc_emb = np.stack([row["sentence_embedding"].numpy() for row in doc_rows])

    console = Console()
    for qid, row in zip(query_ids, query_rows, strict=True):
        scores = doc_emb @ row["sentence_embedding"].numpy()
        table = Table(title=f"[{qid}] {dataset.queries[qid]}  (query expert {int(row['expert_index'])})")
        for column in ("rank", "score", "doc", "expert", "relevant", "title"):
            table.add_column(column)
        for rank, i in enumerate(np.argsort(-scores)[:3], start=1):
            relevant = "yes" if docs[i].id in dataset.qrels[qid] else ""
            expert = str(int(doc_rows[i]["expert_index"]))
            table.add_row(str(rank), f"{scores[i]:.3f}", docs[i].id, expert, relevant, docs[i].title[:70])
        console.print(table)
    shares = np.bincount([int(r["expert_index"]) for r in doc_rows], minlength=6) / len(doc_rows)
    console.print("documents per expert (untrained head): " + "  ".join(f"E{i} {s:.0%}" for i, s in enumerate(shares)))


if __name__ == "__main__":
    main()
