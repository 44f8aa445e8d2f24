"""Pooled backbone vectors (the head's input), cached on disk through :mod:`sbmoe.cache`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize

from sbmoe.cache import encode_cached
from sbmoe.head import SBMoEHead


def pooled_model(model: SentenceTransformer) -> SentenceTransformer:
    """The modules of ``model`` before its head (or its final Normalize), sharing their weights."""
    modules = []
    for module in model:
        if isinstance(module, SBMoEHead | Normalize):
            break
        modules.append(module)
    return SentenceTransformer(modules=modules, device=str(model.device))


def pooled_features(
    model: SentenceTransformer,
    items: Sequence[str],
    kind: str,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Pooled backbone vectors of ``items`` (N x H float32), encoded once and then read from the cache.

    Args:
        model: A model whose modules before the head are the (frozen or current) backbone.
        items: Texts (a corpus as `title + " " + text`, in file order, to share cache entries).
        kind: ``queries`` or ``corpus``.
        cache_dir: Cache root (default ``.cache/sbmoe``); entries are keyed by the backbone weights and texts.
        batch_size: Encoding batch size.
    """
    vectors = encode_cached(pooled_model(model), items, kind, cache_dir, batch_size, show_progress=kind == "corpus")
    return torch.from_numpy(vectors.copy())
