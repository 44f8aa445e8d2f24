"""build_model: Hugging Face encoder -> mean pooling -> SB-MoE head, as a SentenceTransformer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

from sbmoe.backbones import HUB_IDS, OFFLINE_DEFAULT, resolve_backbone
from sbmoe.data.dataset import DataError, beir_text
from sbmoe.heads import SBMoEHead

Document = Mapping[str, str]
PLAIN_SUFFIX = "-plain"
LEGACY_HEAD_REF = "sbmoe.head.SBMoEHead"  # models saved before the heads/ package


class SBMoEModel(SentenceTransformer):
    """A SentenceTransformer that also speaks BEIR's ``encode_queries`` / ``encode_corpus`` protocol.

    It loads its own ``sbmoe`` modules without ``trust_remote_code`` (it trusts only this package's classes);
    the saved folder also reloads with ``SentenceTransformer(path, trust_remote_code=True)``.
    """

    def _load_module_class_from_ref(self, class_ref: str, *args, **kwargs) -> type:
        if class_ref in (f"{SBMoEHead.__module__}.{SBMoEHead.__qualname__}", LEGACY_HEAD_REF):
            return SBMoEHead
        return super()._load_module_class_from_ref(class_ref, *args, **kwargs)

    @property
    def head(self) -> SBMoEHead | None:
        """The SB-MoE head module, or None for a plain (headless) model."""
        return find_head(self)

    def _create_model_card(self, *args, **kwargs) -> None:
        """Write the model card without counting its example encodes in the head's routing statistics."""
        head = self.head
        counts = head.expert_counts.clone() if head is not None else None
        try:
            super()._create_model_card(*args, **kwargs)
        finally:
            if head is not None:
                head.expert_counts.copy_(counts)

    def encode_queries(self, queries: Sequence[str], batch_size: int = 64, **kwargs) -> np.ndarray | torch.Tensor:
        """Encode query texts (BEIR protocol)."""
        return self.encode_query(list(queries), batch_size=batch_size, **kwargs)

    def encode_corpus(
        self, corpus: Sequence[Document] | Mapping[str, Sequence[str]], batch_size: int = 64, **kwargs
    ) -> np.ndarray | torch.Tensor:
        """Encode documents given as BEIR dicts (``title`` + ``text``) or as a dict of columns (BEIR protocol)."""
        return self.encode_document(document_texts(corpus), batch_size=batch_size, **kwargs)


def document_texts(corpus: Sequence[Document] | Mapping[str, Sequence[str]]) -> list[str]:
    """BEIR's document texts (see :func:`sbmoe.data.beir_text`) of a list of dicts or a dict of columns."""
    if isinstance(corpus, Mapping):
        titles = corpus.get("title") or [""] * len(corpus["text"])
        return [beir_text(title, text) for title, text in zip(titles, corpus["text"], strict=True)]
    return [beir_text(doc.get("title"), doc.get("text")) for doc in corpus]


def find_head(model: torch.nn.Module) -> SBMoEHead | None:
    """The first SB-MoE head inside ``model`` (any SentenceTransformer), or None."""
    return next((m for m in model.modules() if isinstance(m, SBMoEHead)), None)


def build_model(
    backbone: str = OFFLINE_DEFAULT,
    num_experts: int = 6,
    routing: str = "learned",
    top_k: int = 2,
    inference: str = "soft",
    head: bool = True,
    normalize: bool = True,
    max_seq_length: int = 256,
    device: str | None = None,
    **head_kwargs: Any,
) -> SBMoEModel:
    """Build backbone -> mean pooling -> SB-MoE head.

    Args:
        backbone: ``minilm`` (offline default), ``tinybert``, ``bert-small``, ``bert-base``, ``contriever``,
            ``contriever-msmarco``, any Hub id, or a local folder (a plain HF encoder or a SentenceTransformer).
        num_experts: Experts in the head.
        routing: ``learned`` (default) or ``faithful`` (the paper, whose router gets no gradient).
        top_k: Experts per input while training in ``learned`` mode.
        inference: ``soft``, ``top1`` or ``topk`` routing at inference.
        head: False gives the plain backbone with mean pooling (the baseline).
        normalize: L2-normalise the output embedding (cosine similarity).
        max_seq_length: Token limit of the backbone (lowered to its position limit when that is smaller).
        device: torch device; None picks CUDA when available.
        **head_kwargs: Further :class:`SBMoEHead` options (``expert_hidden``, ``noise``, ``residual``).
    """
    transformer = Transformer(resolve_backbone(backbone), max_seq_length=max_seq_length)
    dim = transformer.get_embedding_dimension()
    modules: list[torch.nn.Module] = [transformer, Pooling(dim, pooling_mode="mean")]
    if head:
        modules.append(
            SBMoEHead(
                dim,
                num_experts=num_experts,
                top_k=top_k,
                routing=routing,
                inference=inference,
                normalize_output=normalize,
                **head_kwargs,
            )
        )
    elif normalize:
        modules.append(Normalize())
    model = SBMoEModel(modules=modules, device=device, similarity_fn_name="cosine" if normalize else "dot")
    return _cap_length(model)


def load_model(path: str, device: str | None = None) -> SBMoEModel:
    """Load a saved sbmoe model (or any SentenceTransformer folder) as an :class:`SBMoEModel`."""
    return SBMoEModel(path, device=device)


def load_any_model(spec: str, device: str | None = None) -> SentenceTransformer:
    """A model from a name or path.

    Args:
        spec: A backbone name (``minilm``, ``minilm-plain``, ``bert-base``...: the plain backbone, mean pooling,
            normalised, max 256 tokens, no head), a SentenceTransformer folder (a saved sbmoe model keeps its
            head), a plain Hugging Face encoder folder (mean pooling added), or a Hub id of a SentenceTransformer.
        device: torch device; None picks CUDA when available.
    """
    name = spec.removesuffix(PLAIN_SUFFIX)
    path = Path(spec).expanduser()
    if name == OFFLINE_DEFAULT or name in HUB_IDS:
        model = build_model(name, head=False, device=device)
    elif (path / "modules.json").is_file():
        model = load_model(str(path), device=device)
    elif path.is_dir():
        model = build_model(str(path), head=False, device=device)
    elif path.suffix or spec.startswith((".", "/", "~")):
        raise DataError(f"model folder {path} not found")
    else:
        model = load_model(spec, device=device)
    return _cap_length(model)


def _cap_length(model: SentenceTransformer) -> SentenceTransformer:
    """Lower ``max_seq_length`` to the encoder's position limit (small encoders have fewer than 256)."""
    config = getattr(getattr(model[0], "auto_model", None), "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if limit and model.max_seq_length and model.max_seq_length > limit:
        model.max_seq_length = limit
    return model
