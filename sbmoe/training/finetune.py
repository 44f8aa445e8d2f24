"""Fine-tuning: train an SB-MoE (or dense, or no) head, alone on cached pooled vectors or with the backbone.

:func:`run` writes a SentenceTransformer folder plus ``run.json`` (arguments, losses, expert utilization, eval
metrics with per-query values) to the output directory.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback, set_seed

from sbmoe.data import RetrievalDataset, load_dataset
from sbmoe.data.trainset import load_train_sets
from sbmoe.evaluation.coverage import coverage, coverage_warnings
from sbmoe.evaluation.evaluate import evaluate_embeddings
from sbmoe.evaluation.metrics import per_query
from sbmoe.files import last_complete_checkpoint, write_atomic
from sbmoe.heads import SBMoEHead
from sbmoe.heads.moe_block import active_parameters, moe_blocks, set_psr
from sbmoe.heads.stacked import StackedMoEHead
from sbmoe.heads.upcycle import MoETransformer
from sbmoe.model import SBMoEModel, build_model, find_head
from sbmoe.retrieval.encode import pooled_features
from sbmoe.training.arguments import FinetuneArguments, count_parameters, make_model
from sbmoe.training.frozen_bottom import frozen_bottom
from sbmoe.training.head_trainer import HeadTrainConfig, embed, kmeans_router_init, train_head
from sbmoe.training.prepared import PreparedData, dev_ndcg, prepare, reencode
from sbmoe.training.sampling import WeightedSourceBatchSampler, parse_weights

logger = logging.getLogger(__name__)
METRICS = ("nDCG@10", "MAP@100", "Recall@100", "MRR@10")


STRENGTHS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)


def tune_strength(head: SBMoEHead | None, prepared: PreparedData, cos: bool = True) -> dict[str, Any]:
    """Set ``head.strength`` to the value in :data:`STRENGTHS` with the best dev nDCG@10 (ties: the stronger head).

    Returns:
        ``{"chosen": strength, "dev_nDCG@10": {strength: score}}``.
    """
    if head is None or not prepared.dev_queries:
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
        source_weights=parse_weights(args.train_weights, len(prepared.sources)),
        domain_loss_weight=args.domain_loss_weight,
    )
    cos = args.similarity == "cos"
    dev = (lambda h: dev_ndcg(h, prepared, cos)) if prepared.dev_queries else None
    checkpoints = Path(args.output_dir) / "checkpoints" / "head"
    result = train_head(
        head, prepared.anchors, prepared.docs, prepared.rows, config, dev, checkpoints, args.resume, "dev nDCG@10",
        prepared.row_source,
    )
    return asdict(result)


def train_full_mode(
    model: SBMoEModel, args: FinetuneArguments, prepared: PreparedData, callbacks: list[TrainerCallback]
) -> dict[str, Any]:
    """Train backbone and head with the SentenceTransformerTrainer (checkpoints, resume, mixed precision)."""
    from datasets import DatasetDict
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers

    from sbmoe.training.losses import MoEContrastiveLoss

    train_dataset = DatasetDict({source.name: _columns(prepared, i) for i, source in enumerate(prepared.sources)})
    if len(prepared.sources) == 1:
        train_dataset = train_dataset[prepared.sources[0].name]
    weights = parse_weights(args.train_weights, len(prepared.sources))
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    head_name = next((name for name, module in model.named_children() if isinstance(module, SBMoEHead)), None)
    rates = {rf"^model\.{head_name}\.": args.learning_rate} if head_name else {}
    if moe_blocks(model[0]):  # the MoE layers' fresh routers learn at the head's rate
        rates[r"\.intermediate\.router\."] = args.learning_rate
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(Path(args.output_dir) / "checkpoints"),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.backbone_learning_rate,
        learning_rate_mapping=rates,
        weight_decay=args.weight_decay,
        warmup_steps=0.1,
        seed=args.seed,
        data_seed=args.seed,
        bf16=bf16,
        fp16=cuda and not bf16,
        use_cpu=not cuda,  # without it the Trainer ignores torchrun on CPU (each rank trains alone); with it, gloo
        dataloader_pin_memory=cuda,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        router_mapping={c: "query" if c == "query" else "document" for c in _columns(prepared, 0).column_names},
        multi_dataset_batch_sampler=functools.partial(WeightedSourceBatchSampler, weights=weights),
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=2,
        logging_steps=args.logging_steps,
        logging_nan_inf_filter=False,
        report_to="none",
    )
    loss = MoEContrastiveLoss(model, args.similarity, args.temperature, args.aux_loss_weight, args.z_loss_weight)
    trainer = SentenceTransformerTrainer(
        model=model, args=training_args, train_dataset=train_dataset, loss=loss,
        callbacks=[*callbacks, PSRProgress(model)],
    )  # fmt: skip
    checkpoint = last_complete_checkpoint(training_args.output_dir) if args.resume else None
    if args.resume and checkpoint is None:
        logger.warning("--resume: no complete checkpoint under %s, starting from scratch", training_args.output_dir)
    elif checkpoint is not None:
        logger.info("--resume: continuing from %s", checkpoint)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    return {"log_history": trainer.state.log_history, "global_step": trainer.state.global_step}


def process_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` unless a distributed process group is up (torchrun or
    accelerate launch, once the Trainer has joined it)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def pin_local_gpu() -> None:
    """Under torchrun on GPUs, make ``cuda`` mean this rank's GPU (``LOCAL_RANK``), so that the encoding done before
    the Trainer starts (zero-shot evaluation, mining) does not put every rank on GPU 0."""
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


class PSRProgress(TrainerCallback):
    """Tells every MoE block of the model the training progress (for progressive scaling routing) at each step."""

    def __init__(self, model: SBMoEModel):
        self.model = model

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        set_psr(self.model, progress=state.global_step / max(state.max_steps, 1))


def moe_utilization(model: SBMoEModel, args: FinetuneArguments, encoder_docs: int = 200) -> list[dict[str, Any]]:
    """Per MoE layer, top-1 expert shares over the documents of the first ``--eval-data`` set in eval mode: all of
    them for a stacked head (on the cached pooled vectors), the first ``encoder_docs`` for MoE layers in the backbone
    (encoded anew). Empty for a model without MoE layers or without eval data."""
    blocks, specs = moe_blocks(model), eval_specs(args)
    if not blocks or not specs:
        return []
    texts = [doc.full_text for doc in load_dataset(specs[0], data_dir=args.data_dir).iter_docs()]
    for block in blocks:
        block.reset_routing_stats()
    head = find_head(model)
    if isinstance(head, StackedMoEHead):
        embed(head, pooled_features(model, texts, "corpus", args.cache_dir), "document")
        return head.routing_stats()["layers"]
    model.eval()
    model.encode(texts[:encoder_docs], batch_size=32)
    transformer = model[0]
    return transformer.expert_utilization() if isinstance(transformer, MoETransformer) else []


def _columns(prepared: PreparedData, source: int) -> Any:
    """One source's rows as a ``datasets.Dataset`` of texts: query, positive, negative_1..."""
    from datasets import Dataset

    rows = prepared.rows[prepared.row_source == source].tolist()
    columns = {"query": [prepared.anchor_texts[r[0]] for r in rows]}
    columns["positive"] = [prepared.doc_texts[r[1]] for r in rows]
    for j in range(2, len(rows[0])):
        columns[f"negative_{j - 1}"] = [prepared.doc_texts[r[j]] for r in rows]
    return Dataset.from_dict(columns)


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


def evaluate(
    model: SBMoEModel, args: FinetuneArguments, routing_before: dict[str, torch.Tensor], use_head: bool = True
) -> dict[str, Any]:
    """Metrics, per-query values and expert utilization on each ``--eval-data`` set.

    Documents and queries go through the (cached) pooled backbone and then the head in eval mode, which is
    exactly what ``model.encode`` computes; ``use_head=False`` scores the backbone alone (the zero-shot baseline).

    Raises:
        DataError: an eval set with no query that can be scored (see :func:`~sbmoe.evaluation.coverage.coverage`).
    """
    results: dict[str, Any] = {}
    head, cos = find_head(model) if use_head else None, args.similarity == "cos"
    for spec in eval_specs(args):
        dataset = load_dataset(spec, data_dir=args.data_dir)
        counts = coverage(dataset)
        notes = coverage_warnings(spec, dataset, counts, args.keep_identical_ids)
        if not use_head:  # the zero-shot pass runs before training: warn then, once
            for line in notes:
                logger.warning(line)
        query_ids = list(dataset.queries)
        docs = list(dataset.iter_docs())
        doc_ids, doc_texts = [doc.id for doc in docs], [doc.full_text for doc in docs]
        doc_vectors = pooled_features(model, doc_texts, "corpus", args.cache_dir)
        queries = pooled_features(model, [dataset.queries[q] for q in query_ids], "queries", args.cache_dir)
        query_emb, doc_emb = embed(head, queries, "query", cos), embed(head, doc_vectors, "document", cos)
        result = evaluate_embeddings(
            query_emb.numpy(), doc_emb.numpy(), query_ids, doc_ids, dataset.qrels, top_k=1000, metrics=METRICS,
            relevance_level=dataset.relevance_level, ignore_identical_ids=not args.keep_identical_ids,
        )  # fmt: skip
        scores = per_query(dataset.qrels, result["run"], METRICS, dataset.relevance_level)
        results[spec] = {
            "metrics": result["metrics"],
            "num_queries": len(query_ids),
            "judged_queries": counts["judged"],
            "answerable_queries": counts["answerable"],
            "warnings": notes,
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


def zero_shot_model(model: SBMoEModel, args: FinetuneArguments) -> SBMoEModel:
    """The model whose untrained encodings give the zero-shot baseline and mine the hard negatives: ``model`` itself,
    or for upcycled MoE layers the dense backbone, which they equal at initialisation (to 1e-5; a head, if any, is
    left out of mining), so its cached vectors are reused instead of encoding every corpus again."""
    if not args.moe_layers:
        return model
    return build_model(args.backbone, head=False, normalize=False, max_seq_length=args.max_seq_length)


def check_output_dir(output: Path, args: FinetuneArguments) -> None:
    """Refuse to replace a finished run (``run.json`` present) unless ``--overwrite`` or ``--resume``.

    Raises:
        FileExistsError: naming the folder and the ways out.
    """
    if (output / "run.json").is_file() and not (args.overwrite or args.resume):
        raise FileExistsError(
            f"{output} already holds a finished run (run.json); pass --overwrite to replace it, "
            "or choose another --output-dir"
        )


def run(args: FinetuneArguments, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Fine-tune as ``args`` says, save the model and ``run.json`` to ``args.output_dir``, return the run record.

    Under torchrun or accelerate launch, ``--train full`` trains data-parallel (every rank prepares the same data;
    the Trainer gives each rank its share of the batches); then only rank 0 evaluates and writes, and the other
    ranks return a record of their training alone (``rank`` > 0, no ``eval``).
    """
    start = time.time()
    pin_local_gpu()
    check_output_dir(Path(args.output_dir), args)
    if args.threads:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)
    model = make_model(args)
    with frozen_bottom(model[0].auto_model, args.frozen_layers, args.token_cache_dir) as bottom:
        return train_and_evaluate(model, args, callbacks or [], bottom, start)


def train_and_evaluate(
    model: SBMoEModel, args: FinetuneArguments, callbacks: list[TrainerCallback], bottom: Any, start: float
) -> dict[str, Any]:
    """:func:`run`'s work once the model is built: zero-shot scores, mining, training, saving, evaluation."""
    output = Path(args.output_dir)
    sets = load_train_sets(args.train_data, args.data_dir, args.max_positives_per_query)
    initial = zero_shot_model(model, args)
    zero_shot = evaluate(initial, args, {}, use_head=False)  # also checks every eval set before training
    prepared = prepare(initial, args, sets)  # vectors for mining (and the head): the initial model's
    head = find_head(model)
    cluster_shares = None
    if args.router_init == "kmeans" and head is not None and head.num_experts > 1:
        cluster_shares = kmeans_router_init(head, prepared.docs, seed=args.seed)
    routing_before = initial_routing(model, args)
    set_seed(args.seed)
    if args.train == "head":
        history = train_head_mode(model, args, prepared)
    else:
        history = train_full_mode(model, args, prepared, callbacks)
    rank, world_size = process_rank()
    record: dict[str, Any] = {
        "arguments": asdict(args),
        "world_size": world_size,
        "threads": torch.get_num_threads(),
        "head_parameters": count_parameters(find_head(model)),
        "parameters": {"total": count_parameters(model), "active": active_parameters(model)},
        "train_examples": len(prepared.rows),
        "sources": [source.summary() for source in prepared.sources],
        "dev_queries": prepared.dev_queries,
        "history": history,
        "kmeans_cluster_shares": cluster_shares,
    }
    if rank:  # rank 0 evaluates, saves and writes run.json
        return {**record, "rank": rank, "eval": {}, "seconds": time.time() - start}
    if prepared.dev_queries and args.train == "full":  # the backbone moved: re-encode the dev queries and the corpus
        reencode(model, prepared, args.cache_dir)
    if args.tune_strength:  # scores every strength on dev, 1.0 (the head as trained) included
        record["strength"] = tune_strength(find_head(model), prepared, args.similarity == "cos")
        record["dev_nDCG@10"] = record["strength"]["dev_nDCG@10"][str(record["strength"]["chosen"])]
    elif prepared.dev_queries:
        record["dev_nDCG@10"] = dev_ndcg(find_head(model), prepared, args.similarity == "cos")
    output.mkdir(parents=True, exist_ok=True)
    if args.save_model:
        model.save(str(output))
    record["eval"] = evaluate(model, args, routing_before)
    record["moe_utilization"] = moe_utilization(model, args)
    record["zero_shot"] = {spec: {"metrics": result["metrics"]} for spec, result in zero_shot.items()}
    if bottom is not None:
        record["frozen_bottom"] = bottom.stats()
    record["seconds"] = time.time() - start
    write_atomic(output / "run.json", json.dumps(record, indent=1))
    return record
