"""Head-only training on cached pooled backbone vectors: hard-negative mining, the loop, early stopping."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from sbmoe.heads.sbmoe_head import SBMoEHead
from sbmoe.training.losses import check_finite, info_nce


@dataclass
class HeadTrainConfig:
    """Settings of :func:`train_head` (the ``finetune`` flags of the same names)."""

    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    similarity: str = "cos"
    temperature: float = 0.05
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    anchor_weight: float = 0.0
    patience: int = 0
    seed: int = 0


@dataclass
class HeadTrainResult:
    """What :func:`train_head` measured: mean loss per epoch, dev score per epoch, the epoch kept."""

    losses: list[float] = field(default_factory=list)
    aux_losses: list[float] = field(default_factory=list)
    dev_scores: list[float] = field(default_factory=list)
    best_epoch: int = 0


def embed(head: SBMoEHead | None, x: Tensor, task: str, normalize: bool = True, batch_size: int = 4096) -> Tensor:
    """Apply ``head`` (eval mode, no gradient) to pooled vectors ``x`` of ``task`` (``query``/``document``).

    With no head: ``x``, L2-normalised when ``normalize``.
    """
    if head is None:
        return torch.nn.functional.normalize(x, dim=-1) if normalize else x
    was_training = head.training
    head.eval()
    with torch.no_grad():
        out = torch.cat(
            [head({"sentence_embedding": b, "task": task})["sentence_embedding"] for b in x.split(batch_size)]
        )
    head.train(was_training)
    return out


def mine_hard_negatives(
    query_emb: Tensor, doc_emb: Tensor, positives: Sequence[set[int]], count: int, exclude_top: int = 0
) -> np.ndarray:
    """The ``count`` highest-scoring documents per query that are not its positives, via :mod:`sbmoe.index`.

    Args:
        query_emb: Q x H query embeddings of the current model.
        doc_emb: D x H document embeddings of the current model.
        positives: Per query, the document rows to exclude.
        count: Negatives per query.
        exclude_top: Further top-ranked non-positives to skip (likely unlabelled positives).

    Returns:
        Q x count int64 array of document rows.
    """
    from sbmoe.retrieval.index import DenseIndex

    depth = min(doc_emb.shape[0], count + exclude_top + max((len(p) for p in positives), default=0))
    index = DenseIndex(doc_emb.shape[1], "flat")
    index.add(doc_emb.numpy().astype(np.float32))
    _, rows = index.search(query_emb.numpy().astype(np.float32), depth)
    mined = np.zeros((len(positives), count), dtype=np.int64)
    for i, (ranked, pos) in enumerate(zip(rows, positives, strict=True)):
        kept = [int(r) for r in ranked if r >= 0 and int(r) not in pos][exclude_top : exclude_top + count]
        mined[i] = (kept + kept[:1] * count)[:count] if kept else 0
    return mined


def train_head(
    head: SBMoEHead,
    anchors: Tensor,
    docs: Tensor,
    examples: Tensor,
    config: HeadTrainConfig,
    dev_score: Callable[[SBMoEHead], float] | None = None,
) -> HeadTrainResult:
    """Train ``head`` alone with in-batch + hard-negative InfoNCE on cached vectors.

    Args:
        head: The head to train in place; on return it holds the weights of the best dev epoch (or the last).
        anchors: A x H pooled vectors of the anchors (queries, and titles for self-supervision).
        docs: D x H pooled vectors of the documents.
        examples: N x (2 + negatives) int64 rows ``[anchor row, positive doc row, negative doc rows...]``.
        config: Optimisation settings.
        dev_score: Called after each epoch; higher is better. Enables early stopping with ``config.patience``.

    Raises:
        TrainingDivergedError: when the loss becomes NaN or infinite.
    """
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    loss_fn = info_nce(config.similarity, config.temperature)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    result = HeadTrainResult()
    best_score, best_state, stale = -math.inf, copy.deepcopy(head.state_dict()), 0
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    for epoch in tqdm(range(1, config.epochs + 1), desc="head epochs", leave=False):
        head.train()
        total, total_aux = 0.0, 0.0
        order = torch.randperm(len(examples), generator=generator)
        for step, rows in enumerate(examples[order].split(config.batch_size), start=1):
            loss, aux = _step_loss(head, anchors, docs, rows, loss_fn, config)
            check_finite(loss, f"epoch {epoch}, step {step}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
            total_aux += aux
        result.losses.append(total / steps_per_epoch)
        result.aux_losses.append(total_aux / steps_per_epoch)
        if dev_score is None:
            continue
        score = dev_score(head)
        result.dev_scores.append(score)
        if score > best_score:
            best_score, best_state, stale, result.best_epoch = score, copy.deepcopy(head.state_dict()), 0, epoch
        else:
            stale += 1
            if config.patience and stale >= config.patience:
                break
    if dev_score is None:
        result.best_epoch = len(result.losses)
    else:
        head.load_state_dict(best_state)
    head.eval()
    return result


def _step_loss(head: SBMoEHead, anchors: Tensor, docs: Tensor, rows: Tensor, loss_fn, config) -> tuple[Tensor, float]:
    """Loss of one batch: InfoNCE + weighted aux/z losses + optional pull toward the input embedding."""
    x_query, x_docs = anchors[rows[:, 0]], docs[rows[:, 1:].T.reshape(-1)]
    query = head({"sentence_embedding": x_query, "task": "query"})["sentence_embedding"]
    aux, z = head.aux_loss, head.z_loss
    doc = head({"sentence_embedding": x_docs, "task": "document"})["sentence_embedding"]
    aux, z = (aux + head.aux_loss) / 2, (z + head.z_loss) / 2
    columns = [query, *doc.view(rows.shape[1] - 1, len(rows), -1).unbind(0)]
    loss = loss_fn.compute_loss_from_embeddings(columns, None)
    loss = loss + config.aux_loss_weight * aux + config.z_loss_weight * z
    if config.anchor_weight:
        pull = 1 - torch.nn.functional.cosine_similarity(torch.cat([query, doc]), torch.cat([x_query, x_docs]))
        loss = loss + config.anchor_weight * pull.mean()
    return loss, aux.item()


def kmeans_router_init(head: SBMoEHead, docs: Tensor, seed: int = 0, steps: int = 300) -> list[float]:
    """Fit the router to the k-means clusters (one per expert) of the documents, so experts start as topics.

    Args:
        head: The head whose router (without its noise) is trained to predict each document's cluster.
        docs: D x H pooled document vectors.
        seed: k-means seed.
        steps: Full-batch Adam steps of cross-entropy on the cluster labels.

    Returns:
        The share of documents in each cluster.
    """
    import faiss

    unit = torch.nn.functional.normalize(docs, dim=-1).numpy().astype(np.float32)
    kmeans = faiss.Kmeans(unit.shape[1], head.num_experts, niter=25, seed=seed, spherical=True)
    kmeans.train(unit)
    labels = torch.from_numpy(kmeans.index.search(unit, 1)[1][:, 0]).long()
    optimizer = torch.optim.Adam(head.router.net.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head.router.net(docs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (torch.bincount(labels, minlength=head.num_experts).float() / len(labels)).tolist()
