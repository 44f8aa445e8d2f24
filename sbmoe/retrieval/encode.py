"""Encode once per (backbone, corpus): pooled backbone vectors come from the cache, the model's tail runs on top.

A model is split at its pooling module: everything up to pooling (the expensive part) is encoded once per corpus
and cached under a key of the backbone's weights, its max length and the texts; the tail (an SB-MoE head, a dense
head, ``Normalize``) costs about 0.1% of encoding and is applied to the cached vectors on every call. So the plain
backbone, any number of heads on it, ``evaluate``, ``finetune``, ``index`` and ``search`` share one encoding.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling

from sbmoe.data.dataset import Doc, RetrievalDataset
from sbmoe.model import find_head
from sbmoe.retrieval.cache import cached_embeddings

TASKS = {"corpus": "document", "queries": "query"}
TAIL_BATCH = 4096


def split_at_pooling(model: SentenceTransformer) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """``(modules up to and including the last Pooling, the modules after it)``; no Pooling: all, none."""
    modules = list(model)
    cut = max((i for i, module in enumerate(modules) if isinstance(module, Pooling)), default=len(modules) - 1)
    return modules[: cut + 1], modules[cut + 1 :]


def pooled_model(model: SentenceTransformer) -> SentenceTransformer:
    """The modules of ``model`` up to its pooling, sharing their weights (and the model's prompts)."""
    modules, _ = split_at_pooling(model)
    return SentenceTransformer(
        modules=modules,
        device=str(model.device),
        prompts=dict(model.prompts or {}),
        default_prompt_name=model.default_prompt_name,
    )


def apply_tail(
    model: SentenceTransformer, vectors: np.ndarray | torch.Tensor, task: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Run the modules after pooling (eval mode, no gradient) on pooled ``vectors`` of ``task`` (query/document).

    Returns:
        The embeddings, and each row's top-1 expert (int64) when the tail has an SB-MoE head, else None.
    """
    _, tail = split_at_pooling(model)
    x = torch.as_tensor(np.array(vectors, dtype=np.float32))  # a copy: cached vectors are read-only memmaps
    if not tail:
        return x.numpy(), None
    out = np.empty((len(x), model.get_embedding_dimension() or x.shape[1]), dtype=np.float32)
    experts = np.full(len(x), -1, dtype=np.int64)
    for module in tail:
        module.eval()
    with torch.no_grad():
        for start in range(0, len(x), TAIL_BATCH):
            features: dict[str, Any] = {"sentence_embedding": x[start : start + TAIL_BATCH].to(model.device)}
            features["task"] = task
            for module in tail:
                features = module(features)
            out[start : start + TAIL_BATCH] = features["sentence_embedding"].float().cpu().numpy()
            if "expert_index" in features:
                experts[start : start + TAIL_BATCH] = features["expert_index"].cpu().numpy()
    return out, experts if find_head(model) is not None else None


def encode_cached(
    model: SentenceTransformer,
    items: RetrievalDataset | Sequence[str] | Sequence[Doc],
    kind: str,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    show_progress: bool = True,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Embeddings as ``model.encode_document`` / ``encode_query`` gives them, from cached pooled vectors.

    Args: as :func:`sbmoe.retrieval.cache.cached_embeddings`; only the modules up to pooling are encoded (and keyed).

    Returns:
        The embeddings and the pooled cache entry's metadata plus ``utilization`` (the SB-MoE head's routing
        statistics over these items) and ``experts`` (each item's top-1 expert), both None without a head.
    """
    vectors, meta = cached_embeddings(pooled_model(model), items, kind, cache_dir, batch_size, show_progress)
    head = find_head(model)
    if head is not None:
        head.reset_routing_stats()
    embeddings, experts = apply_tail(model, vectors, TASKS[kind])
    utilization = head.routing_stats() if head is not None else None
    return embeddings, {**meta, "utilization": utilization, "experts": experts}


def pooled_features(
    model: SentenceTransformer,
    items: Sequence[str],
    kind: str,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Pooled backbone vectors of ``items`` as a tensor (the head trainer's input), encoded once, then cached."""
    vectors, _ = cached_embeddings(pooled_model(model), items, kind, cache_dir, batch_size, show_progress=True)
    return torch.from_numpy(np.array(vectors))


def unit_rows(x: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """Rows scaled to unit length, chunk by chunk (returned as is, e.g. still memory-mapped, when they already are)."""
    norms = np.concatenate([np.linalg.norm(x[i : i + chunk], axis=1) for i in range(0, len(x), chunk)] or [[]])
    if np.allclose(norms, 1.0, atol=1e-4):
        return x
    out = np.empty(x.shape, dtype=np.float32)
    for i in range(0, len(x), chunk):
        out[i : i + chunk] = x[i : i + chunk] / np.maximum(norms[i : i + chunk, None], 1e-12)
    return out
