"""Building an index: the one way every caller makes a :class:`~sbmoe.retrieval.index.DenseIndex` from vectors.

:func:`build_index` trains on a sample of at most :data:`TRAIN_SAMPLE` vectors, then adds them batch by batch from
an array (a memory map will do) or a folder of embedding shards. With ``lists_dir``, IVF keeps its inverted lists on
disk: each batch fills an in-memory part on the trained quantizer, written to ``lists_dir``, and the parts are merged
into one lists file there (faiss on-disk inverted lists, memory-mapped), so memory holds the quantizer and one
batch's lists, never the corpus's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk
from tqdm.auto import tqdm

from sbmoe.errors import DataError
from sbmoe.retrieval.index import DenseIndex
from sbmoe.retrieval.index_folder import LISTS_FILE
from sbmoe.retrieval.ivf import IVF_TYPES
from sbmoe.retrieval.shards import ShardSet

TRAIN_SAMPLE = 200_000
BATCH = 65_536  # vectors per add
Vectors = np.ndarray | ShardSet


def build_index(
    vectors: Vectors,
    ids: Sequence[str] | None = None,
    index_type: str = "flat",
    params: dict[str, Any] | None = None,
    *,
    use_gpu: bool | str = "auto",
    model_name: str = "",
    model_hash: str = "",
    lists_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
) -> DenseIndex:
    """The ``index_type`` index of ``vectors``, row i named ``ids[i]``.

    Args:
        vectors: ``n x dim`` float rows (may be a memmap), or a complete :class:`~sbmoe.retrieval.shards.ShardSet`
            (its ids name the rows; pass no ``ids``).
        ids: Document ids for the rows; default: the row numbers as strings.
        index_type: See :class:`~sbmoe.retrieval.index.DenseIndex`.
        params: Index parameters (see :class:`~sbmoe.retrieval.index.DenseIndex`).
        use_gpu: As there; an index with its lists on disk stays on CPU.
        model_name: Name of the model that made the vectors (kept in the manifest).
        model_hash: Its fingerprint.
        lists_dir: A folder for ``ivf`` / ``ivfpq`` lists kept on disk (``lists.ivfdata``; saving links or copies it
            into the index folder); None, or an IVF type that fell back to exact search: lists in memory.
        show_progress: A progress bar over the vectors added.

    Raises:
        DataError: an incomplete or empty shard set; settings the vectors cannot meet.
        ValueError: no vectors, or not as many ids as rows.
    """
    sample, total = _sample(vectors, ids)
    on_disk = lists_dir is not None and index_type in IVF_TYPES
    gpu = False if on_disk else use_gpu
    dense = DenseIndex(sample.shape[1], index_type, gpu, model_name, model_hash, **(params or {}))
    dense.train(sample, total=total)
    on_disk = on_disk and dense.structure in IVF_TYPES
    trained, parts, names = dense.faiss_index if on_disk else None, [], []
    if on_disk:
        Path(lists_dir).mkdir(parents=True, exist_ok=True)
    with tqdm(total=total, desc=f"index {index_type}", unit="vec", disable=not show_progress) as bar:
        for rows, row_ids in _batches(vectors, ids):
            if on_disk:  # a part on the trained quantizer, written beside the lists it is merged into
                part = faiss.clone_index(trained)
                part.add(rows)
                parts.append(str(Path(lists_dir) / f"part-{len(parts):05d}.faiss"))
                faiss.write_index(part, parts[-1])
                names.extend(row_ids)
            else:
                dense.add(rows, row_ids)
            bar.update(len(rows))
    if on_disk:
        merge_ondisk(trained, parts, str(Path(lists_dir) / LISTS_FILE), shift_ids=True)  # ids: corpus rows
        dense.attach(trained, names)
        for part in parts:
            os.remove(part)
    return dense


def _sample(vectors: Vectors, ids: Sequence[str] | None) -> tuple[np.ndarray, int]:
    """The training sample (:data:`TRAIN_SAMPLE` rows drawn without replacement, in row order) and the row count."""
    if isinstance(vectors, ShardSet):
        if ids is not None:
            raise ValueError("a shard set names its rows itself: pass no ids")
        if not vectors.complete or not len(vectors):
            raise DataError(f"{vectors.folder}: the shard set is incomplete or empty; encode the corpus first")
        return vectors.sample(TRAIN_SAMPLE), len(vectors)
    n = len(vectors)
    if n == 0:
        raise ValueError("no embeddings to index")
    if ids is not None and len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} embeddings")
    rows = np.sort(np.random.default_rng(0).choice(n, size=min(n, TRAIN_SAMPLE), replace=False))
    return np.asarray(vectors[rows]), n


def _batches(vectors: Vectors, ids: Sequence[str] | None) -> Iterator[tuple[np.ndarray, list[str]]]:
    """``(rows, their ids)`` of at most :data:`BATCH` rows, in order (a shard set: shard by shard)."""
    if isinstance(vectors, ShardSet):
        parts = ((shard_vectors, vectors.ids(shard)) for shard, shard_vectors in vectors.iter_vectors())
    else:
        parts = iter([(vectors, list(ids) if ids is not None else [str(i) for i in range(len(vectors))])])
    for part, part_ids in parts:
        for start in range(0, len(part), BATCH):
            rows = np.ascontiguousarray(part[start : start + BATCH], dtype=np.float32)
            yield rows, part_ids[start : start + BATCH]
