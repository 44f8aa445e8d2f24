"""``python -m sbmoe.demo``: train an SB-MoE head on SciFact and compare it with the backbone and a dense head.

MiniLM's pooled vectors of SciFact are computed once and cached (``.cache/sbmoe``); a dense head of equal size and
the SB-MoE head then train on them in seconds (settings from the SciFact study, early stopping on a dev split of
train queries whose positives are unseen in training). It prints nDCG@10 / MRR@10 on SciFact ``test`` and
``test-unseen`` for zero-shot MiniLM, the dense head and the SB-MoE head, the experts' share of documents, and
the trained SB-MoE model ranking a few test queries with each text's expert.

Encoding is what costs (about 7 SciFact abstracts per second on two busy cores), so by default the demo runs on a
slice of the corpus: every document relevant to a train or test query plus the first others in file order, up to
``--docs`` (written as a BEIR folder under ``.cache/demo``). ``--docs 0`` uses all 5,183 documents (the study's
setting; about 15 minutes here the first time).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from sbmoe.data import load_dataset
from sbmoe.model import load_model
from sbmoe.retrieval.encode import pooled_features
from sbmoe.training.finetune import FinetuneArguments, run

EVAL = ["scifact:test", "scifact:test-unseen"]
# The recipe chosen on the dev split by experiments/scifact/study.py (see experiments/results/scifact_study.md).
# The best recipe on dev: title -> abstract pairs from the corpus beside the labelled pairs, head lr 1e-3 (also the
# dense head's best on dev), weight decay 0.1; the SB-MoE head routes each input to its top-1 learned expert.
RECIPE: dict[str, Any] = {"self_supervised": "title", "learning_rate": 1e-3, "weight_decay": 0.1}
COMMON: dict[str, Any] = {
    "train_data": "scifact:train",
    "eval_data": ",".join(EVAL),
    "dev_queries": 100,
    "patience": 4,
    "epochs": 40,
    "save_model": False,
}
HEADS = {
    "zero-shot MiniLM": {"head": "none"},
    "dense head (equal parameters)": {"head": "dense", "dense_size": "total", **RECIPE},
    "SB-MoE head (6 experts)": {"head": "sbmoe", "top_k": 1, "inference": "top1", **RECIPE, "save_model": True},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="folder with scifact/ (default: $SBMOE_DATA, ../shared/data)")
    parser.add_argument("--out", default="out/demo", help="where the trained SB-MoE model is saved")
    parser.add_argument("--queries", type=int, default=3, help="test queries to show ranked")
    parser.add_argument("--docs", type=int, default=1500, help="corpus slice size (0: the whole corpus)")
    args = parser.parse_args(argv)
    console = Console(width=max(Console().width, 130))
    if args.docs:
        args.data_dir = str(scifact_slice(args.docs, args.data_dir, Path(".cache/demo")))
        console.print(f"SciFact slice of {args.docs} documents (all judged ones included) in {args.data_dir}")
    records = {}
    for name, options in HEADS.items():
        console.print(f"[bold]{name}[/bold]: training and evaluating")
        output = f"{args.out}/{options['head']}"
        options = {**COMMON, **options, "data_dir": args.data_dir, "output_dir": output}
        records[name] = run(FinetuneArguments(**options))
    console.print(results_table(records))
    experts = records["SB-MoE head (6 experts)"]["eval"]["scifact:test"]["experts"]
    console.print(
        "SciFact documents per expert (trained SB-MoE): "
        + "  ".join(f"E{i} {share:.0%}" for i, share in enumerate(experts["shares"]))
        + f"  | entropy {experts['entropy']:.2f} nats (uniform {np.log(len(experts['shares'])):.2f})"
        + f"  | expert changed by training: {experts['changed_from_init']:.0%} of documents"
    )
    show_rankings(console, f"{args.out}/sbmoe", args.data_dir, args.queries)


def scifact_slice(size: int, data_dir: str | None, root: Path) -> Path:
    """A BEIR folder ``root/scifact-<size>/scifact`` with every judged document plus the first others, up to ``size``.

    Returns:
        The data folder to pass as ``data_dir`` (it holds ``scifact/``).
    """
    target = root / f"scifact-{size}"
    folder = target / "scifact"
    if (folder / "corpus.jsonl").is_file():
        return target
    splits = ("train", "test", "test-unseen")
    datasets = {split: load_dataset("scifact", split=split, data_dir=data_dir) for split in splits}
    judged = {doc for ds in datasets.values() for rels in ds.qrels.values() for doc in rels}
    docs = list(datasets["test"].iter_docs())
    fillers = [d.id for d in docs if d.id not in judged][: max(0, size - len(judged))]
    keep = judged | set(fillers)
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with (folder / "corpus.jsonl").open("w") as out:
        for doc in docs:
            if doc.id in keep:
                out.write(json.dumps({"_id": doc.id, "title": doc.title, "text": doc.text}) + "\n")
    queries = {q: t for ds in datasets.values() for q, t in ds.queries.items()}
    with (folder / "queries.jsonl").open("w") as out:
        for qid, text in queries.items():
            out.write(json.dumps({"_id": qid, "text": text}) + "\n")
    for split, dataset in datasets.items():
        rows = [f"{q}\t{d}\t{s}" for q, rels in dataset.qrels.items() for d, s in rels.items()]
        (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
    return target


def results_table(records: dict[str, dict[str, Any]]) -> Table:
    """nDCG@10 and MRR@10 per model on each eval set, with the difference to zero-shot, and the epoch kept.

    Early stopping keeps the epoch with the best dev nDCG@10; a head that kept epoch 1 of a short run barely moved.
    """
    table = Table(title="SciFact: zero-shot vs dense head vs SB-MoE head (MiniLM backbone frozen)")
    table.add_column("model")
    for spec in EVAL:
        table.add_column(f"{spec.split(':')[1]} nDCG@10", justify="right")
        table.add_column(f"{spec.split(':')[1]} MRR@10", justify="right")
    table.add_column("dev nDCG@10", justify="right")
    table.add_column("epoch kept", justify="right")
    base = records["zero-shot MiniLM"]["eval"]
    for name, record in records.items():
        cells = [name]
        for spec in EVAL:
            for metric in ("nDCG@10", "MRR@10"):
                value = record["eval"][spec]["metrics"][metric]
                delta = value - base[spec]["metrics"][metric]
                shown = f" ({100 * delta:+.1f})" if record is not records["zero-shot MiniLM"] else ""
                cells.append(f"{value:.4f}{shown}")
        cells.append(f"{record['dev_nDCG@10']:.4f}")
        history = record["history"]
        kept = f"{history['best_epoch']} of {len(history['losses'])}" if "losses" in history else "–"
        cells.append(kept)
        table.add_row(*cells)
    return table


def show_rankings(console: Console, model_path: str, data_dir: str | None, count: int) -> None:
    """The saved SB-MoE model ranks the whole SciFact corpus for a few test-unseen queries, with each text's expert.

    The pooled backbone vectors come from the cache (the backbone is the frozen MiniLM), then the head runs.
    """
    dataset = load_dataset("scifact", split="test-unseen", data_dir=data_dir)
    docs = list(dataset.iter_docs())
    model = load_model(model_path)
    head = model.head
    pooled = pooled_features(model, [d.full_text for d in docs], "corpus")
    with torch.no_grad():
        doc_out = head.eval()({"sentence_embedding": pooled, "task": "document"})
    query_ids = list(dataset.qrels)[:count]
    queries = pooled_features(model, [dataset.queries[q] for q in query_ids], "queries")
    with torch.no_grad():
        query_out = head({"sentence_embedding": queries, "task": "query"})
    scores = query_out["sentence_embedding"] @ doc_out["sentence_embedding"].T
    for i, qid in enumerate(query_ids):
        title = f"[{qid}] {dataset.queries[qid]}  (query expert {int(query_out['expert_index'][i])})"
        table = Table(title=title)
        for column in ("rank", "score", "doc", "expert", "relevant", "title"):
            table.add_column(column)
        for rank, j in enumerate(scores[i].argsort(descending=True)[:3].tolist(), start=1):
            relevant = "yes" if docs[j].id in dataset.qrels[qid] else ""
            expert = str(int(doc_out["expert_index"][j]))
            table.add_row(str(rank), f"{scores[i, j]:.3f}", docs[j].id, expert, relevant, docs[j].title[:70])
        console.print(table)


if __name__ == "__main__":
    main()
