"""Head-only training on cached pooled backbone vectors: the loop, model selection on dev (epoch 0 included)."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from sbmoe.heads.moe_block import moe_blocks, set_psr
from sbmoe.heads.sbmoe_head import SBMoEHead
from sbmoe.training.arguments import TrainingArguments
from sbmoe.training.head_checkpoint import CHECKPOINT_FILE, HeadTrainResult, Loop, Progress, run_key, save
from sbmoe.training.head_checkpoint import resume as resume_checkpoint
from sbmoe.training.losses import QrelAwareInfoNCE, check_finite, domain_routing_loss
from sbmoe.training.sampling import homogeneous_batches

logger = logging.getLogger(__name__)


# The training arguments that decide the head loop's result, bar the epochs (with the source weights: a run's key).
LOOP_SETTINGS = (
    *("batch_size", "learning_rate", "weight_decay", "similarity", "temperature", "aux_loss_weight"),
    *("z_loss_weight", "anchor_weight", "patience", "seed", "domain_loss_weight", "symmetric_loss"),
    "one_positive_per_epoch",
)


def train_head(
    head: SBMoEHead,
    anchors: Tensor,
    docs: Tensor,
    examples: Tensor,
    config: TrainingArguments,
    dev_score: Callable[[SBMoEHead], float] | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    dev_name: str = "dev score",
    sources: Tensor | None = None,
    relevant: Tensor | None = None,
    source_weights: list[float] | None = None,
) -> HeadTrainResult:
    """Train ``head`` alone with qrel-aware in-batch + hard-negative InfoNCE on cached vectors.

    The result depends only on the inputs, ``config`` and the torch thread count: the same seed gives the same
    weights bit for bit, and so does a run killed and resumed from its checkpoint.

    Args:
        head: The head to train in place; on return it holds the weights of the best dev epoch (or the last).
            Epoch 0, the head before training, is a candidate too.
        anchors: A x H pooled vectors of the anchors (queries, and titles for self-supervision).
        docs: D x H pooled vectors of the documents.
        examples: N x (2 + negatives) int64 rows ``[anchor row, positive doc row, negative doc rows...]``.
        config: Optimisation settings (``epochs`` rounded down to whole epochs).
        dev_score: Called before training and after each epoch; higher is better. Enables early stopping with
            ``config.patience``. With PSR, no epoch before the candidate pool is fully open is kept.
        checkpoint_dir: Where the state after each epoch is written (atomically), or None for no checkpoints.
        resume: Continue from the checkpoint in ``checkpoint_dir`` when it holds one of this run (same
            settings, data and head); otherwise start from the beginning and replace it.
        dev_name: What ``dev_score`` measures, for the messages.
        sources: Each example row's training source; with several, every batch comes from one source, sources get
            batches by ``source_weights`` (None: by size), and ``config.domain_loss_weight`` can supervise
            the router to send each source to its own experts (:func:`~sbmoe.training.losses.domain_routing_loss`).
        relevant: K x 2 ``(anchor row, doc row)`` pairs judged relevant, masked out of each anchor's negatives
            (None: each example's own positive only).
        source_weights: Batches per source, relative (see ``sources``); None: by size.

    Raises:
        TrainingDivergedError: when the loss becomes NaN or infinite.
    """
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    relevant = examples[:, :2] if relevant is None else relevant
    loss_fn = QrelAwareInfoNCE(config.similarity, config.temperature, relevant, len(docs), config.symmetric_loss)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    progress = Progress(HeadTrainResult(), copy.deepcopy(head.state_dict()))
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    settings = {**{name: getattr(config, name) for name in LOOP_SETTINGS}, "source_weights": source_weights}
    key = run_key(head, settings, anchors, docs, examples, sources, relevant)
    if checkpoint is not None and resume:
        resume_checkpoint(checkpoint, key, Loop(head, optimizer, generator, progress))
    elif checkpoint is not None:
        checkpoint.unlink(missing_ok=True)  # another run's: --resume must not pick it up
    num_sources = 1 if sources is None else int(sources.max()) + 1
    planned = int(config.epochs)
    progress.result.selectable_from = selectable_epoch(head, planned)
    if dev_score is not None and progress.epoch == 0:
        _consider(head, dev_score(head), 0, config, progress)
        logger.info("epoch 0 (before training): %s %.4f", dev_name, progress.result.initial_dev_score)
    remaining = range(progress.epoch + 1, planned + 1)
    epochs = tqdm(remaining, desc="head epochs", leave=False, initial=progress.epoch, total=planned)
    for epoch in epochs:
        if progress.result.stopped_early:
            break
        head.train()
        total, total_aux, total_domain = 0.0, 0.0, 0.0
        batches = epoch_batches(examples, sources, config, generator, source_weights)
        for step, (rows, domain) in enumerate(batches, start=1):
            set_psr(head, progress=(epoch - 1 + (step - 1) / len(batches)) / planned)
            loss, aux, domain_loss = _step_loss(head, anchors, docs, rows, loss_fn, config, domain, num_sources)
            check_finite(loss, f"epoch {epoch}, step {step}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
            total_aux += aux
            total_domain += domain_loss
        _count_batches(progress, batches, num_sources)
        progress.result.losses.append(total / len(batches))
        progress.result.aux_losses.append(total_aux / len(batches))
        if config.domain_loss_weight:
            progress.result.domain_losses.append(total_domain / len(batches))
        line = f"epoch {epoch}/{planned}: loss {progress.result.losses[-1]:.4f}"
        if dev_score is not None:
            _consider(head, dev_score(head), epoch, config, progress)
            line += f", {dev_name} {progress.result.dev_scores[-1]:.4f}"
        logger.info(line)
        if checkpoint is not None:
            save(checkpoint, key, Loop(head, optimizer, generator, progress))
    if dev_score is None:
        progress.result.best_epoch = progress.epoch
    else:
        head.load_state_dict(progress.best_state)
    head.eval()
    progress.result.kept = kept_message(progress.result, config, dev_name if dev_score is not None else None)
    logger.info(progress.result.kept)
    return progress.result


def selectable_epoch(head: SBMoEHead, epochs: int) -> int:
    """The first epoch that may be kept: with PSR, the first that ends with every MoE block's pool fully open."""
    opens = [block.psr_until for block in moe_blocks(head) if block.psr != "none"]
    return max(1, math.ceil(max(opens, default=0.0) * epochs - 1e-9))


def _consider(head: SBMoEHead, score: float, epoch: int, config: TrainingArguments, progress: Progress) -> None:
    """Record epoch ``epoch``'s dev score (0: before training); keep the head's weights if it is the best candidate
    so far; decide early stopping (epochs before :func:`selectable_epoch` are neither candidates nor stale)."""
    result = progress.result
    if epoch == 0:
        result.initial_dev_score = score
    else:
        result.dev_scores.append(score)
        if epoch < result.selectable_from:
            return
    if score > progress.best_score:
        progress.best_score, progress.best_state, progress.stale = score, copy.deepcopy(head.state_dict()), 0
        result.best_epoch = epoch
    elif epoch:
        progress.stale += 1
        result.stopped_early = bool(config.patience) and progress.stale >= config.patience


def _count_batches(progress: Progress, batches: list[tuple[Tensor, int | None]], num_sources: int) -> None:
    """Add an epoch's batches per source to the run's counts and update the realised shares."""
    counts = progress.batch_counts or [0] * num_sources
    for _, source in batches:
        counts[source or 0] += 1
    progress.batch_counts = counts
    progress.result.batch_shares = [c / sum(counts) for c in counts]


def kept_message(result: HeadTrainResult, config: TrainingArguments, dev_name: str | None) -> str:
    """Which epoch the trained head holds and why, in words (``dev_name`` None: there was no dev split)."""
    ran, planned = len(result.losses), int(config.epochs)
    resumed = f"; resumed after epoch {result.resumed_from}" if result.resumed_from else ""
    if dev_name is None:
        return f"kept the last epoch, {ran} of {planned} (no dev split){resumed}"
    if result.best_epoch == 0:
        best = result.initial_dev_score
        message = f"kept epoch 0 of {ran} (the model before training): best {dev_name} {best:.4f}"
    else:
        best = result.dev_scores[result.best_epoch - 1]
        message = f"kept epoch {result.best_epoch} of {ran}: best {dev_name} {best:.4f}"
    if result.stopped_early:
        message += f"; stopped after {config.patience} epochs without gain ({planned} planned)"
    elif result.best_epoch < ran:
        message += f"; the last epoch scored {result.dev_scores[-1]:.4f}"
    else:
        message += " (the last epoch)"
    if result.selectable_from > 1:
        message += f"; epochs before {result.selectable_from} (PSR pool not fully open) were not candidates"
    return message + resumed


def epoch_batches(
    examples: Tensor,
    sources: Tensor | None,
    config: TrainingArguments,
    generator: torch.Generator,
    source_weights: list[float] | None = None,
) -> list[tuple[Tensor, int | None]]:
    """One epoch of ``(example rows, source)`` batches: a shuffled split for one source (source None), homogeneous
    batches by :func:`~sbmoe.training.sampling.homogeneous_batches` for several. With
    ``config.one_positive_per_epoch``, each anchor contributes one random example (positive) per epoch."""
    if config.one_positive_per_epoch:
        chosen = one_row_per_anchor(examples[:, 0], generator)
        examples, sources = examples[chosen], None if sources is None else sources[chosen]
    if sources is None or int(sources.max()) == 0:
        order = torch.randperm(len(examples), generator=generator)
        return [(rows, None) for rows in examples[order].split(config.batch_size)]
    members = [torch.nonzero(sources == s).squeeze(1) for s in range(int(sources.max()) + 1)]
    sizes = [len(m) for m in members]
    batches = homogeneous_batches(sizes, config.batch_size, source_weights, generator)
    return [(examples[members[source][local]], source) for source, local in batches]


def one_row_per_anchor(anchor_rows: Tensor, generator: torch.Generator) -> Tensor:
    """Indices of one random row per distinct anchor (ascending), as the SB-MoE repository samples positives."""
    order = torch.randperm(len(anchor_rows), generator=generator)
    _, inverse = torch.unique(anchor_rows[order], return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(order), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(len(order)), reduce="amin")
    return order[first].sort().values


def _step_loss(
    head: SBMoEHead,
    anchors: Tensor,
    docs: Tensor,
    rows: Tensor,
    loss_fn: QrelAwareInfoNCE,
    config: TrainingArguments,
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
    loss = loss_fn(columns, rows[:, 0], rows[:, 1:])
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
