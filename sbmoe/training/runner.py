"""Fine-tuning: train an SB-MoE (or dense, or no) head, alone on cached pooled vectors or with the backbone.

:func:`run` writes a SentenceTransformer folder plus ``run.json`` (arguments, losses, expert utilization, eval
metrics with per-query values) to the output directory.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, set_seed

from sbmoe.data.trainset import load_train_sets
from sbmoe.files import write_atomic
from sbmoe.heads.build import count_parameters
from sbmoe.heads.moe_block import active_parameters
from sbmoe.model import SBMoEModel, build_model, find_head
from sbmoe.retrieval.encoder import Encoder
from sbmoe.training.arguments import FinetuneArguments
from sbmoe.training.evaluation_pass import (
    dead_expert_warnings,
    evaluate,
    initial_routing,
    load_eval_sets,
    moe_utilization,
)
from sbmoe.training.frozen_bottom import frozen_bottom
from sbmoe.training.full_trainer import train_full_mode
from sbmoe.training.head_trainer import kmeans_router_init, train_head
from sbmoe.training.prepared import PreparedData, dev_ndcg, prepare, reencode
from sbmoe.training.sampling import parse_weights

logger = logging.getLogger(__name__)
STRENGTHS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)


def tune_strength(model: SBMoEModel, prepared: PreparedData, weighting: str = "equal") -> dict[str, Any]:
    """Set the head's ``strength`` to the value in :data:`STRENGTHS` with the best dev nDCG@10 (ties: the stronger
    head).

    Returns:
        ``{"chosen": strength, "dev_nDCG@10": {strength: score}}``.
    """
    head = find_head(model)
    if head is None or not prepared.dev_queries:
        raise ValueError("--tune-strength needs a head and dev queries (--dev-queries > 0)")
    encoder = Encoder(model)
    scores: dict[str, float] = {}
    for strength in STRENGTHS:
        head.strength = strength
        scores[str(strength)] = dev_ndcg(encoder, prepared, weighting=weighting)["metrics"]["nDCG@10"]
    head.strength = max(STRENGTHS, key=lambda s: (scores[str(s)], s))
    return {"chosen": head.strength, "dev_nDCG@10": scores}


def train_head_mode(model: SBMoEModel, args: FinetuneArguments, prepared: PreparedData) -> dict[str, Any]:
    """Train the head alone on the cached vectors; the backbone is never touched."""
    head = find_head(model)
    if head is None:
        return {"note": "no head: nothing to train in head mode"}
    encoder = Encoder(model)

    def dev(_head: object) -> float:
        """Dev nDCG@10 of the model as it is now (``train_head`` passes the head it trains in place: the model's)."""
        return dev_ndcg(encoder, prepared, weighting=args.data.dev_weighting)["metrics"]["nDCG@10"]

    result = train_head(
        head,
        prepared.anchors,
        prepared.docs,
        prepared.rows,
        args.training,
        dev_score=dev if prepared.dev_queries else None,
        checkpoint_dir=Path(args.training.output_dir) / "checkpoints" / "head",
        resume=args.training.resume,
        dev_name="dev nDCG@10",
        sources=prepared.row_source,
        relevant=prepared.relevant,
        source_weights=parse_weights(args.data.train_weights, [source.examples for source in prepared.sources]),
    )
    return asdict(result)


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


def zero_shot_model(model: SBMoEModel, args: FinetuneArguments) -> SBMoEModel:
    """The model whose untrained encodings give the zero-shot baseline and mine the hard negatives: ``model`` itself,
    or for upcycled MoE layers the dense backbone, which they equal at initialisation (to 1e-5; a head, if any, is
    left out of mining), so its cached vectors are reused instead of encoding every corpus again."""
    if not args.model.moe_layers:
        return model
    return build_model(args.model.backbone, normalize=False, max_seq_length=args.model.max_seq_length)


def finetune_model(args: FinetuneArguments) -> SBMoEModel:
    """The model ``args`` describes: the backbone (with its MoE layers) and head, output normalised for cosine."""
    cos, model = args.training.similarity == "cos", args.model
    return build_model(model.backbone, args.head, args.moe_layers_config(), cos, max_seq_length=model.max_seq_length)


def check_output_dir(output: Path, args: FinetuneArguments) -> None:
    """Refuse to replace a finished run (``run.json`` present) unless ``--overwrite`` or ``--resume``.

    Raises:
        FileExistsError: naming the folder and the ways out.
    """
    if (output / "run.json").is_file() and not (args.training.overwrite or args.training.resume):
        raise FileExistsError(
            f"{output} already holds a finished run (run.json); pass --overwrite to replace it, "
            "or choose another --output-dir"
        )


def run(args: FinetuneArguments, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Fine-tune as ``args`` says, save the model and ``run.json`` to ``--output-dir``, return the run record.

    Under torchrun or accelerate launch, ``--train full`` trains data-parallel (every rank prepares the same data;
    the Trainer gives each rank its share of the batches); then only rank 0 evaluates and writes, and the other
    ranks return a record of their training alone (``rank`` > 0, no ``eval``).
    """
    start = time.time()
    pin_local_gpu()
    check_output_dir(Path(args.training.output_dir), args)
    if args.training.threads:
        torch.set_num_threads(args.training.threads)
    set_seed(args.training.seed)
    model = finetune_model(args)
    with frozen_bottom(model[0].auto_model, args.model.frozen_layers, args.model.token_cache_dir) as bottom:
        return train_and_evaluate(model, args, callbacks or [], bottom, start)


def train_and_evaluate(
    model: SBMoEModel, args: FinetuneArguments, callbacks: list[TrainerCallback], bottom: Any, start: float
) -> dict[str, Any]:
    """:func:`run`'s work once the model is built: zero-shot scores, mining, training, saving, evaluation."""
    output = Path(args.training.output_dir)
    sets = load_train_sets(args.data.train_data, args.data.data_dir, args.data.max_positives_per_query)
    initial = zero_shot_model(model, args)
    eval_sets = load_eval_sets(args)  # loaded once: every pass below takes them
    zero_shot = evaluate(initial, args=args, eval_sets=eval_sets, routing_before={}, use_head=False)  # checks them
    prepared = prepare(initial, args, sets)  # vectors for mining (and the head): the initial model's
    head = find_head(model)
    cluster_shares = None
    if args.training.router_init == "kmeans" and head is not None and head.num_experts > 1:
        cluster_shares = kmeans_router_init(head, prepared.docs, seed=args.training.seed)
    routing_before = initial_routing(model, args, eval_sets)
    set_seed(args.training.seed)
    if args.training.train == "head":
        history = train_head_mode(model, args, prepared)
    else:
        history = train_full_mode(model, args, prepared, callbacks)
    rank, world_size = process_rank()
    record: dict[str, Any] = {
        "arguments": args.flat(),
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
    if prepared.dev_queries and args.training.train == "full":  # the backbone moved: re-encode dev and the corpus
        reencode(model, prepared, args.data.cache_dir)
    if args.training.tune_strength:  # scores every strength on dev, 1.0 (the head as trained) included
        record["strength"] = tune_strength(model, prepared, args.data.dev_weighting)
        record["dev_nDCG@10"] = record["strength"]["dev_nDCG@10"][str(record["strength"]["chosen"])]
    elif prepared.dev_queries:
        dev = dev_ndcg(Encoder(model), prepared, weighting=args.data.dev_weighting)
        record["dev_nDCG@10"] = dev["metrics"]["nDCG@10"]
        record["kept_zero_shot"] = history.get("best_epoch", history.get("best_step")) == 0
    output.mkdir(parents=True, exist_ok=True)
    if args.training.save_model:
        model.training_data = args.data.train_data  # the model card names it
        model.save(str(output))
    record["eval"] = evaluate(model, args=args, eval_sets=eval_sets, routing_before=routing_before)
    record["moe_utilization"] = moe_utilization(model, args, eval_sets)
    record["expert_warnings"] = dead_expert_warnings(record["eval"], record["moe_utilization"])
    for line in record["expert_warnings"]:
        logger.warning(line)
    record["zero_shot"] = {
        spec: {"metrics": result["metrics"], "per_query": {"nDCG@10": result["per_query"]["nDCG@10"]}}
        for spec, result in zero_shot.items()
    }
    if bottom is not None:
        record["frozen_bottom"] = bottom.stats()
    record["seconds"] = time.time() - start
    write_atomic(output / "run.json", json.dumps(record, indent=1))
    return record
