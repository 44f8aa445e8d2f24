"""Distributed encoding on Ray Data: read the corpus (jsonl or parquet, local or any fsspec path), encode it in an
actor pool (one model per actor, one actor per GPU or CPU slot) and write the same shards as the streaming backend.

Ray schedules, retries and applies back-pressure; this module only says what to run. Ray is imported lazily:
``sbmoe`` works without it, and the ray backend names the extra to install.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from sbmoe.data.dataset import DataError, Doc, beir_text
from sbmoe.errors import MissingExtraError
from sbmoe.model import load_any_model
from sbmoe.retrieval.shards import ShardSet
from sbmoe.retrieval.stream import CHUNK, ChunkEncoder, open_shards

RAY_EXTRA = "pip install 'sbmoe[ray]'"
NO_EXPERT = -1
Batch = tuple[list[Doc], np.ndarray, np.ndarray | None]  # documents, their embeddings, their experts or None


def import_ray() -> Any:
    """The ``ray`` module with Ray Data, or an ImportError that names the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Core alone lacks it)
    except ImportError as err:
        raise MissingExtraError(f"the ray backend needs Ray Data, which is not installed: {RAY_EXTRA}") from err
    return ray


class RayEncoder:
    """A Ray Data actor: loads the model once, then turns batches of corpus rows into embeddings."""

    def __init__(self, model_spec: str, batch_size: int, threads: int = 1):
        torch.set_num_threads(threads)
        self.encoder = ChunkEncoder(load_any_model(model_spec), batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["_id"] if "_id" in batch else batch["id"]
        titles = batch["title"] if "title" in batch else np.full(len(ids), "", dtype=object)
        texts = batch["text"]
        vectors, experts = self.encoder([beir_text(title, text) for title, text in zip(titles, texts, strict=True)])
        return {
            "id": np.asarray([str(doc_id) for doc_id in ids], dtype=object),
            "title": np.asarray([title or "" for title in titles], dtype=object),
            "text": np.asarray([text or "" for text in texts], dtype=object),
            "embedding": vectors,
            "expert": experts if experts is not None else np.full(len(ids), NO_EXPERT, dtype=np.int64),
        }


def corpus_file(spec: str) -> str:
    """The corpus file of ``spec``: a ``.jsonl`` or ``.parquet`` path or URL, or a BEIR folder's corpus.jsonl."""
    if spec.endswith((".jsonl", ".parquet")):
        return spec
    if Path(spec).expanduser().is_dir() and (Path(spec).expanduser() / "corpus.jsonl").is_file():
        return str(Path(spec).expanduser() / "corpus.jsonl")
    raise DataError(f"{spec}: the ray backend reads a .jsonl or .parquet corpus (local or an fsspec URL)")


def read_corpus(ray: Any, spec: str, blocks: int | None = None) -> Any:
    """A Ray Dataset of the corpus rows in ``blocks`` blocks (None: Ray decides); a URL is opened through fsspec."""
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    path = corpus_file(spec)
    fs, root = fsspec.core.url_to_fs(path)
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    filesystem = None if local else PyFileSystem(FSSpecHandler(fs))
    if path.endswith(".parquet"):
        return ray.data.read_parquet(root, filesystem=filesystem, override_num_blocks=blocks)
    return ray.data.read_json(root, lines=True, filesystem=filesystem, override_num_blocks=blocks)


def ray_batches(
    model_spec: str,
    corpus: str,
    batch_size: int = 64,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    chunk: int = CHUNK,
    blocks: int | None = None,
) -> Iterator[Batch]:
    """Encoded batches of the corpus in corpus order: ``(docs, embeddings, experts or None)``.

    Args:
        model_spec: A model name or folder every actor can load (:func:`sbmoe.model.load_any_model`).
        corpus: A ``.jsonl`` / ``.parquet`` path or fsspec URL, or a BEIR folder.
        batch_size: Encoder batch size inside an actor.
        workers: Actors in the pool (one per GPU or CPU slot).
        gpus_per_worker: GPUs each actor asks for (1 on a GPU cluster; 0 runs on CPU, one thread per actor).
        chunk: Rows per Ray batch handed to an actor.
        blocks: Blocks to read the corpus in (None: Ray decides); more blocks than actors keeps them all busy.
    """
    ray = import_ray()
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    dataset = read_corpus(ray, corpus, blocks).map_batches(
        RayEncoder,
        fn_constructor_args=(model_spec, batch_size),
        batch_size=chunk,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=0 if gpus_per_worker else 1,
        num_gpus=gpus_per_worker,
    )
    for batch in dataset.iter_batches(batch_size=chunk, batch_format="numpy"):
        docs = [Doc(*fields) for fields in zip(batch["id"], batch["title"], batch["text"], strict=True)]
        experts = batch["expert"] if (batch["expert"] != NO_EXPERT).all() else None
        yield docs, np.asarray(batch["embedding"], dtype=np.float32), experts


def unwritten(shards: ShardSet, batches: Iterable[Batch]) -> Iterator[Batch]:
    """The rows of ``batches`` after those already in ``shards``, whose ids must be the shards' ids.

    Raises:
        DataError: the corpus differs from the one the shards were written from.
    """
    remaining = len(shards)
    for docs, vectors, experts in batches:
        drop = min(remaining, len(docs))
        if drop:
            shards.check_written([doc.id for doc in docs[:drop]], len(shards) - remaining)
        remaining -= drop
        if drop < len(docs):
            yield docs[drop:], vectors[drop:], None if experts is None else experts[drop:]


def ray_encode_to_shards(
    model: SentenceTransformer,
    model_spec: str,
    corpus: str,
    folder: str | os.PathLike,
    shard_size: int = 100_000,
    batch_size: int = 64,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    address: str | None = None,
) -> ShardSet:
    """Encode ``corpus`` on Ray into the shard folder ``folder`` (the streaming backend's format).

    ``model`` (loaded from ``model_spec`` here) keys the shards; every actor loads its own from ``model_spec``.

    Ray is started locally (or joined at ``address``, e.g. ``ray://head:10001`` or ``auto``) unless it already
    runs in this process. A folder with shards from a killed run keeps them: their rows are checked and dropped
    from the stream instead of written again (Ray re-encodes them; the streaming backend skips them unencoded).
    """
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(**({"address": address} if address else {"include_dashboard": False}))
    try:
        shards = open_shards(model, folder, shard_size)
        if shards.complete:
            return shards
        batches = ray_batches(model_spec, corpus, batch_size, workers, gpus_per_worker)
        for docs, vectors, experts in unwritten(shards, batches):
            shards.append(vectors, docs, experts)
        return shards.finish()
    finally:
        if started:
            ray.shutdown()
