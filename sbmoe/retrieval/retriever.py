"""A :class:`Retriever` keeps a model, its faiss index and the documents' texts together: build, add, search, save."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sentence_transformers import SentenceTransformer

from sbmoe.data.corpus import load_corpus
from sbmoe.data.dataset import Doc, RetrievalDataset
from sbmoe.files import atomic_dir
from sbmoe.model import find_head, load_any_model, load_model
from sbmoe.retrieval.cache import model_fingerprint
from sbmoe.retrieval.encode import encode_cached, unit_rows
from sbmoe.retrieval.index import DenseIndex, IndexLoadError
from sbmoe.retrieval.store import DocStore

logger = logging.getLogger(__name__)

FORMAT = 1
CONFIG = "retriever.json"
INDEX_DIR, STORE_FILE, MODEL_DIR = "index", "docs.sqlite", "model"
TRAINED_TYPES = ("ivf", "ivfpq", "sq8")  # their quantizers were fitted to the first corpus

Corpus = str | os.PathLike | RetrievalDataset | Iterable[Doc | Mapping[str, str]]


@dataclass
class Hit:
    """One search result: the document's id, score, title and text, and its expert (None without a head)."""

    id: str
    score: float
    title: str
    text: str
    expert: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The hit as a JSON-ready dict."""
        return asdict(self)


class Retriever:
    """Model + index + document store behind one object.

    Build one with :meth:`build`, search it with :meth:`search`, grow it with :meth:`add`, keep it with
    :meth:`save` and reopen it with :meth:`load`. Corpus vectors go through the shared embedding cache, so
    indexing a corpus already encoded by ``evaluate`` or ``finetune`` with the same backbone costs no encoding.

    Args:
        model: The SentenceTransformer that encodes queries and documents.
        index: A :class:`~sbmoe.retrieval.index.DenseIndex` holding the documents' embeddings.
        store: The :class:`~sbmoe.retrieval.store.DocStore` with their texts.
        model_spec: How the model was named (a backbone name or folder), or None for a model object, which
            :meth:`save` then stores inside the retriever's folder.
    """

    def __init__(self, model: SentenceTransformer, index: DenseIndex, store: DocStore, model_spec: str | None = None):
        self.model, self.index, self.store, self.model_spec = model, index, store, model_spec
        self.head = find_head(model)
        self.cache_dir: str | os.PathLike | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return f"Retriever(model={self.model_spec or 'embedded'!r}, index={self.index!r}, docs={len(self.store)})"

    @classmethod
    def build(
        cls,
        model: SentenceTransformer | str,
        corpus: Corpus,
        index: str = "flat",
        index_params: dict[str, Any] | None = None,
        data_dir: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 64,
        use_gpu: bool | str = "auto",
        show_progress: bool = True,
    ) -> Retriever:
        """Encode ``corpus`` (through the cache), index it and store its texts.

        Args:
            model: A SentenceTransformer, or a name/folder for :func:`sbmoe.model.load_any_model`.
            corpus: Anything :func:`sbmoe.data.load_corpus` reads (a path or name), a dataset, or documents
                (:class:`~sbmoe.data.Doc` or dicts with ``_id``/``id``, ``title``, ``text``).
            index: Index type (``flat``, ``hnsw``, ``ivf``, ``ivfpq``, ``sq8``, ``binary``).
            index_params: Index parameters (see :class:`~sbmoe.retrieval.index.DenseIndex`).
            data_dir: Where dataset names are looked up.
            cache_dir: Embedding cache root (default :func:`sbmoe.paths.cache_dir`).
            batch_size: Encoder batch size.
            use_gpu: Index on GPU (``"auto"``, True, False).
            show_progress: Progress bars.
        """
        spec = model if isinstance(model, str) else None
        model = load_any_model(model) if isinstance(model, str) else model
        dataset = as_dataset(corpus, data_dir)
        for warning in dataset.validate():
            logger.warning(warning)
        embeddings, meta = encode_cached(model, dataset, "corpus", cache_dir, batch_size, show_progress)
        embeddings = unit_rows(embeddings) if model.similarity_fn_name == "cosine" else embeddings
        doc_ids = [doc.id for doc in dataset.iter_docs()]
        dense = DenseIndex(embeddings.shape[1], index, use_gpu=use_gpu, **(index_params or {}))
        dense.build(embeddings, doc_ids, show_progress=show_progress)
        store = DocStore.temporary()
        store.add(dataset.iter_docs(), meta["experts"])
        retriever = cls(model, dense, store, absolute_spec(spec))
        retriever.cache_dir = cache_dir
        return retriever

    def add(
        self, docs: Corpus, data_dir: str | os.PathLike | None = None, batch_size: int = 64, show_progress: bool = True
    ) -> int:
        """Index the documents of ``docs`` whose ids are new; returns how many were added.

        Raises:
            ValueError: for an index type whose quantizer was trained on the first corpus (ivf, ivfpq, sq8), when
                there are new documents: rebuild it with :meth:`build` instead.
        """
        dataset = as_dataset(docs, data_dir)
        all_docs = list(dataset.iter_docs())
        new_ids = set(self.store.missing([doc.id for doc in all_docs]))
        new_docs = [doc for doc in all_docs if doc.id in new_ids]
        if not new_docs:
            return 0
        if self.index.index_type in TRAINED_TYPES:
            raise ValueError(
                f"cannot add {len(new_docs)} new documents to a {self.index.index_type!r} index: its quantizer was "
                f"trained on the first {len(self.index)} documents and would not fit new ones; rebuild the index "
                f"(sbmoe index --rebuild), or use flat, hnsw or binary, which grow in place"
            )
        embeddings, meta = encode_cached(self.model, new_docs, "corpus", self.cache_dir, batch_size, show_progress)
        embeddings = unit_rows(embeddings) if self.model.similarity_fn_name == "cosine" else embeddings
        self.index.add(embeddings, [doc.id for doc in new_docs])
        if self.store.read_only:
            self.store = DocStore.temporary(self.store)
        self.store.add(new_docs, meta["experts"])
        return len(new_docs)

    def search(self, queries: str | Sequence[str], k: int = 10, batch_size: int = 64) -> list[list[Hit]]:
        """The top ``k`` documents for each query (a single string counts as one query), best first."""
        return self.search_with_experts(queries, k, batch_size)[0]

    def search_with_experts(
        self, queries: str | Sequence[str], k: int = 10, batch_size: int = 64
    ) -> tuple[list[list[Hit]], list[int] | None]:
        """:meth:`search`, plus each query's top-1 expert (None for a model without an SB-MoE head)."""
        texts = [queries] if isinstance(queries, str) else list(queries)
        embeddings, experts = self.encode_queries(texts, batch_size)
        scores, rows = self.index.search(embeddings, k)
        found = self.store.get(list({self.index.doc_ids[r] for r in rows.ravel().tolist() if r >= 0}))
        results = []
        for q_scores, q_rows in zip(scores.tolist(), rows.tolist(), strict=True):
            hits = []
            for score, row in zip(q_scores, q_rows, strict=True):
                if row < 0:
                    continue
                doc, expert = found[self.index.doc_ids[row]]
                hits.append(Hit(doc.id, float(score), doc.title, doc.text, expert))
            results.append(hits)
        return results, experts

    def encode_queries(self, texts: Sequence[str], batch_size: int = 64) -> tuple[np.ndarray, list[int] | None]:
        """Query embeddings (unit length for cosine models) and each query's top-1 expert (None without a head)."""
        if self.head is None:
            vectors = self.model.encode_query(list(texts), batch_size=batch_size, convert_to_numpy=True)
            experts = None
        else:
            outputs = self.model.encode_query(list(texts), batch_size=batch_size, output_value=None)
            vectors = np.stack([out["sentence_embedding"].float().cpu().numpy() for out in outputs])
            experts = [int(out["expert_index"]) for out in outputs]
        vectors = np.asarray(vectors, dtype=np.float32)
        return (unit_rows(vectors) if self.model.similarity_fn_name == "cosine" else vectors), experts

    def save(self, path: str | os.PathLike) -> Path:
        """Write model reference (or the model), index and store to the folder ``path`` atomically."""
        final = Path(path)
        with atomic_dir(final) as tmp:
            if self.model_spec is None:
                self.model.save(str(tmp / MODEL_DIR))
            self.index.model_name = self.model_spec or MODEL_DIR
            self.index.model_hash = model_fingerprint(self.model)
            self.index.save(tmp / INDEX_DIR)
            self.store.copy_to(tmp / STORE_FILE).close()
            config = {
                "format": FORMAT,
                "model": {"spec": self.model_spec, "embedded": self.model_spec is None},
                "model_fingerprint": self.index.model_hash,
                "count": len(self.index),
                "index": {"type": self.index.index_type, "params": self.index.params},
            }
            (tmp / CONFIG).write_text(json.dumps(config, indent=1))
        return final

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | None = None, use_gpu: bool | str = "auto") -> Retriever:
        """Reopen a folder written by :meth:`save`.

        Raises:
            IndexLoadError: a missing or damaged folder, or a model that changed since the index was built.
        """
        folder = Path(path)
        config_file = folder / CONFIG
        if not config_file.is_file():
            what = "folder not found" if not folder.exists() else f"no {CONFIG}"
            raise IndexLoadError(f"{config_file}: {what}; expected a folder written by `sbmoe index` (Retriever.save)")
        config = json.loads(config_file.read_text())
        spec = config["model"]["spec"]
        model = load_model(str(folder / MODEL_DIR), device=device) if spec is None else load_any_model(spec, device)
        fingerprint = model_fingerprint(model)
        if fingerprint != config["model_fingerprint"]:
            raise IndexLoadError(
                f"{folder}: the model {spec!r} changed since this index was built (fingerprint {fingerprint[:12]}, "
                f"index built with {config['model_fingerprint'][:12]}); rebuild it with `sbmoe index`"
            )
        index = DenseIndex.load(folder / INDEX_DIR, expect_model_hash=fingerprint, use_gpu=use_gpu)
        return cls(model, index, DocStore(folder / STORE_FILE, read_only=True), spec)


def as_dataset(corpus: Corpus, data_dir: str | os.PathLike | None = None) -> RetrievalDataset:
    """A corpus spec, dataset or iterable of documents as a :class:`~sbmoe.data.RetrievalDataset`."""
    if isinstance(corpus, RetrievalDataset):
        return corpus
    if isinstance(corpus, str | os.PathLike):
        return load_corpus(corpus, data_dir)
    docs = [_as_doc(item) for item in corpus]
    return RetrievalDataset("docs", "corpus", {}, {}, lambda: iter(docs))


def _as_doc(item: Doc | Mapping[str, str]) -> Doc:
    if isinstance(item, Doc):
        return item
    doc_id = item.get("_id", item.get("id"))
    if doc_id in (None, ""):
        raise ValueError(f"document {dict(item)!r} has no '_id' or 'id'")
    return Doc(str(doc_id), item.get("title") or "", item.get("text") or "")


def absolute_spec(spec: str | None) -> str | None:
    """A model folder as an absolute path (so the saved reference works from any folder); names as given."""
    if spec is not None and Path(spec).expanduser().is_dir():
        return str(Path(spec).expanduser().resolve())
    return spec
