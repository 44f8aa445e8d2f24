"""Fine-tuning: train an SB-MoE (or dense, or no) head, alone on cached pooled vectors or with the backbone.

:func:`run` writes a SentenceTransformer folder plus ``run.json`` (arguments, losses, expert utilization, eval
metrics with per-query values) to the output directory.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback, set_seed

from sbmoe.data import RetrievalDataset, load_dataset
from sbmoe.data.splits import unseen_dev_split
from sbmoe.data.trainset import Example, TrainSet, cropped_span, load_train_set
from sbmoe.evaluation.evaluate import evaluate_embeddings
from sbmoe.evaluation.metrics import per_query
from sbmoe.files import write_atomic
from sbmoe.heads import SBMoEHead
from sbmoe.model import SBMoEModel, find_head
from sbmoe.retrieval.encode import pooled_features
from sbmoe.training.arguments import FinetuneArguments, count_parameters, make_model
from sbmoe.training.head_trainer import HeadTrainConfig, embed, kmeans_router_init, mine_hard_negatives, train_head

logger = logging.getLogger(__name__)
METRICS = ("nDCG@10", "MAP@100", "Recall@100", "MRR@10")


@dataclass
class PreparedData:
    """Training rows over cached vectors: anchors (queries, then titles), documents, example rows, dev data."""

    anchors: torch.Tensor
    docs: torch.Tensor
    doc_ids: list[str]
    rows: torch.Tensor
    anchor_texts: list[str]
    doc_texts: list[str]
    dev_ids: list[str] = field(default_factory=list)
    dev_vectors: torch.Tensor | None = None
    dev_qrels: dict[str, dict[str, int]] = field(default_factory=dict)
    cluster_shares: list[float] | None = None


def prepare(model: SBMoEModel, args: FinetuneArguments, data: TrainSet) -> PreparedData:
    """Split off the dev queries, compute (cached) pooled vectors, and mine hard negatives with the initial model."""
    dev_qrels: dict[str, dict[str, int]] = {}
    if args.dev_queries:
        train_qrels, dev_qrels = unseen_dev_split(data.qrels, args.dev_queries)
        data = data.restrict(set(train_qrels))
    doc_ids = list(data.docs)
    doc_row = {d: i for i, d in enumerate(doc_ids)}
    query_ids = sorted({e.query for e in data.examples})
    anchor_texts = [data.queries[q] for q in query_ids]
    examples = [(i, e) for i, q in enumerate(query_ids) for e in _by_query(data.examples)[q]]
    if args.self_supervised == "title":
        titled = [d for d in doc_ids if data.titles.get(d, "").strip()]
        examples += [(len(anchor_texts) + i, Example(f"title:{d}", d)) for i, d in enumerate(titled)]
        anchor_texts += [data.titles[d] for d in titled]
    elif args.self_supervised == "crop":
        cropped = [d for d in doc_ids if data.docs[d].strip()]
        examples += [(len(anchor_texts) + i, Example(f"crop:{d}", d)) for i, d in enumerate(cropped)]
        anchor_texts += [cropped_span(d, data.docs[d]) for d in cropped]
    doc_texts = [data.docs[d] for d in doc_ids]
    anchors = pooled_features(model, anchor_texts, "queries", args.cache_dir)
    docs = pooled_features(model, doc_texts, "corpus", args.cache_dir)
    head, cos = find_head(model), args.similarity == "cos"
    cluster_shares = None
    if args.router_init == "kmeans" and head is not None and head.num_experts > 1:
        cluster_shares = kmeans_router_init(head, docs, seed=args.seed)
    positives: dict[int, set[int]] = {}
    for row, example in examples:
        positives.setdefault(row, set()).add(doc_row[example.positive])
    mined = np.zeros((len(anchor_texts), 0), dtype=np.int64)
    if args.hard_negatives:
        wanted = [positives.get(i, set()) for i in range(len(anchor_texts))]
        mined = mine_hard_negatives(
            embed(head, anchors, "query", cos),
            embed(head, docs, "document", cos),
            wanted,
            args.hard_negatives,
            args.negatives_skip,
        )
    rows = []
    for row, example in examples:
        given = [doc_row[n] for n in example.negatives if n in doc_row]
        negatives = (given + [int(m) for m in mined[row] if m not in given])[: max(args.hard_negatives, len(given))]
        rows.append([row, doc_row[example.positive], *negatives])
    width = min(len(r) for r in rows)
    prepared = PreparedData(anchors, docs, doc_ids, torch.tensor([r[:width] for r in rows]), anchor_texts, doc_texts)
    prepared.cluster_shares = cluster_shares
    if dev_qrels:
        prepared.dev_ids = sorted(dev_qrels)
        prepared.dev_vectors = pooled_features(
            model, [data.queries[q] for q in prepared.dev_ids], "queries", args.cache_dir
        )
        prepared.dev_qrels = dev_qrels
    return prepared


def _by_query(examples: list[Example]) -> dict[str, list[Example]]:
    grouped: dict[str, list[Example]] = {}
    for example in examples:
        grouped.setdefault(example.query, []).append(example)
    return grouped


def dev_ndcg(head: SBMoEHead | None, prepared: PreparedData, cos: bool = True) -> float:
    """nDCG@10 of the dev queries against the whole training corpus, on cached vectors."""
    queries = embed(head, prepared.dev_vectors, "query", cos).numpy()
    docs = embed(head, prepared.docs, "document", cos).numpy()
    result = evaluate_embeddings(
        queries, docs, prepared.dev_ids, prepared.doc_ids, prepared.dev_qrels, top_k=100, metrics=("nDCG@10",)
    )
    return result["metrics"]["nDCG@10"]


STRENGTHS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)


def tune_strength(head: SBMoEHead | None, prepared: PreparedData, cos: bool = True) -> dict[str, Any]:
    """Set ``head.strength`` to the value in :data:`STRENGTHS` with the best dev nDCG@10 (ties: the stronger head).

    Returns:
        ``{"chosen": strength, "dev_nDCG@10": {strength: score}}``.
    """
    if head is None or not prepared.dev_ids:
        raise ValueError("--tune-strength needs a head and dev queries (--dev-queries > 0)")
    scores: dict[str, float] = {}
    for strength in STRENGTHS:
        head.strength = strength
        scores[str(strength)] = dev_ndcg(head, prepared, cos)
    head.strength = max(STRENGTHS, key=lambda s: (scores[str(s)], s))
    return {"chosen": head.strength, "dev_nDCG@10": scores}


def train_head_mode(model: SBMoEModel, args: FinetuneArguments, prepared: PreparedData) -> dict[str, Any]:
    """Train the head alone on the cached vectors; the backbone is never touched."""
    head = find_head(model)
    if head is None:
        return {"note": "no head: nothing to train in head mode"}
    config = HeadTrainConfig(
        epochs=int(args.epochs),
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        similarity=args.similarity,
        temperature=args.temperature,
        aux_loss_weight=args.aux_loss_weight,
        z_loss_weight=args.z_loss_weight,
        anchor_weight=args.anchor_weight,
        patience=args.patience,
        seed=args.seed,
    )
    cos = args.similarity == "cos"
    dev = (lambda h: dev_ndcg(h, prepared, cos)) if prepared.dev_ids else None
    result = train_head(head, prepared.anchors, prepared.docs, prepared.rows, config, dev)
    return asdict(result)


def train_full_mode(
    model: SBMoEModel, args: FinetuneArguments, prepared: PreparedData, callbacks: list[TrainerCallback]
) -> dict[str, Any]:
    """Train backbone and head with the SentenceTransformerTrainer (checkpoints, resume, mixed precision)."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers

    from sbmoe.training.losses import MoEContrastiveLoss

    rows = prepared.rows.tolist()
    columns = {"query": [prepared.anchor_texts[r[0]] for r in rows]}
    columns["positive"] = [prepared.doc_texts[r[1]] for r in rows]
    for j in range(2, len(rows[0])):
        columns[f"negative_{j - 1}"] = [prepared.doc_texts[r[j]] for r in rows]
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    head_name = next((name for name, module in model.named_children() if isinstance(module, SBMoEHead)), None)
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(Path(args.output_dir) / "checkpoints"),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.backbone_learning_rate,
        learning_rate_mapping={rf"^model\.{head_name}\.": args.learning_rate} if head_name else {},
        weight_decay=args.weight_decay,
        warmup_steps=0.1,
        seed=args.seed,
        data_seed=args.seed,
        bf16=bf16,
        fp16=cuda and not bf16,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        router_mapping={c: "query" if c == "query" else "document" for c in columns},
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=2,
        logging_steps=args.logging_steps,
        logging_nan_inf_filter=False,
        report_to="none",
    )
    loss = MoEContrastiveLoss(model, args.similarity, args.temperature, args.aux_loss_weight, args.z_loss_weight)
    trainer = SentenceTransformerTrainer(
        model=model, args=training_args, train_dataset=Dataset.from_dict(columns), loss=loss, callbacks=callbacks
    )
    has_checkpoint = any(Path(training_args.output_dir).glob("checkpoint-*"))
    if args.resume and not has_checkpoint:
        logger.warning("--resume: no checkpoint under %s, starting from scratch", training_args.output_dir)
    trainer.train(resume_from_checkpoint=bool(args.resume and has_checkpoint))
    return {"log_history": trainer.state.log_history, "global_step": trainer.state.global_step}


def expert_choice(head: SBMoEHead, vectors: torch.Tensor) -> torch.Tensor:
    """Top-1 expert of each pooled vector (eval mode)."""
    head.eval()
    with torch.no_grad():
        return torch.cat([head({"sentence_embedding": b})["expert_index"] for b in vectors.split(4096)])


def utilization(chosen: torch.Tensor, num_experts: int, initial: torch.Tensor | None = None) -> dict[str, Any]:
    """Share of documents per expert, routing entropy (nats), and share whose expert changed since ``initial``."""
    shares = (torch.bincount(chosen, minlength=num_experts).float() / max(len(chosen), 1)).tolist()
    out: dict[str, Any] = {"shares": shares, "min_share": min(shares)}
    out["entropy"] = -sum(p * float(np.log(p)) for p in shares if p > 0)
    if initial is not None:
        out["changed_from_init"] = (chosen != initial).float().mean().item()
    return out


def evaluate(model: SBMoEModel, args: FinetuneArguments, routing_before: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Metrics, per-query values and expert utilization on each ``--eval-data`` set.

    Documents and queries go through the (cached) pooled backbone and then the head in eval mode, which is
    exactly what ``model.encode`` computes.
    """
    results: dict[str, Any] = {}
    head, cos = find_head(model), args.similarity == "cos"
    for spec in eval_specs(args):
        dataset = load_dataset(spec, data_dir=args.data_dir)
        query_ids = list(dataset.queries)
        docs = list(dataset.iter_docs())
        doc_ids, doc_texts = [doc.id for doc in docs], [doc.full_text for doc in docs]
        doc_vectors = pooled_features(model, doc_texts, "corpus", args.cache_dir)
        queries = pooled_features(model, [dataset.queries[q] for q in query_ids], "queries", args.cache_dir)
        query_emb, doc_emb = embed(head, queries, "query", cos), embed(head, doc_vectors, "document", cos)
        result = evaluate_embeddings(
            query_emb.numpy(), doc_emb.numpy(), query_ids, doc_ids, dataset.qrels, top_k=1000, metrics=METRICS,
            relevance_level=dataset.relevance_level,
        )  # fmt: skip
        scores = per_query(dataset.qrels, result["run"], METRICS, dataset.relevance_level)
        results[spec] = {
            "metrics": result["metrics"],
            "per_query": {name: {q: values[name] for q, values in scores.items()} for name in METRICS},
        }
        if head is not None and head.num_experts > 1:
            chosen = expert_choice(head, doc_vectors)
            results[spec]["experts"] = utilization(chosen, head.num_experts, routing_before.get(dataset.name))
    return results


def eval_specs(args: FinetuneArguments) -> list[str]:
    """The ``--eval-data`` entries."""
    return [s.strip() for s in args.eval_data.split(",") if s.strip()]


def initial_routing(model: SBMoEModel, args: FinetuneArguments) -> dict[str, torch.Tensor]:
    """Top-1 expert per document of each eval corpus before training (to count documents that change expert)."""
    head = find_head(model)
    if head is None or head.num_experts == 1:
        return {}
    out: dict[str, torch.Tensor] = {}
    for spec in eval_specs(args):
        dataset: RetrievalDataset = load_dataset(spec, data_dir=args.data_dir)
        if dataset.name not in out:
            texts = [doc.full_text for doc in dataset.iter_docs()]
            out[dataset.name] = expert_choice(head, pooled_features(model, texts, "corpus", args.cache_dir))
    return out


def run(args: FinetuneArguments, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Fine-tune as ``args`` says, save the model and ``run.json`` to ``args.output_dir``, return the run record."""
    start = time.time()
    set_seed(args.seed)
    model = make_model(args)
    data = load_train_set(args.train_data, args.data_dir)
    prepared = prepare(model, args, data)
    routing_before = initial_routing(model, args)
    set_seed(args.seed)
    if args.train == "head":
        history = train_head_mode(model, args, prepared)
    else:
        history = train_full_mode(model, args, prepared, callbacks or [])
    record: dict[str, Any] = {
        "arguments": asdict(args),
        "head_parameters": count_parameters(find_head(model)),
        "train_examples": len(prepared.rows),
        "dev_queries": len(prepared.dev_ids),
        "history": history,
        "kmeans_cluster_shares": prepared.cluster_shares,
    }
    if prepared.dev_ids and args.train == "full":  # the backbone moved: re-encode the dev queries and the corpus
        prepared.docs = pooled_features(model, prepared.doc_texts, "corpus", args.cache_dir)
        dev_texts = [data.queries[q] for q in prepared.dev_ids]
        prepared.dev_vectors = pooled_features(model, dev_texts, "queries", args.cache_dir)
    if args.tune_strength:  # scores every strength on dev, 1.0 (the head as trained) included
        record["strength"] = tune_strength(find_head(model), prepared, args.similarity == "cos")
        record["dev_nDCG@10"] = record["strength"]["dev_nDCG@10"][str(record["strength"]["chosen"])]
    elif prepared.dev_ids:
        record["dev_nDCG@10"] = dev_ndcg(find_head(model), prepared, args.similarity == "cos")
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if args.save_model:
        model.save(str(output))
    record["eval"] = evaluate(model, args, routing_before)
    record["seconds"] = time.time() - start
    write_atomic(output / "run.json", json.dumps(record, indent=1))
    return record


