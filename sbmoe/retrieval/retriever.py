"""A :class:`Retriever` keeps a model, its faiss index and the documents' texts together: build, update, search, save.

A saved retriever is one folder: ``retriever.json`` (the model reference), ``docs.sqlite`` (the texts), ``index/``
(the faiss folder) and ``manifest.json``, which checksums all of them and carries a generation number; a load that
saw the folder replaced half way (a writer's atomic swap) starts again, so it never pairs one build's index with
another build's store.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sentence_transformers import SentenceTransformer

from sbmoe.data.dataset import Doc
from sbmoe.errors import DataError, IndexLoadError
from sbmoe.files import atomic_dir
from sbmoe.model import find_head, load_any_model, load_model
from sbmoe.retrieval.backends import build_sharded
from sbmoe.retrieval.build import build_index
from sbmoe.retrieval.cache import model_fingerprint
from sbmoe.retrieval.documents import Corpus, as_dataset, unique_docs
from sbmoe.retrieval.encoder import Encoder, unit_rows
from sbmoe.retrieval.faiss_types import check_index_params
from sbmoe.retrieval.index import DenseIndex
from sbmoe.retrieval.index_folder import METRIC
from sbmoe.retrieval.index_settings import IndexSettings
from sbmoe.retrieval.manifest import MANIFEST, REBUILD, check_files, manifest_field, read_manifest, write_manifest
from sbmoe.retrieval.outcomes import Changes, Hit
from sbmoe.retrieval.store import DocStore

logger = logging.getLogger(__name__)

FORMAT = 2
CONFIG = "retriever.json"
INDEX_DIR, STORE_FILE, MODEL_DIR = "index", "docs.sqlite", "model"
LOAD_ATTEMPTS = 5  # loads that saw the folder replaced meanwhile, before giving up
WRITTEN_BY = "`sbmoe index` (Retriever.save)"

__all__ = ["CONFIG", "Changes", "Corpus", "Hit", "Retriever", "absolute_spec", "as_dataset"]


class Retriever:
    """Model + index + document store behind one object.

    Build one with :meth:`build`, search it with :meth:`search`, change it with :meth:`sync`, :meth:`upsert` and
    :meth:`delete`, keep it with :meth:`save` and reopen it with :meth:`load`. Changes live in memory until
    :meth:`save` writes them (a loaded retriever's folder is untouched until then). Corpus vectors go through the
    shared embedding cache, which keeps each document's vector by its text: an update encodes only new and
    changed texts, and indexing a corpus already encoded by ``evaluate`` or ``finetune`` costs no encoding.

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
        self.encoder = Encoder(model, show_progress=False)  # built once: searches reuse its pooled backbone
        self.cache_dir: str | os.PathLike | None = None
        self.index_choice: IndexSettings | None = None  # how :meth:`build` chose the type from a RAM budget

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return f"Retriever(model={self.model_spec or 'embedded'!r}, index={self.index!r}, docs={len(self.store)})"

    @classmethod
    def build(
        cls,
        model: SentenceTransformer | str,
        corpus: Corpus,
        index: str | None = None,
        index_params: dict[str, Any] | None = None,
        data_dir: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 64,
        use_gpu: bool | str = "auto",
        show_progress: bool = True,
        *,
        device: str | None = None,
        backend: str = "local",
        ram_budget: int | str | None = None,
        shards: str | os.PathLike | None = None,
        shard_size: int = 100_000,
        ray: dict[str, Any] | None = None,
    ) -> Retriever:
        """Encode ``corpus``, index it and store its texts; a repeated id keeps its first text.

        Args:
            model: A SentenceTransformer, or a name/folder for :func:`sbmoe.model.load_any_model`.
            corpus: Anything :func:`sbmoe.data.load_corpus` reads (a path or name), a dataset, or documents
                (:class:`~sbmoe.data.Doc` or dicts with ``_id``/``id``, ``title``, ``text``).
            index: Index type (see :class:`~sbmoe.retrieval.index.DenseIndex`); None: ``flat``, or with
                ``ram_budget`` the most exact type that fits it.
            index_params: Index parameters (see :class:`~sbmoe.retrieval.index.DenseIndex`).
            data_dir: Where dataset names are looked up.
            cache_dir: Embedding cache root (default :func:`sbmoe.paths.cache_dir`).
            batch_size: Encoder batch size.
            use_gpu: Index on GPU (``"auto"``, True, False).
            show_progress: Progress bars.
            device: Torch device for a model given by name (default: cuda when available).
            backend: ``local`` (vectors through the embedding cache, in memory), ``stream`` (chunks -> resumable
                embedding shards in ``shards`` -> an index filled shard by shard; ivf and ivfpq keep their lists on
                disk) or ``ray`` (that, encoded in a Ray actor pool; ``model`` and ``corpus`` given as names).
            ram_budget: Index memory in bytes (or ``"8GB"``) that picks the index type (stream and ray).
            shards: The shard folder of the stream and ray backends, kept to resume a killed run or re-index.
            shard_size: Vectors per shard.
            ray: ``workers``, ``gpus_per_worker`` and ``address`` for the ray backend (see
                :func:`~sbmoe.retrieval.ray_encode.ray_encode_to_shards`).

        Raises:
            DataError: an id no index can hold (whitespace, line break, control character), or no documents.
            ValueError: an unknown index type, parameter or backend, or options the backend does not take.
        """
        check_index_params(index or "flat", index_params or {})
        if backend != "local":
            spec, model = _model(model, device)
            dense, store, choice = build_sharded(
                model,
                spec,
                corpus,
                index,
                index_params or {},
                backend=backend,
                ram_budget=ram_budget,
                shards=shards,
                shard_size=shard_size,
                ray=ray or {},
                batch_size=batch_size,
                data_dir=data_dir,
                use_gpu=use_gpu,
                show_progress=show_progress,
            )
            retriever = cls(model, dense, store, spec)
            retriever.index_choice = choice
            return retriever
        if ram_budget is not None or shards is not None or ray:
            raise ValueError("ram_budget, shards and ray need backend='stream' or 'ray'")
        dataset = as_dataset(corpus, data_dir)
        for warning in dataset.validate():
            logger.warning(warning)
        docs = unique_docs(dataset)
        spec, model = _model(model, device)
        dense = DenseIndex(model.get_embedding_dimension(), index or "flat", use_gpu, **(index_params or {}))
        retriever = cls(model, dense, DocStore.temporary(), spec)  # empty: _replace builds the index
        retriever.cache_dir = cache_dir
        retriever._replace(docs, batch_size, show_progress)
        return retriever

    def sync(
        self,
        corpus: Corpus,
        data_dir: str | os.PathLike | None = None,
        batch_size: int = 64,
        show_progress: bool = True,
    ) -> Changes:
        """Make the index mirror ``corpus``: add its new ids, re-encode documents whose text changed, drop the ids
        it no longer has. Only new and changed texts are encoded; the faiss index is rebuilt from the vectors
        (HNSW cannot remove, IVF lists would drift from their quantizer). Call :meth:`save` to keep the result."""
        wanted = unique_docs(corpus, data_dir)
        changes = self._changes(wanted)
        if changes:
            self._replace(wanted, batch_size, show_progress)
        return changes

    def upsert(self, docs: Corpus, batch_size: int = 64, show_progress: bool = True) -> Changes:
        """Add documents with new ids and replace those whose id is known (new title/text); others stay.
        Call :meth:`save` to keep the result."""
        current = {doc.id: doc for doc, _ in self.store.iter_docs()}
        incoming = unique_docs(docs)
        merged = {**current, **{doc.id: doc for doc in incoming}}
        changes = self._changes(list(merged.values()))
        if changes:
            self._replace(list(merged.values()), batch_size, show_progress)
        return changes

    def add(self, docs: Corpus, batch_size: int = 64, show_progress: bool = True) -> int:
        """Add the documents whose ids are new (known ids keep their text: :meth:`upsert` replaces them); returns
        how many were added. Call :meth:`save` to keep the result."""
        known = {doc.id for doc, _ in self.store.iter_docs()}
        return self.upsert([doc for doc in unique_docs(docs) if doc.id not in known], batch_size, show_progress).added

    def delete(self, ids: Sequence[str], show_progress: bool = True) -> int:
        """Remove the documents with these ids (unknown ids are ignored); returns how many went.
        Call :meth:`save` to keep the result."""
        gone = set(ids)
        kept = [doc for doc, _ in self.store.iter_docs() if doc.id not in gone]
        removed = len(self.store) - len(kept)
        if removed:
            self._replace(kept, show_progress=show_progress)
        return removed

    def _changes(self, wanted: list[Doc]) -> Changes:
        current = {doc.id: doc for doc, _ in self.store.iter_docs()}
        added = sum(doc.id not in current for doc in wanted)
        updated = sum(doc.id in current and current[doc.id] != doc for doc in wanted)
        return Changes(added, updated, len(current) - (len(wanted) - added))

    def _replace(self, docs: list[Doc], batch_size: int = 64, show_progress: bool = True) -> None:
        """Index and store exactly ``docs`` (vectors through the per-document cache), same type and settings."""
        if not docs:
            raise DataError("no documents to index: the corpus is empty (or every id was deleted)")
        encoded = Encoder(self.model, self.cache_dir, batch_size, show_progress).encode(docs, "corpus")
        embeddings = unit_rows(encoded.vectors) if self.model.similarity_fn_name == "cosine" else encoded.vectors
        old = self.index
        model = {"model_name": old.model_name, "model_hash": old.model_hash, "show_progress": show_progress}
        ids = [doc.id for doc in docs]
        dense = build_index(embeddings, ids, old.index_type, old.requested, use_gpu=old.use_gpu, **model)
        store = DocStore.temporary()
        store.add(docs, encoded.experts)
        self.index, self.store = dense, store

    def search(self, queries: str | Sequence[str], k: int = 10, batch_size: int = 64) -> list[list[Hit]]:
        """The top ``k`` documents for each query (a single string counts as one query), best first.

        Raises:
            DataError: a blank query (it would rank documents without a word to go on).
        """
        return self.search_with_experts(queries, k, batch_size)[0]

    def search_with_experts(
        self, queries: str | Sequence[str], k: int = 10, batch_size: int = 64
    ) -> tuple[list[list[Hit]], list[int] | None]:
        """:meth:`search`, plus each query's top-1 expert (None for a model without an SB-MoE head)."""
        texts = [queries] if isinstance(queries, str) else list(queries)
        blank = [i for i, text in enumerate(texts) if not text.strip()]
        if blank:
            raise DataError(f"query {blank[0]} is blank ({texts[blank[0]]!r}); give the words to search for")
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
        encoder = self.encoder if batch_size == self.encoder.batch_size else Encoder(self.model, batch_size=batch_size)
        encoded = encoder.encode_texts(texts, "query")
        experts = None if encoded.experts is None else encoded.experts.tolist()
        vectors = encoded.vectors
        return (unit_rows(vectors) if self.model.similarity_fn_name == "cosine" else vectors), experts

    def save(self, path: str | os.PathLike) -> Path:
        """Write model reference (or the model), index and store to the folder ``path`` atomically, under a
        checksum manifest with a new generation number."""
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
            (tmp / CONFIG).write_text(json.dumps(config, indent=1), encoding="utf-8")
            fields = {"generation": uuid.uuid4().hex, "dim": self.index.dim, "metric": METRIC}
            write_manifest(tmp, {**fields, "type": self.index.index_type, "count": len(self.index)})
        return final

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: str | None = None, use_gpu: bool | str = "auto", verify: bool = True
    ) -> Retriever:
        """Reopen a folder written by :meth:`save`: every file checked against its manifest, one generation.

        ``verify=False`` checks file sizes but skips the SHA-256 of each file (seconds for a store of millions).

        Raises:
            IndexLoadError: a missing or damaged folder, or a model that changed since the index was built.
        """
        folder = Path(path)
        if (folder / CONFIG).is_file() and not (folder / MANIFEST).is_file():
            raise IndexLoadError(f"{folder}: written by an older sbmoe (no {MANIFEST}); {REBUILD}")
        models: dict[str | None, SentenceTransformer] = {}
        for _ in range(LOAD_ATTEMPTS):
            manifest = read_manifest(folder, {"generation", "dim", "metric", "type", "count"}, WRITTEN_BY)
            try:
                retriever = cls._open(folder, manifest, models, device, use_gpu, verify)
            except (IndexLoadError, OSError, sqlite3.Error):
                if manifest_field(folder, "generation") == manifest["generation"]:
                    raise
                continue  # the folder was replaced while this load read it: read the new one
            if manifest_field(folder, "generation") == manifest["generation"]:
                return retriever
        raise IndexLoadError(f"{folder}: rewritten during each of {LOAD_ATTEMPTS} loads; load it once the writer ends")

    @classmethod
    def _open(
        cls,
        folder: Path,
        manifest: dict[str, Any],
        models: dict[str | None, SentenceTransformer],
        device: str | None,
        use_gpu: bool | str,
        verify: bool,
    ) -> Retriever:
        """The retriever of one generation of ``folder`` (``manifest`` read first), checked against it."""
        check_files(folder, manifest, verify)
        config = _read_config(folder / CONFIG)
        spec = config["model"]["spec"]
        if spec not in models:
            models[spec] = (
                load_model(str(folder / MODEL_DIR), device) if spec is None else load_any_model(spec, device)
            )
        model = models[spec]
        fingerprint = model_fingerprint(model)
        if fingerprint != config["model_fingerprint"]:
            raise IndexLoadError(
                f"{folder}: the model {spec!r} changed since this index was built (fingerprint {fingerprint[:12]}, "
                f"index built with {config['model_fingerprint'][:12]}); rebuild it with `sbmoe index --rebuild`"
            )
        index = DenseIndex.load(folder / INDEX_DIR, expect_model_hash=fingerprint, use_gpu=use_gpu, verify=False)
        store = DocStore(folder / STORE_FILE, read_only=True)
        found = (index.dim, index.index_type, len(index), len(store))
        expected = (manifest["dim"], manifest["type"], manifest["count"], manifest["count"])
        if found != expected:
            raise IndexLoadError(
                f"{folder / MANIFEST}: says {expected[2]} {expected[0]}-d {expected[1]} vectors; the folder holds "
                f"{found[2]} {found[0]}-d {found[1]} vectors and {found[3]} documents: {REBUILD}"
            )
        return cls(model, index, store, spec)


def _read_config(file: Path) -> dict[str, Any]:
    """``retriever.json``, checked for the keys :meth:`Retriever.load` reads."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
        spec, fingerprint = config["model"]["spec"], config["model_fingerprint"]
    except (ValueError, KeyError, TypeError) as err:
        raise IndexLoadError(f"{file}: unreadable or incomplete ({err!r}): {REBUILD}") from err
    if not (spec is None or isinstance(spec, str)) or not isinstance(fingerprint, str):
        raise IndexLoadError(f"{file}: model spec or fingerprint of the wrong type: {REBUILD}")
    return config


def _model(model: SentenceTransformer | str, device: str | None) -> tuple[str | None, SentenceTransformer]:
    """How the model was named (None for a model object), and the model (loaded on ``device`` from a name)."""
    if isinstance(model, str):
        return absolute_spec(model), load_any_model(model, device)
    return None, model


def absolute_spec(spec: str | None) -> str | None:
    """A model folder as an absolute path (so the saved reference works from any folder); names as given."""
    if spec is not None and Path(spec).expanduser().is_dir():
        return str(Path(spec).expanduser().resolve())
    return spec
