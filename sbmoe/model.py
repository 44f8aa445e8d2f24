"""build_model: Hugging Face encoder -> mean pooling -> SB-MoE head, as a SentenceTransformer."""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

from sbmoe.backbones import KNOWN_NAMES, OFFLINE_DEFAULT, backbone_layers, locate, resolve_backbone
from sbmoe.data.dataset import beir_text
from sbmoe.errors import ModelLoadError
from sbmoe.heads import SBMoEHead
from sbmoe.heads.base import PooledHead
from sbmoe.heads.build import build_head
from sbmoe.heads.config import HeadConfig, MoELayersConfig
from sbmoe.heads.upcycle import MoETransformer, expert_plan
from sbmoe.model_folder import DEFAULT_ROUTE, TaskRouter, routed_module, with_sbmoe_section
from sbmoe.quiet import quiet_loading

Document = Mapping[str, str]
PLAIN_SUFFIX = "-plain"
LEGACY_HEAD_REF = "sbmoe.head.SBMoEHead"  # models saved before the heads/ package


class OwnModuleClasses(dict):
    """This package's module classes by ``modules.json`` / ``router_config.json`` reference, imported on lookup:
    what :class:`SBMoEModel` (and a ``Router`` inside it) loads without ``trust_remote_code``."""

    def get(self, class_ref: str, default: Any = None) -> Any:
        if class_ref == LEGACY_HEAD_REF:
            return SBMoEHead
        if class_ref.startswith("sbmoe."):
            module, _, name = class_ref.rpartition(".")
            return getattr(importlib.import_module(module), name)
        return default

    def __bool__(self) -> bool:  # sentence-transformers hands the mapping to a Router only when it is truthy
        return True


class SBMoEModel(SentenceTransformer):
    """A SentenceTransformer that also speaks BEIR's ``encode_queries`` / ``encode_corpus`` protocol.

    It loads its own ``sbmoe`` modules without ``trust_remote_code`` (it trusts only this package's classes);
    the saved folder also reloads with ``SentenceTransformer(path, trust_remote_code=True)``. A query-only head is
    saved inside a sentence-transformers ``Router`` (routes ``query`` and ``document``, default ``document``), so
    stock ``encode_query`` / ``encode_document`` / ``encode`` give the same vectors as this class; in memory the head
    stays a module of its own.

    Attributes:
        training_data: What the head was trained on (``sbmoe finetune`` sets it), for the model card.
    """

    _module_classes = OwnModuleClasses()
    training_data: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with quiet_loading():
            super().__init__(*args, **kwargs)
        for name, module in list(self._modules.items()):
            self._modules[name] = routed_module(module) or module

    def _load_module_class_from_ref(self, class_ref: str, *args: Any, **kwargs: Any) -> type:
        own = OwnModuleClasses().get(class_ref)  # also when a trainer's checkpoint reload swaps the mapping
        return own or super()._load_module_class_from_ref(class_ref, *args, **kwargs)

    def expert_plan(self, texts: Sequence[str], batch_size: int = 32) -> list[dict[str, Any]]:
        """Per MoE layer, the experts each batch of ``texts`` needs (see :func:`sbmoe.heads.upcycle.expert_plan`)."""
        return expert_plan(self, texts, batch_size)

    @property
    def head(self) -> PooledHead | None:
        """The head module (SB-MoE or stacked), or None for a plain (headless) model."""
        return find_head(self)

    def save(self, path: str, *args: Any, **kwargs: Any) -> None:
        """``SentenceTransformer.save``, with each query-only module inside a ``Router`` (see the class)."""
        modules = dict(self._modules)
        for name, module in modules.items():
            if getattr(module, "query_only", False):
                self._modules[name] = TaskRouter({"query": [module], "document": [module]}, DEFAULT_ROUTE, False)
        try:
            super().save(path, *args, **kwargs)
        finally:
            self._modules.update(modules)

    def _create_model_card(self, path: str, *args: Any, **kwargs: Any) -> None:
        """Write sentence-transformers' model card plus how to load the folder and what its head is."""
        head = self.head
        if head is not None and head.query_only:  # its examples must be encoded as queries and documents
            self.model_card_data.ir_model = True
        super()._create_model_card(path, *args, **kwargs)
        card = Path(path) / "README.md"
        if card.is_file():
            card.write_text(
                with_sbmoe_section(card.read_text(encoding="utf-8"), find_head(self), self.training_data),
                encoding="utf-8",
            )

    def encode(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        """``SentenceTransformer.encode``; without ``task``, a query-only head takes the ``document`` route (as the
        saved ``Router`` does): use ``encode_query`` for queries."""
        head = self.head
        if head is not None and head.query_only and kwargs.get("task") is None:
            kwargs["task"] = DEFAULT_ROUTE
        return super().encode(inputs, *args, **kwargs)

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


def find_head(model: torch.nn.Module) -> PooledHead | None:
    """The first head (SB-MoE or stacked) inside ``model`` (any SentenceTransformer), or None."""
    return next((m for m in model.modules() if isinstance(m, PooledHead)), None)


def build_model(
    backbone: str = OFFLINE_DEFAULT,
    head: HeadConfig | None = None,
    moe: MoELayersConfig | None = None,
    normalize: bool = True,
    max_seq_length: int = 256,
    device: str | None = None,
) -> SBMoEModel:
    """Build backbone -> mean pooling -> the head ``head`` describes (SB-MoE, dense or stacked), optionally with the
    MoE layers ``moe`` inside the backbone.

    Args:
        backbone: ``minilm`` (offline default), ``minilm-l3`` / ``minilm-l2`` (its first 3 / 2 layers, offline
            stand-ins for TinyBERT), ``tinybert``, ``bert-small``, ``bert-base``, ``contriever``,
            ``contriever-msmarco``, any Hub id, or a local folder (a plain HF encoder or a SentenceTransformer).
        head: The head after pooling; None (or ``head="none"``) gives none (the plain backbone, the baseline).
        moe: Upcycle backbone layers' feed-forward blocks into MoE layers (see
            :func:`sbmoe.heads.upcycle.upcycle_encoder`).
        normalize: L2-normalise the output embedding (cosine similarity).
        max_seq_length: Token limit of the backbone (lowered to its position limit when that is smaller).
        device: torch device; None picks CUDA when available.

    Raises:
        ValueError: both ``moe`` and a stacked head; the stacked head's ``reuse_group`` / ``psr`` / ``pregate``
            without ``head_layers`` or ``moe``; a backbone without a BERT-style feed-forward block with ``moe``.
        BackboneUnavailableError: a backbone that cannot be loaded (see :func:`sbmoe.backbones.resolve_backbone`).
    """
    if head is not None and moe is not None and head.head_layers:
        raise ValueError("build_model() takes moe (MoE inside the backbone) or a stacked head, not both")
    if head is not None and head.stack_options and not head.head_layers and moe is None:
        raise ValueError("reuse_group, psr and pregate need moe or a stacked head (head_layers)")
    transformer = _transformer(backbone, max_seq_length, moe)
    dim = transformer.get_embedding_dimension()
    modules: list[torch.nn.Module] = [transformer, Pooling(dim, pooling_mode="mean")]
    module = build_head(dim, head, normalize) if head is not None else None
    if module is not None:
        modules.append(module)
    elif normalize:
        modules.append(Normalize())
    model = SBMoEModel(modules=modules, device=device, similarity_fn_name="cosine" if normalize else "dot")
    return _cap_length(model)


def _transformer(backbone: str, max_seq_length: int, moe: MoELayersConfig | None) -> Transformer:
    """The backbone's Transformer module (its first layers only for ``minilm-l3`` / ``minilm-l2``), upcycled into an
    :class:`~sbmoe.heads.upcycle.MoETransformer` when ``moe`` is given."""
    layers = backbone_layers(backbone)
    with quiet_loading():
        if moe is None:
            transformer = Transformer(resolve_backbone(backbone), max_seq_length=max_seq_length)
        else:  # built with its first layers only (upcycling happens on load): the later layers' weights go unused
            config = {"num_hidden_layers": layers} if layers is not None else {}
            with quiet_loading(load_report=layers is None):  # its load report would list those unused weights
                return MoETransformer(
                    resolve_backbone(backbone), max_seq_length=max_seq_length, config_kwargs=config, moe=moe
                )
    if layers is not None:
        keep_first_layers(transformer, layers)
    return transformer


def keep_first_layers(transformer: Transformer, layers: int) -> None:
    """Truncate a BERT-like encoder to its first ``layers`` layers, in place. Its config says so too, so the model
    saves only those layers' weights and reloads as a ``layers``-layer model."""
    encoder = transformer.auto_model.encoder
    encoder.layer = encoder.layer[:layers]
    transformer.auto_model.config.num_hidden_layers = layers


def load_model(path: str, device: str | None = None) -> SBMoEModel:
    """Load a saved sbmoe model (or any SentenceTransformer folder) as an :class:`SBMoEModel`.

    Raises:
        ModelLoadError: in one line, for a folder naming a module class outside sentence-transformers and sbmoe
            (sentence-transformers' trust check) or holding a pickled weights file that is not plain tensors.
    """
    try:
        return SBMoEModel(path, device=device)
    except pickle.UnpicklingError as err:
        raise ModelLoadError(
            f"{path}: holds a pickled weights file that is not plain tensors, and pickles are never loaded (they "
            "can run code): save the model with safetensors"
        ) from err
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise ModelLoadError(
            f"{path}: modules.json names a module class outside sentence-transformers and sbmoe; sbmoe does not run "
            "third-party code: load it with SentenceTransformer(path, trust_remote_code=True) if you trust it"
        ) from err


def load_any_model(spec: str, device: str | None = None) -> SentenceTransformer:
    """A model from a name or path.

    Args:
        spec: A backbone name (``minilm``, ``minilm-plain``, ``bert-base``...: the plain backbone, mean pooling,
            normalised, max 256 tokens, no head), a SentenceTransformer folder (a saved sbmoe model keeps its
            head), a plain Hugging Face encoder folder (mean pooling added), or a Hub id of a SentenceTransformer.
        device: torch device; None picks CUDA when available.

    Raises:
        BackboneUnavailableError: in one line: no such folder (with the closest one), an unknown name (with the
            closest known one), or a Hub id that is not cached while the Hub is out of reach.
    """
    name = spec.removesuffix(PLAIN_SUFFIX)
    if name in KNOWN_NAMES:
        return build_model(name, device=device)
    where = locate(spec)
    if Path(where).is_dir() and not (Path(where) / "modules.json").is_file():
        return build_model(where, device=device)
    return _cap_length(load_model(where, device=device))


def _cap_length(model: SentenceTransformer) -> SentenceTransformer:
    """Lower ``max_seq_length`` to the encoder's position limit (small encoders have fewer than 256)."""
    config = getattr(getattr(model[0], "auto_model", None), "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if limit and model.max_seq_length and model.max_seq_length > limit:
        model.max_seq_length = limit
    return model
