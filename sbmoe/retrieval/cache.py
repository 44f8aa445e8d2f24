"""Embedding cache on disk, keyed by model and corpus fingerprints; streaming, atomic, checksummed entries.

Under the corpus entries, each text's vector is kept by the text's hash (:mod:`sbmoe.retrieval.text_vectors`): a
corpus with one changed document encodes that document only, and a killed encoding resumes after its last chunk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from sbmoe.data.dataset import texts_fingerprint
from sbmoe.errors import DataError
from sbmoe.files import remove_stale, replace_dir, scratch_name, sha256_file
from sbmoe.paths import cache_dir as default_cache_dir
from sbmoe.retrieval.text_vectors import TextVectors, text_key

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent writers of one entry are then not serialised
    fcntl = None

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from sbmoe.data.dataset import Doc, RetrievalDataset

logger = logging.getLogger(__name__)

KINDS = ("corpus", "queries")
CHUNK = 512  # documents per encode call: bounds RAM (the progress bar moves per batch within it)
TEMP = ".tmp-"  # prefix of entries being written
TEXTS_DIR = "texts"  # each text's vector, one SQLite file per kind and model (sbmoe.retrieval.text_vectors)


def model_fingerprint(model: SentenceTransformer) -> str:
    """Hash of the model's modules (class, config, tokenizer, max length) and parameter values. A tokenizer edited
    in place (vocabulary, normalisation, special tokens) changes it."""
    digest = hashlib.blake2b(digest_size=16)
    for name, module in model.named_children():
        config = module.get_config_dict() if hasattr(module, "get_config_dict") else {}
        digest.update(f"{name}:{type(module).__qualname__}:{json.dumps(config, sort_keys=True, default=str)}".encode())
        digest.update(_tokenizer_state(module).encode("utf-8", "surrogatepass"))
    digest.update(f"max_seq_length={model.max_seq_length}".encode())
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()


def _tokenizer_state(module: Any) -> str:
    """A module's tokenizer as text (the fast tokenizer's JSON without the truncation and padding that each encode
    call sets, else its vocabulary), or "" without one."""
    tokenizer = getattr(module, "tokenizer", None)
    if tokenizer is None:
        return ""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
    else:
        state = tokenizer.get_vocab()
    body = json.dumps(state, sort_keys=True)
    special = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    return f"{type(tokenizer).__qualname__}:{special}:{body}"


def cached_embeddings(
    model: SentenceTransformer,
    items: RetrievalDataset | Sequence[str] | Sequence[Doc],
    kind: str,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    show_progress: bool = True,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Encode ``items`` once and reuse the result from disk afterwards.

    Args:
        model: Any SentenceTransformer (sbmoe passes the pooled backbone: see :mod:`sbmoe.retrieval.encoder`).
        items: A dataset (its corpus streams in chunks), or a list of texts or :class:`~sbmoe.data.Doc`.
        kind: ``corpus`` (``encode_document``) or ``queries`` (``encode_query``).
        cache_dir: Cache root (default :func:`sbmoe.paths.cache_dir`).
        batch_size: Encoder batch size.
        show_progress: Show a tqdm bar over the items.

    Returns:
        The embeddings (float32, memory-mapped read-only) and the metadata (fingerprints, count, seconds,
        ``cached`` = whether it came from disk).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    data_fp = items.fingerprint if hasattr(items, "fingerprint") else texts_fingerprint(_texts(items))
    model_fp = model_fingerprint(model)
    folder = root / f"{kind}-{model_fp[:20]}-{data_fp[:20]}"
    hit = read_entry(folder)
    if hit is not None:
        return hit[0], {**hit[1], "cached": True}
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root, TEMP)  # entries that killed writers left half written
    tmp = root / scratch_name(f"{TEMP}{folder.name}")
    tmp.mkdir()
    try:
        vectors = TextVectors(root / TEXTS_DIR / f"{kind}-{model_fp[:20]}.sqlite", model.get_embedding_dimension())
        try:
            meta = _encode_to(tmp, model, items, kind, batch_size, show_progress, vectors)
        finally:
            vectors.close()
        meta.update(model_fingerprint=model_fp, data_fingerprint=data_fp, kind=kind)
        meta["checksum"] = sha256_file(tmp / "embeddings.npy")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    hit = read_entry(folder)
    if hit is None:
        raise OSError(f"{folder}: the embedding cache entry just written does not read back")
    return hit[0], {**hit[1], "cached": False}


def _publish(tmp: Path, folder: Path) -> None:
    """Put the finished entry ``tmp`` in place as ``folder``, unless another writer's valid entry is there already.

    A valid entry is never replaced (a reader may have it open); a damaged one is swapped out in one step.
    """
    with _locked(folder.parent):
        if folder.is_dir() and read_entry(folder) is not None:
            logger.info("%s: another process wrote this entry meanwhile; keeping it", folder)
            return
        replace_dir(tmp, folder)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``folder`` itself (no lock file; released if the process dies)."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _texts(items: Sequence[str] | Sequence[Doc]) -> list[str]:
    return [item if isinstance(item, str) else item.full_text for item in items]


def read_entry(folder: Path) -> tuple[np.ndarray, dict[str, Any]] | None:
    """A complete cache entry, or None (absent, or unreadable: then it is re-encoded with a warning)."""
    if not folder.is_dir():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        embeddings = np.load(folder / "embeddings.npy", mmap_mode="r")
        if embeddings.shape != (meta["count"], meta["dim"]):
            raise ValueError(f"shape {embeddings.shape} != ({meta['count']}, {meta['dim']}) in meta.json")
        if sha256_file(folder / "embeddings.npy") != meta["checksum"]:
            raise ValueError("embeddings.npy does not match the checksum in meta.json")
    except (OSError, ValueError, KeyError) as err:
        logger.warning("%s: unreadable embedding cache entry (%s); encoding again", folder, err)
        return None
    return embeddings, meta


def _chunks(items: Any) -> Iterator[Sequence[Any]]:
    """``items`` in lists of :data:`CHUNK` (a dataset streams its corpus)."""
    if hasattr(items, "iter_corpus"):
        yield from items.iter_corpus(CHUNK)
    else:
        yield from (items[i : i + CHUNK] for i in range(0, len(items), CHUNK))


def _encode_to(
    folder: Path,
    model: SentenceTransformer,
    items: Any,
    kind: str,
    batch_size: int,
    show_progress: bool,
    vectors: TextVectors,
) -> dict[str, Any]:
    """Fill ``folder/embeddings.npy`` with the vectors of ``items``: those ``vectors`` holds for their texts, the
    rest encoded chunk by chunk and added to ``vectors`` as each chunk ends; return the metadata."""
    encode = model.encode_document if kind == "corpus" else model.encode_query
    count = items.corpus_size if hasattr(items, "iter_corpus") else len(items)
    known: set[bytes] = set()
    wanted: set[bytes] = set()
    for chunk in _chunks(items):
        keys = [text_key(text) for text in _texts(chunk)]
        wanted.update(keys)
        known.update(vectors.get(keys))
    dim = model.get_embedding_dimension()
    out = np.lib.format.open_memmap(folder / "embeddings.npy", mode="w+", dtype=np.float32, shape=(count, dim))
    start, row, encoded = time.perf_counter(), 0, 0
    unit = "doc" if kind == "corpus" else "query"
    bar = tqdm(total=len(wanted - known), desc=f"encode {kind}", unit=unit, disable=not show_progress)
    with bar, progress_per_batch(model, bar):
        for chunk in _chunks(items):
            texts = _texts(chunk)
            keys = [text_key(text) for text in texts]
            new = list(dict.fromkeys(key for key in keys if key not in known))
            if new:
                by_key = dict(zip(keys, texts, strict=True))
                batch = [by_key[key] for key in new]
                fresh = encode(batch, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
                vectors.put(new, fresh)
                known.update(new)
                encoded += len(new)
            found = vectors.get(keys)
            missing = [key for key in keys if key not in found]
            if missing:
                raise OSError(f"{vectors.path}: {len(missing)} vectors just written do not read back")
            out[row : row + len(chunk)] = np.stack([found[key] for key in keys])
            row += len(chunk)
            bar.update(encoded - bar.n)  # a no-op, unless the model's forward hooks did not run
    if row != count:
        raise DataError(f"encoded {row} items but expected {count}: the corpus changed while it was read; run again")
    out.flush()
    del out
    return {"count": count, "dim": dim, "encoded": encoded, "seconds": round(time.perf_counter() - start, 3)}


@contextmanager
def progress_per_batch(model: SentenceTransformer, bar: tqdm) -> Iterator[None]:
    """Advance ``bar`` by each encoder batch as the model returns it (a forward hook): per batch, not per call."""

    def count(module: Any, inputs: Any, output: dict[str, Any]) -> None:
        bar.update(len(output.get("sentence_embedding", ())))

    handle = model.register_forward_hook(count)
    try:
        yield
    finally:
        handle.remove()
