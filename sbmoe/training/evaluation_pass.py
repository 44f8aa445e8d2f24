"""The evaluation passes of fine-tuning: :func:`~sbmoe.evaluation.evaluator.evaluate_model` on each ``--eval-data``
set (loaded once per run, see :func:`load_eval_sets`), expert use, and a warning for experts that (nearly) no input
reaches."""

from __future__ import annotations

from typing import Any

import numpy as np

from sbmoe.data import RetrievalDataset, load_dataset
from sbmoe.evaluation.evaluator import evaluate_model
from sbmoe.heads.moe_block import moe_blocks
from sbmoe.heads.stacked import StackedMoEHead
from sbmoe.heads.upcycle import MoETransformer
from sbmoe.model import SBMoEModel, find_head
from sbmoe.retrieval.encoder import Encoder, pooled_model
from sbmoe.training.arguments import FinetuneArguments

METRICS = ("nDCG@10", "MAP@100", "Recall@100", "MRR@10")
DEAD_EXPERT_SHARE = 0.01
EvalSets = dict[str, RetrievalDataset]


def load_eval_sets(args: FinetuneArguments) -> EvalSets:
    """The ``--eval-data`` sets by spec, each loaded once (a run's passes all take this dict)."""
    return {spec: load_dataset(spec, data_dir=args.data.data_dir) for spec in eval_specs(args)}


def moe_utilization(
    model: SBMoEModel, args: FinetuneArguments, eval_sets: EvalSets, encoder_docs: int = 200
) -> list[dict[str, Any]]:
    """Per MoE layer, top-1 expert shares over the documents of the first eval set in eval mode: all of them for a
    stacked head (on the cached pooled vectors), the first ``encoder_docs`` for MoE layers in the backbone (encoded
    anew). Empty for a model without MoE layers or without eval data."""
    if not moe_blocks(model) or not eval_sets:
        return []
    dataset = next(iter(eval_sets.values()))
    if isinstance(find_head(model), StackedMoEHead):
        routing = Encoder(model, args.data.cache_dir).encode(dataset, "corpus").routing
        return routing.as_dict()["layers"] if routing is not None else []
    transformer = model[0]
    if not isinstance(transformer, MoETransformer):
        return []
    texts = [doc.full_text for doc, _ in zip(dataset.iter_docs(), range(encoder_docs), strict=False)]
    model.eval()
    with transformer.recorder() as recorder:
        model.encode(texts, batch_size=32)
    return transformer.expert_utilization(recorder)


def utilization(chosen: np.ndarray, num_experts: int, initial: np.ndarray | None = None) -> dict[str, Any]:
    """Share of documents per expert, routing entropy (nats), and share whose expert changed since ``initial``."""
    shares = (np.bincount(chosen, minlength=num_experts) / max(len(chosen), 1)).tolist()
    out: dict[str, Any] = {"shares": shares, "min_share": min(shares)}
    out["entropy"] = -sum(p * float(np.log(p)) for p in shares if p > 0)
    if initial is not None:
        out["changed_from_init"] = float(np.mean(chosen != initial))
    return out


def evaluate(
    model: SBMoEModel,
    *,
    args: FinetuneArguments,
    eval_sets: EvalSets,
    routing_before: dict[str, np.ndarray],
    use_head: bool = True,
) -> dict[str, dict[str, Any]]:
    """:func:`~sbmoe.evaluation.evaluator.evaluate_model`'s result on each eval set (by spec), with per-query values,
    plus ``experts`` (the head's document shares, and those that changed expert since ``routing_before``).

    Documents and queries go through the (cached) pooled backbone and then the tail, which is exactly what
    ``model.encode`` computes; ``use_head=False`` scores the backbone alone (the zero-shot baseline).

    Raises:
        DataError: an eval set with no query that can be scored (see :func:`~sbmoe.evaluation.coverage.coverage`).
    """
    scored = model if use_head else pooled_model(model, normalize=args.training.similarity == "cos")
    head = find_head(scored)
    results: dict[str, dict[str, Any]] = {}
    for spec, dataset in eval_sets.items():
        results[spec] = evaluate_model(
            scored,
            dataset,
            top_k=1000,
            metrics=METRICS,
            cache_dir=args.data.cache_dir,
            ignore_identical_ids=not args.data.keep_identical_ids,
        )
        if head is not None and head.num_experts > 1:
            chosen = Encoder(scored, args.data.cache_dir).encode(dataset, "corpus").experts
            results[spec]["experts"] = utilization(chosen, head.num_experts, routing_before.get(dataset.name))
    return results


def eval_specs(args: FinetuneArguments) -> list[str]:
    """The ``--eval-data`` entries."""
    return [s.strip() for s in args.data.eval_data.split(",") if s.strip()]


def initial_routing(model: SBMoEModel, args: FinetuneArguments, eval_sets: EvalSets) -> dict[str, np.ndarray]:
    """Top-1 expert per document of each eval corpus before training (to count documents that change expert)."""
    head = find_head(model)
    if head is None or head.num_experts == 1:
        return {}
    encoder = Encoder(model, args.data.cache_dir)
    out: dict[str, np.ndarray] = {}
    for dataset in eval_sets.values():
        if dataset.name not in out:
            out[dataset.name] = encoder.encode(dataset, "corpus").experts
    return out


def dead_expert_warnings(
    evaluation: dict[str, Any], layers: list[dict[str, Any]], share: float = DEAD_EXPERT_SHARE
) -> list[str]:
    """One line per eval set or MoE layer where an expert takes under ``share`` of the inputs (top-1), naming them;
    ``evaluation`` is :func:`evaluate`'s result and ``layers`` :func:`moe_utilization`'s. A layer in a reuse group is
    judged on its own experts only: the others' are foreign candidates, weighed by a reuse scale that may stay near
    0, and each is judged in the layer that owns it."""
    where = [(spec, result["experts"]["shares"], 0) for spec, result in evaluation.items() if "experts" in result]
    for i, layer in enumerate(layers):
        first, end = layer.get("own_candidates", (0, len(layer["shares"])))
        where.append((f"MoE layer {layer.get('layer', i)}", layer["shares"][first:end], first))
    lines = []
    for name, shares, first in where:
        dead = [f"{first + e} ({s:.1%})" for e, s in enumerate(shares) if s < share]
        if dead:
            lines.append(
                f"{name}: expert(s) {', '.join(dead)} get under {share:.0%} of the inputs; the router has collapsed "
                "onto the others (raise --aux-loss-weight, or use fewer experts)"
            )
    return lines
