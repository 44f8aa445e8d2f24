"""A thin class over faiss: flat, HNSW, IVF, IVF-PQ, SQ8, PQ/OPQ and binary indexes; CPU or GPU; atomic save/load."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from sbmoe.data.ids import check_id
from sbmoe.errors import DataError, SetupError
from sbmoe.files import atomic_dir
from sbmoe.retrieval.faiss_types import (
    FAISS_CLASSES,
    GPU_TYPES,
    INDEX_TYPES,
    PARAM_DEFAULTS,
    SETTINGS,
    check_index_params,
    new_faiss,
)
from sbmoe.retrieval.gpu import gpu_count, to_gpu
from sbmoe.retrieval.ivf import IVF_TYPES, fallback_message, filled_params
from sbmoe.retrieval.manifest import MANIFEST, REBUILD, IndexLoadError, check_files, read_manifest, write_manifest
from sbmoe.retrieval.rescore import PQ_TYPES, RESCORED_TYPES, candidates, code_bytes, pq_params, rescore

logger = logging.getLogger(__name__)

GPU_MAX_K = 2048  # faiss GPU top-k limit; larger k searches the CPU copy
INDEX_FILE = "index.faiss"
IDS_FILE = "doc_ids.json"
LISTS_FILE = "lists.ivfdata"  # IVF inverted lists kept on disk (a disk-merged sharded index), beside INDEX_FILE
VECTORS_FILE = "vectors.npy"
METRIC = "inner_product"
TRAIN_SAMPLE = 200_000


class DenseIndex:
    """Inner-product search over embeddings (cosine when they are L2-normalised).

    Args:
        dim: Embedding dimension.
        index_type: ``flat`` (exact), ``hnsw``, ``ivf`` (flat lists), ``ivfpq``, ``sq8``, or, keeping compressed
            codes in RAM and float vectors for exact re-scoring of ``rescore * k`` candidates (memory-mapped from
            disk once saved and loaded): ``binary`` (sign bits, Hamming search), ``pq`` or ``opq`` (OPQ-rotated PQ).
        use_gpu: ``"auto"`` (a GPU build of faiss and a visible GPU), True (required) or False. Several GPUs
            shard the index. HNSW and binary always run on CPU.
        model_name: Name of the model that made the embeddings (kept in the manifest).
        model_hash: Fingerprint of that model; :meth:`load` can check it.
        **params: Positive integers: ``hnsw_m`` (32), ``ef_construction`` (200), ``ef_search`` (256, raised to
            k), ``nlist`` (4 sqrt(n), at most n / 39), ``nprobe`` (see :func:`sbmoe.retrieval.ivf.ivf_defaults`),
            ``pq_m`` (a divisor of dim, up to dim / 4; pq / opq: up to 48 bytes of code), ``pq_bits`` (8),
            ``rescore`` (10). Those another type uses
            are accepted and ignored, so one set of parameters can serve all types. Without ``nlist``, ``ivf`` and
            ``ivfpq`` on fewer than 16,384 vectors search exactly: a warning says so and :attr:`params` records
            ``fallback="flat"``. A setting that is no positive integer raises DataError, as does, at training, one
            the vectors cannot meet.
    """

    def __init__(
        self,
        dim: int,
        index_type: str = "flat",
        use_gpu: bool | str = "auto",
        model_name: str = "",
        model_hash: str = "",
        **params: Any,
    ):
        check_index_params(index_type, params)
        if index_type == "binary" and dim % 8:
            raise DataError(f"binary index needs a dimension divisible by 8, got {dim}: choose another --index")
        self.dim = dim
        self.index_type = index_type
        self.model_name = model_name
        self.model_hash = model_hash
        self.requested = {k: v for k, v in {**PARAM_DEFAULTS, **params}.items() if k in SETTINGS[index_type]}
        self.params = dict(self.requested)  # what the built index uses: defaults filled in at training
        self.use_gpu = self._gpu_choice(use_gpu)
        self.doc_ids: list[str] = []
        self._cpu: Any = None
        self._vectors: list[np.ndarray] = []  # float copies for re-scoring (RESCORED_TYPES)
        self._gpu: Any = None
        self._gpu_resources: list[Any] = []

    def __len__(self) -> int:
        return 0 if self._cpu is None else int(self._cpu.ntotal)

    def __repr__(self) -> str:
        return f"DenseIndex({self.index_type!r}, dim={self.dim}, count={len(self)}, gpu={self.use_gpu})"

    @property
    def structure(self) -> str:
        """The faiss structure searched: the index type, or ``flat`` where a small corpus fell back to exact search."""
        return self.params.get("fallback", self.index_type)

    @property
    def faiss_index(self) -> Any:
        """The faiss index that :meth:`search` queries (the GPU copy when on GPU)."""
        return self._device_index(1)

    @property
    def lists_on_disk(self) -> str | None:
        """The file holding the inverted lists when they stay on disk (memory-mapped), else None."""
        lists = faiss.downcast_InvertedLists(self._cpu.invlists) if isinstance(self._cpu, faiss.IndexIVF) else None
        return lists.filename if isinstance(lists, faiss.OnDiskInvertedLists) else None

    def attach(self, index: Any, doc_ids: list[str]) -> None:
        """Serve ``index``, filled elsewhere from this trained one (a disk-merged sharded index); row i: doc_ids[i]."""
        self._cpu, self.doc_ids, self._gpu = index, list(doc_ids), None

    def _gpu_choice(self, use_gpu: bool | str) -> bool:
        available = gpu_count() > 0
        if use_gpu == "auto":
            return available and self.index_type in GPU_TYPES
        if use_gpu and not available:
            raise SetupError("use_gpu=True but faiss has no GPU support here (install faiss-gpu, check the GPU)")
        if use_gpu and self.index_type not in GPU_TYPES:
            raise ValueError(f"index type {self.index_type!r} runs on CPU only; GPU types: {', '.join(GPU_TYPES)}")
        return bool(use_gpu)

    def _new_faiss(self, n: int, train_size: int) -> Any:
        """An untrained faiss index for ``n`` vectors, trained on ``train_size`` of them; fills in :attr:`params`."""
        self.params = filled_params(self.index_type, self.dim, n, train_size, self.requested)
        if "fallback" in self.params:
            logger.warning(fallback_message(self.index_type, n))
        if self.index_type in PQ_TYPES and self.structure != "flat":
            self.params = pq_params(self.dim, train_size, self.params)
        return new_faiss(self.structure, self.dim, self.params)

    def train(self, sample: np.ndarray, total: int | None = None) -> None:
        """Start a new, empty faiss index, trained on ``sample`` (ivf, ivfpq, sq8); ``total`` sizes the IVF lists."""
        sample = self._check(sample)
        self.doc_ids, self._vectors, self._gpu = [], [], None
        self._cpu = self._new_faiss(total or len(sample), len(sample))
        if not self._cpu.is_trained:
            self._cpu.train(sample)

    def add(self, embeddings: np.ndarray, ids: list[str] | None = None) -> None:
        """Append embeddings (one batch); the first batch trains the index unless :meth:`train` ran.

        Args:
            embeddings: ``n x dim`` float array.
            ids: Document ids for the rows; default: their running row numbers as strings.
        """
        embeddings = self._check(embeddings)
        if self.lists_on_disk:
            raise DataError("this index keeps its inverted lists on disk and cannot grow: rebuild it (--rebuild)")
        if ids is not None and len(ids) != len(embeddings):
            raise ValueError(f"{len(ids)} ids for {len(embeddings)} embeddings")
        if self._cpu is None:
            self.train(embeddings)
        self._cpu.add(binary_codes(embeddings) if self.index_type == "binary" else embeddings)
        if self.index_type in RESCORED_TYPES:
            self._vectors.append(embeddings)
        start = len(self.doc_ids)
        self.doc_ids.extend(ids if ids is not None else (str(i) for i in range(start, start + len(embeddings))))
        self._gpu = None

    def build(
        self,
        embeddings: np.ndarray,
        ids: list[str] | None = None,
        batch_size: int = 65_536,
        show_progress: bool = True,
    ) -> DenseIndex:
        """Train on a random sample (at most 200k rows) of ``embeddings`` (may be a memmap), then add in batches."""
        n = len(embeddings)
        if n == 0:
            raise ValueError("no embeddings to index")
        rows = np.sort(np.random.default_rng(0).choice(n, size=min(n, TRAIN_SAMPLE), replace=False))
        self.train(np.asarray(embeddings[rows]), total=n)
        with tqdm(total=n, desc=f"index {self.index_type}", unit="vec", disable=not show_progress) as bar:
            for start in range(0, n, batch_size):
                chunk = np.asarray(embeddings[start : start + batch_size])
                self.add(chunk, None if ids is None else ids[start : start + len(chunk)])
                bar.update(len(chunk))
        return self

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` documents per query.

        Returns:
            ``scores`` (``nq x k`` float32, inner products, best first) and ``ids`` (``nq x k`` int64 row
            numbers into :attr:`doc_ids`; -1 where fewer than ``k`` were found). ``k`` is capped at the size.
        """
        queries = self._check(queries)
        if len(self) == 0:
            raise ValueError("search on an empty index: add embeddings first")
        k = min(k, len(self))
        if self.index_type in RESCORED_TYPES:
            rows = candidates(self.index_type, self._cpu, queries, min(len(self), k * self.params["rescore"]))
            return rescore(queries, self.vectors(), rows, k)
        return self._device_index(k).search(queries, k)

    def vectors(self) -> np.ndarray:
        """The full-precision vectors (N x dim float32) a re-scored index keeps (memory-mapped after :meth:`load`)."""
        if self.index_type not in RESCORED_TYPES:
            raise ValueError(f"a {self.index_type!r} index keeps no separate float vectors")
        if not self._vectors:
            return np.zeros((0, self.dim), dtype=np.float32)
        if len(self._vectors) > 1:
            self._vectors = [np.concatenate(self._vectors)]
        return self._vectors[0]

    def _device_index(self, k: int) -> Any:
        """The index to search with top-``k``: the GPU copy (made on first use), or the CPU one."""
        if self._cpu is None:
            raise ValueError("the index is empty: add embeddings first")
        if self.index_type == "hnsw":
            self._cpu.hnsw.efSearch = max(self.params["ef_search"], k)
        elif self.structure in IVF_TYPES:
            self._cpu.nprobe = self.params["nprobe"]
        if not self.use_gpu or k > GPU_MAX_K:
            return self._cpu
        if self._gpu is None:
            try:
                self._gpu = self._to_gpu()
            except RuntimeError as err:  # a faiss GPU build without this index type on GPU
                logger.warning("%s index stays on CPU: faiss cannot move it to GPU (%s)", self.index_type, err)
                self.use_gpu = False
                return self._cpu
        if self.structure in IVF_TYPES:
            faiss.GpuParameterSpace().set_index_parameter(self._gpu, "nprobe", self.params["nprobe"])
        return self._gpu

    def _to_gpu(self) -> Any:
        gpu, self._gpu_resources = to_gpu(self._cpu, float16=self.structure == "ivfpq")
        return gpu

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"dimension mismatch: expected n x {self.dim} embeddings, got shape {x.shape}")
        return x

    def bytes_per_vector(self) -> dict[str, float]:
        """Serialized index bytes per vector, the code bytes alone (re-scored types; codebooks left out) and the
        float copies re-scoring keeps beside them (on disk, memory-mapped once loaded)."""
        if len(self) == 0:
            return {"index": 0.0, "code": 0.0, "rescore": 0.0}
        writer = faiss.serialize_index_binary if self.index_type == "binary" else faiss.serialize_index
        rescored = self.index_type in RESCORED_TYPES
        code = code_bytes(self.index_type, self.dim, self.params) if rescored else 0.0
        return {"index": writer(self._cpu).nbytes / len(self), "code": code, "rescore": 4.0 * self.dim * rescored}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to the folder ``path`` atomically (temporary folder, then rename).

        The folder holds ``manifest.json`` (model name and hash, dimension, metric, type, parameters, count,
        sbmoe and faiss versions, file sizes and SHA-256), ``index.faiss``, ``doc_ids.json`` and, for re-scored
        types, ``vectors.npy``.

        Raises:
            DataError: an id a saved index (or a TREC run) cannot hold, named.
        """
        if self._cpu is None:
            raise ValueError("nothing to save: the index is empty")
        for row, doc_id in enumerate(self.doc_ids):
            check_id(doc_id, f"document {row}")
        final = Path(path)
        with atomic_dir(final) as tmp:
            writer = faiss.write_index_binary if self.index_type == "binary" else faiss.write_index
            writer(self._cpu, str(tmp / INDEX_FILE))
            if self.lists_on_disk:  # loading finds them beside index.faiss; never written again, so linked if it can
                try:
                    os.link(self.lists_on_disk, tmp / LISTS_FILE)
                except OSError:  # another file system
                    shutil.copyfile(self.lists_on_disk, tmp / LISTS_FILE)
            if self.index_type in RESCORED_TYPES:
                np.save(tmp / VECTORS_FILE, self.vectors())
            (tmp / IDS_FILE).write_text(json.dumps(self.doc_ids, ensure_ascii=True), encoding="utf-8")
            fields = {
                "model": {"name": self.model_name, "hash": self.model_hash},
                "dim": self.dim,
                "metric": METRIC,
                "type": self.index_type,
                "params": self.params,
                "count": len(self),
            }
            write_manifest(tmp, fields)
        return final

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        expect_dim: int | None = None,
        expect_model_hash: str | None = None,
        use_gpu: bool | str = "auto",
        verify: bool = True,
    ) -> DenseIndex:
        """Load an index folder written by :meth:`save`, checking it against its manifest.

        Args:
            path: The index folder.
            expect_dim: Raise unless the index has this dimension (the query model's).
            expect_model_hash: Raise unless the index was built by a model with this fingerprint.
            use_gpu: As in the constructor.
            verify: Check every file's SHA-256 (sizes are always checked).

        Raises:
            IndexLoadError: missing/truncated/corrupt file, a manifest that disagrees with the faiss file, or a
                dimension/model mismatch, with the file named.
        """
        folder = Path(path)
        manifest = read_manifest(folder, {"model", "dim", "metric", "type", "params", "count"})
        if expect_dim is not None and manifest["dim"] != expect_dim:
            raise IndexLoadError(
                f"{folder}: dimension mismatch: the index holds {manifest['dim']}-d vectors, "
                f"the model gives {expect_dim}-d"
            )
        built_by = manifest["model"]
        if expect_model_hash is not None and built_by["hash"] != expect_model_hash:
            raise IndexLoadError(
                f"{folder}: model mismatch: built with {built_by['name'] or 'an unnamed model'} "
                f"(hash {built_by['hash'][:12] or 'none'}), expected hash {expect_model_hash[:12]}"
            )
        check_files(folder, manifest, verify)
        if manifest["type"] not in INDEX_TYPES or manifest["metric"] != METRIC:
            raise IndexLoadError(
                f"{folder / MANIFEST}: type {manifest['type']!r}, metric {manifest['metric']!r}: "
                f"this sbmoe reads {', '.join(INDEX_TYPES)} with {METRIC}: {REBUILD}"
            )
        settings = {k: v for k, v in manifest["params"].items() if k != "fallback"}
        index = cls(manifest["dim"], manifest["type"], use_gpu, built_by["name"], built_by["hash"], **settings)
        index.params = dict(manifest["params"])
        index._cpu = _read_faiss(folder, manifest)
        if manifest["type"] in RESCORED_TYPES:
            index._vectors = [np.load(folder / VECTORS_FILE, mmap_mode="r")]
        index.doc_ids = _read_ids(folder / IDS_FILE)
        if not len(index) == len(index.doc_ids) == manifest["count"]:
            raise IndexLoadError(
                f"{folder}: count mismatch: manifest {manifest['count']}, index {len(index)}, ids {len(index.doc_ids)}"
            )
        return index


def _read_faiss(folder: Path, manifest: dict[str, Any]) -> Any:
    """The faiss index of ``folder``, checked against the manifest's type and dimension."""
    binary = manifest["type"] == "binary"
    reader = faiss.read_index_binary if binary else faiss.read_index
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR if LISTS_FILE in manifest["files"] else 0
    try:
        index = reader(str(folder / INDEX_FILE), flags)
    except RuntimeError as err:
        raise IndexLoadError(f"{folder / INDEX_FILE}: faiss cannot read it ({str(err).splitlines()[0]})") from err
    structure = manifest["params"].get("fallback", manifest["type"])
    found = type(faiss.downcast_index(index) if not binary else index).__name__
    if found not in FAISS_CLASSES[structure] or index.d != manifest["dim"]:
        raise IndexLoadError(
            f"{folder / MANIFEST}: says a {manifest['dim']}-d {structure} index, {INDEX_FILE} holds a {index.d}-d "
            f"{found}: the manifest was altered; {REBUILD}"
        )
    return index


def _read_ids(file: Path) -> list[str]:
    """The saved row ids (a JSON array of strings)."""
    try:
        ids = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise IndexLoadError(f"{file}: unreadable ({err}): {REBUILD}") from err
    if not isinstance(ids, list) or not all(isinstance(doc_id, str) for doc_id in ids):
        raise IndexLoadError(f"{file}: expected a JSON array of id strings: {REBUILD}")
    return ids


def binary_codes(x: np.ndarray) -> np.ndarray:
    """Sign bits of each row, packed 8 per byte (the binary index's codes)."""
    return np.packbits(x > 0, axis=1)
