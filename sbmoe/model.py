"""build_model: Hugging Face encoder -> mean pooling -> SB-MoE head, as a SentenceTransformer."""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Mapping, Sequence
from difflib import get_close_matches
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
from sbmoe.heads.stacked import StackedMoEHead
from sbmoe.heads.upcycle import MoELayers, MoETransformer, expert_plan
from sbmoe.model_folder import DEFAULT_ROUTE, TaskRouter, routed_module, with_sbmoe_section
from sbmoe.quiet import quiet_loading

Document = Mapping[str, str]
PLAIN_SUFFIX = "-plain"
LEGACY_HEAD_REF = "sbmoe.head.SBMoEHead"  # models saved before the heads/ package
HEAD_ARGS = ("num_experts", "routing", "top_k", "inference")  # build_model's own head arguments
HEAD_OPTIONS = tuple(k for k in SBMoEHead.config_keys if k not in ("in_features", "normalize_output", *HEAD_ARGS))


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
    num_experts: int | None = None,
    routing: str | None = None,
    top_k: int | None = None,
    inference: str | None = None,
    head: bool | None = None,
    normalize: bool = True,
    max_seq_length: int = 256,
    device: str | None = None,
    moe_layers: MoELayers | None = None,
    init: str = "copies",
    reuse_group: int = 1,
    psr: str = "none",
    pregate: bool = False,
    head_layers: int = 0,
    **head_options: Any,
) -> SBMoEModel:
    """Build backbone -> mean pooling -> SB-MoE head (or a stacked MoE head, or MoE layers inside the backbone).

    Args:
        backbone: ``minilm`` (offline default), ``minilm-l3`` / ``minilm-l2`` (its first 3 / 2 layers, offline
            stand-ins for TinyBERT), ``tinybert``, ``bert-small``, ``bert-base``, ``contriever``,
            ``contriever-msmarco``, any Hub id, or a local folder (a plain HF encoder or a SentenceTransformer).
        num_experts: Experts in the head (default 6), or per MoE layer with ``moe_layers`` (default 8).
        routing: ``learned`` (default) or ``faithful`` (the paper, whose router gets no gradient).
        top_k: Experts per input while training in ``learned`` mode (default 2), or per token with ``moe_layers``.
        inference: ``soft`` (default), ``top1`` or ``topk`` routing at inference.
        head: False gives no head (the plain backbone, the baseline; it takes no head argument). Default: a head,
            unless ``moe_layers`` is given.
        normalize: L2-normalise the output embedding (cosine similarity).
        max_seq_length: Token limit of the backbone (lowered to its position limit when that is smaller).
        device: torch device; None picks CUDA when available.
        moe_layers: Upcycle these backbone layers' feed-forward blocks into MoE layers: ``"all"``, ``"every-2"``
            or indices (see :func:`sbmoe.heads.upcycle.upcycle_encoder`).
        init: ``copies`` or ``fine`` (fine-grained slices) upcycling of the MoE layers.
        reuse_group: ReXMoE group size r of the MoE layers or of the stacked head's layers.
        psr: Progressive scaling routing while training: ``none``, ``linear`` or ``step``.
        pregate: Pre-gated routing (each MoE layer's experts chosen from the previous MoE layer's input).
        head_layers: L > 0 puts a stack of L MoE layers after pooling (:class:`~sbmoe.heads.stacked.StackedMoEHead`).
        **head_options: Further :class:`SBMoEHead` options (``expert_hidden``, ``noise``, ``residual``,
            ``identity_init``, ``query_only``, ``strength``, ``expert_dropout``).

    Raises:
        TypeError: a keyword that is no head option.
        ValueError: head arguments with ``head=False`` (they would be ignored); both ``moe_layers`` and
            ``head_layers``; a backbone without a BERT-style feed-forward block with ``moe_layers``.
        BackboneUnavailableError: a backbone that cannot be loaded (see :func:`sbmoe.backbones.resolve_backbone`).
    """
    moe = None
    if moe_layers is not None:
        if head_layers:
            raise ValueError("build_model() takes moe_layers (MoE inside the backbone) or head_layers, not both")
        moe = {"moe_layers": moe_layers, "num_experts": num_experts or 8, "top_k": top_k or 2, "init": init}
        moe.update(reuse_group=reuse_group, psr=psr, pregate=pregate)
        num_experts = top_k = None
    elif (reuse_group, psr, pregate) != (1, "none", False) and not head_layers:
        raise ValueError("reuse_group, psr and pregate need moe_layers or head_layers")
    head = head if head is not None else moe is None
    arguments = {"num_experts": num_experts, "routing": routing, "top_k": top_k, "inference": inference}
    head_args = _head_args({**arguments, **head_options}, head)
    transformer = _transformer(backbone, max_seq_length, moe)
    dim = transformer.get_embedding_dimension()
    modules: list[torch.nn.Module] = [transformer, Pooling(dim, pooling_mode="mean")]
    if head and head_layers:
        stack = {"reuse_group": reuse_group, "psr": psr, "pregate": pregate}
        modules.append(StackedMoEHead(dim, head_layers, normalize_output=normalize, **stack, **head_args))
    elif head:
        modules.append(SBMoEHead(dim, normalize_output=normalize, **head_args))
    elif normalize:
        modules.append(Normalize())
    model = SBMoEModel(modules=modules, device=device, similarity_fn_name="cosine" if normalize else "dot")
    return _cap_length(model)


def _transformer(backbone: str, max_seq_length: int, moe: dict[str, Any] | None) -> Transformer:
    """The backbone's Transformer module (its first layers only for ``minilm-l3`` / ``minilm-l2``), upcycled into an
    :class:`~sbmoe.heads.upcycle.MoETransformer` when ``moe`` holds MoE-layer settings."""
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


def _head_args(arguments: dict[str, Any], head: bool) -> dict[str, Any]:
    """The head arguments given (not None); TypeError for a keyword that is no head option, ValueError for any
    head argument without a head."""
    options = (*HEAD_ARGS, *HEAD_OPTIONS)
    unknown = [k for k in arguments if k not in options]
    if unknown:
        named = ", ".join(_with_closest(k, options) for k in unknown)
        raise TypeError(f"build_model() got unexpected keyword arguments: {named}; head options: {', '.join(options)}")
    given = {k: v for k, v in arguments.items() if v is not None}
    if given and not head:
        listed = ", ".join(f"{k}={v!r}" for k, v in given.items())
        raise ValueError(f"build_model(head=False) builds no head, but head arguments were given: {listed}")
    return given


def _with_closest(name: str, options: Sequence[str]) -> str:
    """``'name'``, followed by ``(did you mean 'option'?)`` when an option is close."""
    close = get_close_matches(name, options, n=1)
    return f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


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
        return build_model(name, head=False, device=device)
    where = locate(spec)
    if Path(where).is_dir() and not (Path(where) / "modules.json").is_file():
        return build_model(where, head=False, device=device)
    return _cap_length(load_model(where, device=device))


def _cap_length(model: SentenceTransformer) -> SentenceTransformer:
    """Lower ``max_seq_length`` to the encoder's position limit (small encoders have fewer than 256)."""
    config = getattr(getattr(model[0], "auto_model", None), "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if limit and model.max_seq_length and model.max_seq_length > limit:
        model.max_seq_length = limit
    return model
