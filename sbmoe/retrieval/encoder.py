"""Encode once per (backbone, corpus): pooled backbone vectors come from the cache, the model's tail runs on top.

A model is split at its pooling module: everything up to pooling (the expensive part) is encoded once per corpus
and cached under a key of the backbone's weights, its max length and the texts; the tail (an SB-MoE head, a dense
head, ``Normalize``) costs about 0.1% of encoding and is applied to the cached vectors on every call. So the plain
backbone, any number of heads on it, ``evaluate``, ``finetune``, ``index`` and ``search`` share one encoding.
:class:`Encoder` is the one place that runs a tail at inference; its results are values (:class:`Encoded`), routing
statistics included, so no statistic lives in a module and an SB-MoE head may encode from several threads at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

from sbmoe.data.dataset import Doc, RetrievalDataset
from sbmoe.heads.stacked import StackedMoEHead
from sbmoe.heads.usage import RoutingStats, block_utilization
from sbmoe.model import find_head
from sbmoe.retrieval.cache import cached_embeddings

TASKS = {"corpus": "document", "queries": "query"}
TAIL_BATCH = 4096
Items = RetrievalDataset | Sequence[str] | Sequence[Doc]


def split_at_pooling(model: SentenceTransformer) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """``(modules up to and including the last Pooling, the modules after it)``; no Pooling: all, none."""
    modules = list(model)
    cut = max((i for i, module in enumerate(modules) if isinstance(module, Pooling)), default=len(modules) - 1)
    return modules[: cut + 1], modules[cut + 1 :]


def pooled_model(model: SentenceTransformer, normalize: bool = False) -> SentenceTransformer:
    """The modules of ``model`` up to its pooling, sharing their weights (and the model's prompts); with
    ``normalize``, a ``Normalize`` after them (the backbone alone as a cosine model)."""
    modules, _ = split_at_pooling(model)
    return SentenceTransformer(
        modules=[*modules, Normalize()] if normalize else modules,
        device=str(model.device),
        prompts=dict(model.prompts or {}),
        default_prompt_name=model.default_prompt_name,
        similarity_fn_name="cosine" if normalize else model.similarity_fn_name,
    )


@dataclass(frozen=True)
class Encoded:
    """Embeddings of some items, each row's top-1 expert and the routing statistics over them (both None without
    an SB-MoE head), and whether the pooled vectors came from the cache."""

    vectors: np.ndarray
    experts: np.ndarray | None = None
    routing: RoutingStats | None = None
    cached: bool = False


class Encoder:
    """``model``'s embeddings as ``encode_document`` / ``encode_query`` give them, from cached pooled vectors.

    Args:
        model: Any SentenceTransformer; only its modules up to pooling are encoded (and keyed in the cache).
        cache_dir: Cache root (see :func:`sbmoe.retrieval.cache.cached_embeddings`).
        batch_size: Batch size of the backbone.
        show_progress: tqdm bars while the backbone encodes.
    """

    def __init__(
        self,
        model: SentenceTransformer,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 64,
        show_progress: bool = True,
    ):
        self.model, self.cache_dir, self.batch_size, self.show_progress = model, cache_dir, batch_size, show_progress
        self.backbone = pooled_model(model)
        self.modules = split_at_pooling(model)[1]
        self.head = find_head(model)

    def pooled(self, items: Items, kind: str) -> torch.Tensor:
        """Pooled backbone vectors of ``items`` (``kind``: ``corpus`` or ``queries``) as a tensor, encoded once,
        then read from the cache."""
        return torch.from_numpy(np.array(self._cached(items, kind)[0]))

    def encode(self, items: Items, kind: str) -> Encoded:
        """:meth:`tail` of the cached pooled vectors of ``items`` (``kind``: ``corpus`` or ``queries``)."""
        vectors, meta = self._cached(items, kind)
        return replace(self.tail(vectors, TASKS[kind]), cached=meta["cached"])

    def _cached(self, items: Items, kind: str) -> tuple[np.ndarray, dict[str, Any]]:
        return cached_embeddings(self.backbone, items, kind, self.cache_dir, self.batch_size, self.show_progress)

    def encode_texts(self, texts: Sequence[str], task: str) -> Encoded:
        """:meth:`tail` of ``texts`` encoded now, without the cache (search queries, streamed chunks)."""
        encode = self.backbone.encode_query if task == "query" else self.backbone.encode_document
        pooled = encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)
        return self.tail(pooled, task)

    def tail(self, vectors: np.ndarray | torch.Tensor, task: str) -> Encoded:
        """Run the modules after pooling (eval mode, no gradient) on pooled ``vectors`` of ``task`` (``query`` or
        ``document``)."""
        x = torch.as_tensor(np.array(vectors, dtype=np.float32))  # a copy: cached vectors are read-only memmaps
        if not self.modules:
            return Encoded(x.numpy())
        out = np.empty((len(x), self.model.get_embedding_dimension() or x.shape[1]), dtype=np.float32)
        experts, choices = [], []
        for module in self.modules:
            module.eval()
        with torch.no_grad():
            for start in range(0, len(x), TAIL_BATCH):
                features: dict[str, Any] = {"sentence_embedding": x[start : start + TAIL_BATCH].to(self.model.device)}
                features["task"] = task
                for module in self.modules:
                    features = module(features)
                out[start : start + TAIL_BATCH] = features["sentence_embedding"].float().cpu().numpy()
                if "expert_index" in features:
                    experts.append(features["expert_index"].cpu().numpy())
                if "layer_choices" in features:
                    choices.append(features["layer_choices"].cpu().numpy())
        if self.head is None:
            return Encoded(out)
        index = np.concatenate(experts) if experts else np.zeros(0, dtype=np.int64)
        return Encoded(out, index.astype(np.int64), self._routing(index, choices))

    def _routing(self, expert_index: np.ndarray, choices: list[np.ndarray]) -> RoutingStats:
        """The head's routing statistics from its top-1 experts (and a stacked head's per-layer choices)."""
        layers = []
        if isinstance(self.head, StackedMoEHead):
            chosen = np.concatenate(choices) if choices else np.zeros((0, len(self.head.layers)), dtype=np.int64)
            for i, block in enumerate(self.head.layers):
                layers.append(block_utilization(block, np.bincount(chosen[:, i], minlength=block.candidates).tolist()))
        return RoutingStats.of(expert_index, self.head.num_experts, layers)


def unit_rows(x: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """Rows scaled to unit length, chunk by chunk (returned as is, e.g. still memory-mapped, when they already are)."""
    norms = np.concatenate([np.linalg.norm(x[i : i + chunk], axis=1) for i in range(0, len(x), chunk)] or [[]])
    if np.allclose(norms, 1.0, atol=1e-4):
        return x
    out = np.empty(x.shape, dtype=np.float32)
    for i in range(0, len(x), chunk):
        out[i : i + chunk] = x[i : i + chunk] / np.maximum(norms[i : i + chunk, None], 1e-12)
    return out
