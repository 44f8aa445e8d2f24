"""Sharded faiss: one quantizer trained once on a sample, one index per embedding shard built in parallel, then
merged on disk (faiss on-disk inverted lists) or served together (``IndexShards``, one shard per GPU if any).

Every shard index holds the corpus row numbers as ids, so merged and served results are global rows.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from sbmoe.errors import DataError, SetupError
from sbmoe.retrieval.index import INDEX_FILE, LISTS_FILE, TRAIN_SAMPLE, DenseIndex, gpu_count
from sbmoe.retrieval.ivf import IVF_TYPES
from sbmoe.retrieval.shards import ShardSet
from sbmoe.retrieval.stream import index_from_shards

MERGED_INDEX, MERGED_LISTS = INDEX_FILE, LISTS_FILE
SHARD_TYPES = ("flat", "ivf", "ivfpq")


def trained(sample: np.ndarray, index_type: str, total: int, params: dict[str, Any] | None = None) -> DenseIndex:
    """An empty :class:`~sbmoe.retrieval.index.DenseIndex` trained on ``sample`` for ``total`` vectors (IVF defaults
    filled in for ``total``)."""
    if index_type not in SHARD_TYPES:
        raise ValueError(f"sharded index type {index_type!r}: expected one of {', '.join(SHARD_TYPES)}")
    dense = DenseIndex(sample.shape[1], index_type, use_gpu=False, **(params or {}))
    dense.train(sample, total=total)
    return dense


def train_template(sample: np.ndarray, index_type: str, total: int, params: dict[str, Any] | None = None) -> bytes:
    """A trained, empty faiss index (serialized) for ``total`` vectors: the quantizer every shard shares.

    ``params`` are :class:`~sbmoe.retrieval.index.DenseIndex` parameters (IVF defaults filled in for ``total``).
    """
    return _template(trained(sample, index_type, total, params))


def _template(dense: DenseIndex) -> bytes:
    index = dense.faiss_index  # nprobe is set on it
    if not isinstance(index, faiss.IndexIVF):
        index = faiss.IndexIDMap(index)  # flat: ids through a map, as IVF keeps them itself
    return faiss.serialize_index(index).tobytes()


def build_shard(template: bytes, vectors: np.ndarray, start: int, path: str) -> str:
    """Fill a copy of ``template`` with ``vectors`` (ids ``start, start+1, ...``) and write it to ``path``."""
    index = faiss.deserialize_index(np.frombuffer(template, dtype=np.uint8))
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index.add_with_ids(vectors, np.arange(start, start + len(vectors), dtype=np.int64))
    faiss.write_index(index, path)
    return path


def _build_from_file(template: bytes, vectors_file: str, start: int, path: str) -> str:
    return build_shard(template, np.load(vectors_file, mmap_mode="r"), start, path)


def build_shards(
    shards: ShardSet,
    template: bytes,
    out_dir: str | os.PathLike,
    parallel: str = "threads",
    workers: int | None = None,
) -> list[str]:
    """One index file per shard in ``out_dir``, built in parallel; returns their paths in shard order.

    Args:
        parallel: ``threads`` (this machine), ``ray`` (one Ray task per shard; on a cluster the shard folder and
            ``out_dir`` must be on storage every node sees) or ``serial``.
        workers: Threads for ``threads`` (default: faiss's thread count).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [
        (template, str(shards.folder / f"{shard.name}.npy"), shard.start, str(out / f"shard-{shard.name}.faiss"))
        for shard in shards.shards
    ]
    if parallel == "ray":
        from sbmoe.retrieval.ray_encode import import_ray

        ray = import_ray()
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tasks import faiss and numpy, not sbmoe
        task = ray.remote(_build_from_file)
        template_ref = ray.put(template)
        return ray.get([task.remote(template_ref, *job[1:]) for job in jobs])
    if parallel == "serial":
        return [_build_from_file(*job) for job in jobs]
    if parallel != "threads":
        raise ValueError(f"parallel={parallel!r}: expected threads, ray or serial")
    with ThreadPoolExecutor(workers or faiss.omp_get_max_threads()) as pool:
        return list(pool.map(lambda job: _build_from_file(*job), jobs))


def merge_on_disk(template: bytes, shard_files: Sequence[str], out_dir: str | os.PathLike) -> Path:
    """Merge IVF shard indexes into one index whose inverted lists stay on disk (``index.faiss`` + ``lists.ivfdata``
    in ``out_dir``); open it with :func:`read_merged`. Memory: the quantizer, not the lists."""
    index = faiss.deserialize_index(np.frombuffer(template, dtype=np.uint8))
    if not isinstance(index, faiss.IndexIVF):
        raise ValueError("only IVF shards (ivf, ivfpq) merge on disk")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merge_ondisk(index, list(shard_files), str(out / MERGED_LISTS))
    faiss.write_index(index, str(out / MERGED_INDEX))
    return out


def read_merged(folder: str | os.PathLike, nprobe: int | None = None) -> Any:
    """The merged on-disk index of ``folder``; its lists are read from ``lists.ivfdata`` beside it (memory-mapped)."""
    index = faiss.read_index(str(Path(folder) / MERGED_INDEX), faiss.IO_FLAG_ONDISK_SAME_DIR)
    if nprobe is not None:
        index.nprobe = nprobe
    return index


def serve_shards(shard_files: Iterable[str], use_gpu: bool | str = "auto", nprobe: int | None = None) -> Any:
    """The shard indexes searched together as one (``faiss.IndexShards``, threaded); one shard per GPU when faiss
    sees GPUs (``use_gpu`` ``"auto"`` or True), else all on CPU. Results are global row ids."""
    indexes = [faiss.read_index(path) for path in shard_files]
    if not indexes:
        raise ValueError("no shard indexes to serve")
    gpus = gpu_count() if use_gpu else 0
    if use_gpu is True and not gpus:
        raise SetupError("use_gpu=True but faiss has no GPU support here (install faiss-gpu, check the GPU)")
    served = faiss.IndexShards(indexes[0].d, True, False)  # threaded, ids as stored
    resources = [faiss.StandardGpuResources() for _ in range(gpus)]
    for number, index in enumerate(indexes):
        if nprobe is not None and isinstance(index, faiss.IndexIVF):
            index.nprobe = nprobe
        if gpus:
            index = faiss.index_cpu_to_gpu(resources[number % gpus], number % gpus, index)
        served.add_shard(index)
    served.referenced_objects = [indexes, resources]  # the shards must outlive the IndexShards that points at them
    return served


def fill_on_disk(dense: DenseIndex, shards: ShardSet, work_dir: str | os.PathLike, parallel: str = "threads") -> None:
    """Fill ``dense``, an IVF index trained on a sample of ``shards`` (on CPU), with every shard, its lists on disk:
    one index per shard (in ``work_dir/shards``, built in parallel) from ``dense``'s quantizer, merged on disk into
    ``work_dir``.

    Memory holds the quantizer (and one shard index per worker while building), not the lists. Saving ``dense``
    links (or copies) the lists file into the index folder, so ``work_dir`` may go once it is saved;
    ``DenseIndex.load`` and ``Retriever.load`` open it with the lists memory-mapped.

    Raises:
        ValueError: ``dense`` is not IVF, or so small a corpus that IVF fell back to exact search (no lists).
    """
    if dense.structure not in IVF_TYPES:
        raise ValueError(f"a {dense.structure} index has no inverted lists to keep on disk")
    template = _template(dense)
    files = build_shards(shards, template, Path(work_dir) / "shards", parallel)
    merged = read_merged(merge_on_disk(template, files, work_dir))
    dense.attach(merged, [doc_id for shard in shards.shards for doc_id in shards.ids(shard)])


def index_on_disk(
    shards: ShardSet, index_type: str, work_dir: str | os.PathLike, params: dict[str, Any] | None = None
) -> DenseIndex:
    """The ivf or ivfpq index of complete ``shards`` with its lists on disk (:func:`fill_on_disk` in ``work_dir``);
    on so few vectors that IVF falls back to exact search, filled in memory as
    :func:`~sbmoe.retrieval.stream.index_from_shards` does."""
    if not shards.complete or not len(shards):
        raise DataError(f"{shards.folder}: the shard set is incomplete or empty; encode the corpus first")
    dense = trained(shards.sample(TRAIN_SAMPLE), index_type, len(shards), params)
    if dense.structure not in IVF_TYPES:
        return index_from_shards(shards, index_type, params, show_progress=False)
    fill_on_disk(dense, shards, work_dir)
    return dense
