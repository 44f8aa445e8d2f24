"""Head-only training on cached pooled backbone vectors: hard-negative mining, the loop, early stopping."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from sbmoe.files import atomic_file
from sbmoe.heads.moe_block import set_psr
from sbmoe.heads.sbmoe_head import SBMoEHead
from sbmoe.training.losses import check_finite, domain_routing_loss, info_nce
from sbmoe.training.sampling import homogeneous_batches

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
CHECKPOINT_FORMAT = 1


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
    source_weights: list[float] | None = None
    domain_loss_weight: float = 0.0


@dataclass
class HeadTrainResult:
    """What :func:`train_head` measured: mean loss and dev score per epoch, the epoch kept and why.

    ``resumed_from`` is the epoch of the checkpoint training resumed from (0: from the start); ``kept`` says in
    words which epoch the head holds and why.
    """

    losses: list[float] = field(default_factory=list)
    aux_losses: list[float] = field(default_factory=list)
    domain_losses: list[float] = field(default_factory=list)
    dev_scores: list[float] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    resumed_from: int = 0
    kept: str = ""


@dataclass
class _Progress:
    """Everything the loop carries from epoch to epoch besides the head and optimizer (checkpointed with them)."""

    result: HeadTrainResult
    best_state: dict[str, Tensor]
    best_score: float = -math.inf
    stale: int = 0

    @property
    def epoch(self) -> int:
        return len(self.result.losses)


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
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    dev_name: str = "dev score",
    sources: Tensor | None = None,
) -> HeadTrainResult:
    """Train ``head`` alone with in-batch + hard-negative InfoNCE on cached vectors.

    The result depends only on the inputs, ``config`` and the torch thread count: the same seed gives the same
    weights bit for bit, and so does a run killed and resumed from its checkpoint.

    Args:
        head: The head to train in place; on return it holds the weights of the best dev epoch (or the last).
        anchors: A x H pooled vectors of the anchors (queries, and titles for self-supervision).
        docs: D x H pooled vectors of the documents.
        examples: N x (2 + negatives) int64 rows ``[anchor row, positive doc row, negative doc rows...]``.
        config: Optimisation settings.
        dev_score: Called after each epoch; higher is better. Enables early stopping with ``config.patience``.
        checkpoint_dir: Where the state after each epoch is written (atomically), or None for no checkpoints.
        resume: Continue from the checkpoint in ``checkpoint_dir`` when it holds one of this run (same settings,
            data and head); otherwise start from the beginning and replace it.
        dev_name: What ``dev_score`` measures, for the closing message.
        sources: Each example row's training source; with several, every batch comes from one source, sources get
            batches by ``config.source_weights`` (None: by size), and ``config.domain_loss_weight`` can supervise
            the router to send each source to its own experts (:func:`~sbmoe.training.losses.domain_routing_loss`).

    Raises:
        TrainingDivergedError: when the loss becomes NaN or infinite.
    """
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    loss_fn = info_nce(config.similarity, config.temperature)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    progress = _Progress(HeadTrainResult(), copy.deepcopy(head.state_dict()))
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    key = _run_key(head, config, anchors, docs, examples, sources)
    if checkpoint is not None and resume:
        _resume(checkpoint, key, _Loop(head, optimizer, generator, progress))
    elif checkpoint is not None:
        checkpoint.unlink(missing_ok=True)  # another run's: --resume must not pick it up
    num_sources = 1 if sources is None else int(sources.max()) + 1
    epochs = tqdm(range(progress.epoch + 1, config.epochs + 1), desc="head epochs", leave=False,
                  initial=progress.epoch, total=config.epochs)  # fmt: skip
    for epoch in epochs:
        if progress.result.stopped_early:
            break
        head.train()
        total, total_aux, total_domain = 0.0, 0.0, 0.0
        batches = epoch_batches(examples, sources, config, generator)
        for step, (rows, domain) in enumerate(batches, start=1):
            set_psr(head, progress=(epoch - 1 + (step - 1) / len(batches)) / config.epochs)
            loss, aux, domain_loss = _step_loss(head, anchors, docs, rows, loss_fn, config, domain, num_sources)
            check_finite(loss, f"epoch {epoch}, step {step}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
            total_aux += aux
            total_domain += domain_loss
        progress.result.losses.append(total / len(batches))
        progress.result.aux_losses.append(total_aux / len(batches))
        if config.domain_loss_weight:
            progress.result.domain_losses.append(total_domain / len(batches))
        if dev_score is not None:
            _score_epoch(head, dev_score(head), config, progress)
        if checkpoint is not None:
            _save(checkpoint, key, _Loop(head, optimizer, generator, progress))
    if dev_score is None:
        progress.result.best_epoch = progress.epoch
    else:
        head.load_state_dict(progress.best_state)
    head.eval()
    progress.result.kept = kept_message(progress.result, config, dev_name if dev_score is not None else None)
    logger.info(progress.result.kept)
    return progress.result


def _score_epoch(head: SBMoEHead, score: float, config: HeadTrainConfig, progress: _Progress) -> None:
    """Record the epoch's dev score; keep the head's weights if it is the best so far; decide early stopping."""
    result = progress.result
    result.dev_scores.append(score)
    if score > progress.best_score:
        progress.best_score, progress.best_state, progress.stale = score, copy.deepcopy(head.state_dict()), 0
        result.best_epoch = progress.epoch
    else:
        progress.stale += 1
        result.stopped_early = bool(config.patience) and progress.stale >= config.patience


def kept_message(result: HeadTrainResult, config: HeadTrainConfig, dev_name: str | None) -> str:
    """Which epoch the trained head holds and why, in words (``dev_name`` None: there was no dev split)."""
    ran = len(result.losses)
    resumed = f"; resumed after epoch {result.resumed_from}" if result.resumed_from else ""
    if dev_name is None:
        return f"kept the last epoch, {ran} of {config.epochs} (no dev split){resumed}"
    best = result.dev_scores[result.best_epoch - 1]
    message = f"kept epoch {result.best_epoch} of {ran}: best {dev_name} {best:.4f}"
    if result.stopped_early:
        message += f"; stopped after {config.patience} epochs without gain ({config.epochs} planned)"
    elif result.best_epoch < ran:
        message += f"; the last epoch scored {result.dev_scores[-1]:.4f}"
    else:
        message += " (the last epoch)"
    return message + resumed


def _run_key(head: SBMoEHead, config: HeadTrainConfig, *data: Tensor | None) -> str:
    """A fingerprint of what decides a run's weights (settings, data tensors, the head's configuration and initial
    weights), bar the number of epochs: a checkpoint resumes only its own run."""
    digest = hashlib.blake2b(digest_size=16)
    settings = {k: v for k, v in asdict(config).items() if k != "epochs"}
    head_config = head.get_config_dict() if hasattr(head, "get_config_dict") else {}
    digest.update(json.dumps([settings, head_config], sort_keys=True, default=str).encode())
    for tensor in (*(t for t in data if t is not None), *head.state_dict().values()):
        digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class _Loop(NamedTuple):
    """What a checkpoint saves and restores: the head, its optimizer, the batch-order generator, the progress."""

    head: SBMoEHead
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    progress: _Progress


def _save(file: Path, key: str, loop: _Loop) -> None:
    """Write the state after an epoch to ``file`` atomically (a kill leaves the previous epoch's state)."""
    head, optimizer, generator, progress = loop
    state = {
        "format": CHECKPOINT_FORMAT,
        "key": key,
        "head": head.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "result": asdict(progress.result),
        "best_state": progress.best_state,
        "best_score": progress.best_score,
        "stale": progress.stale,
    }
    with atomic_file(file) as tmp:
        torch.save(state, tmp)


def _resume(file: Path, key: str, loop: _Loop) -> None:
    """Load the checkpoint ``file`` into head, optimizer, random generators and progress, if it is this run's."""
    head, optimizer, generator, progress = loop
    if not file.is_file():
        logger.warning("--resume: no head checkpoint at %s, starting from the first epoch", file)
        return
    try:
        state: dict[str, Any] = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as err:
        logger.warning("--resume: %s cannot be read (%s); starting from the first epoch", file, err)
        return
    if state.get("format") != CHECKPOINT_FORMAT or state.get("key") != key:
        logger.warning("--resume: %s is another run's (other settings or data); starting from the first epoch", file)
        return
    head.load_state_dict(state["head"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    progress.result = HeadTrainResult(**state["result"])
    progress.best_state, progress.best_score, progress.stale = state["best_state"], state["best_score"], state["stale"]
    progress.result.resumed_from = progress.epoch
    logger.info("--resume: continuing after epoch %d from %s", progress.epoch, file)


def epoch_batches(
    examples: Tensor, sources: Tensor | None, config: HeadTrainConfig, generator: torch.Generator
) -> list[tuple[Tensor, int | None]]:
    """One epoch of ``(example rows, source)`` batches: a shuffled split for one source (source None), homogeneous
    batches by :func:`~sbmoe.training.sampling.homogeneous_batches` for several."""
    if sources is None or int(sources.max()) == 0:
        order = torch.randperm(len(examples), generator=generator)
        return [(rows, None) for rows in examples[order].split(config.batch_size)]
    members = [torch.nonzero(sources == s).squeeze(1) for s in range(int(sources.max()) + 1)]
    sizes = [len(m) for m in members]
    batches = homogeneous_batches(sizes, config.batch_size, config.source_weights, generator)
    return [(examples[members[source][local]], source) for source, local in batches]


def _step_loss(
    head: SBMoEHead,
    anchors: Tensor,
    docs: Tensor,
    rows: Tensor,
    loss_fn,
    config: HeadTrainConfig,
    domain: int | None = None,
    num_sources: int = 1,
) -> tuple[Tensor, float, float]:
    """Loss of one batch: InfoNCE + weighted aux/z losses + optional pull toward the input embedding + optional
    domain routing loss on the queries and positives (the batch's source is ``domain``)."""
    x_query, x_docs = anchors[rows[:, 0]], docs[rows[:, 1:].T.reshape(-1)]
    query_out = head({"sentence_embedding": x_query, "task": "query"})
    query, query_probs = query_out["sentence_embedding"], query_out["router_probs"]
    aux, z = head.aux_loss, head.z_loss
    doc_out = head({"sentence_embedding": x_docs, "task": "document"})
    doc = doc_out["sentence_embedding"]
    aux, z = (aux + head.aux_loss) / 2, (z + head.z_loss) / 2
    columns = [query, *doc.view(rows.shape[1] - 1, len(rows), -1).unbind(0)]
    loss = loss_fn.compute_loss_from_embeddings(columns, None)
    loss = loss + config.aux_loss_weight * aux + config.z_loss_weight * z
    if config.anchor_weight:
        pull = 1 - torch.nn.functional.cosine_similarity(torch.cat([query, doc]), torch.cat([x_query, x_docs]))
        loss = loss + config.anchor_weight * pull.mean()
    domain_loss = torch.zeros(())
    if config.domain_loss_weight and domain is not None:
        probs = torch.cat([query_probs, doc_out["router_probs"][: len(rows)]])
        domain_loss = domain_routing_loss(probs, torch.full((len(probs),), domain), num_sources)
        loss = loss + config.domain_loss_weight * domain_loss
    return loss, aux.item(), domain_loss.item()


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
