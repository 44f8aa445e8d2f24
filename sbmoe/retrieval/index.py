"""A thin class over faiss: flat, HNSW, IVF, IVF-PQ, SQ8, PQ/OPQ and binary indexes; CPU or GPU; atomic save/load.

Build one with :func:`sbmoe.retrieval.build.build_index`; re-scored types serve a
:class:`~sbmoe.retrieval.rescore.RescoredIndex` around their codes, as any faiss index is served.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from sbmoe.errors import DataError, SetupError
from sbmoe.retrieval.faiss_types import GPU_TYPES, PARAM_DEFAULTS, SETTINGS, check_index_params, new_faiss
from sbmoe.retrieval.gpu import gpu_count, to_gpu
from sbmoe.retrieval.index_folder import lists_file, read_folder, write_folder
from sbmoe.retrieval.ivf import IVF_TYPES, fallback_message, filled_params
from sbmoe.retrieval.rescore import PQ_TYPES, RescoredIndex, pq_params, with_rescoring

logger = logging.getLogger(__name__)

GPU_MAX_K = 2048  # faiss GPU top-k limit; larger k searches the CPU copy


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
        self._cpu: Any = None  # a faiss index, or a RescoredIndex around one
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
        """The index that :meth:`search` queries: the faiss index (the GPU copy when on GPU), or for re-scored
        types the :class:`~sbmoe.retrieval.rescore.RescoredIndex` around its codes."""
        return self._device_index(1)

    @property
    def lists_on_disk(self) -> str | None:
        """The file holding the inverted lists when they stay on disk (memory-mapped), else None."""
        return lists_file(self._cpu)

    def attach(self, index: Any, doc_ids: list[str]) -> None:
        """Serve ``index``, filled elsewhere from this trained one (lists merged on disk); row i: doc_ids[i]."""
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
        if self.index_type in PQ_TYPES:
            self.params = pq_params(self.dim, train_size, self.params)
        return with_rescoring(new_faiss(self.structure, self.dim, self.params), self.params)

    def train(self, sample: np.ndarray, total: int | None = None) -> None:
        """Start a new, empty faiss index, trained on ``sample`` (ivf, ivfpq, sq8); ``total`` sizes the IVF lists."""
        sample = self._check(sample)
        self.doc_ids, self._gpu = [], None
        self._cpu = self._new_faiss(total or len(sample), len(sample))
        if not self._cpu.is_trained:
            self._cpu.train(sample)

    def add(self, embeddings: np.ndarray, ids: list[str] | None = None) -> None:
        """Append embeddings (one batch); the first batch trains the index unless :meth:`train` ran (a whole
        corpus: :func:`~sbmoe.retrieval.build.build_index` trains on a sample, then adds in batches).

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
        self._cpu.add(embeddings)
        start = len(self.doc_ids)
        self.doc_ids.extend(ids if ids is not None else (str(i) for i in range(start, start + len(embeddings))))
        self._gpu = None

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
        return self._device_index(k).search(queries, k)

    def _device_index(self, k: int) -> Any:
        """The index to search with top-``k``: the GPU copy (made on first use), or the CPU one."""
        if self._cpu is None:
            raise ValueError("the index is empty: add embeddings first")
        if self.index_type == "hnsw":
            self._cpu.hnsw.efSearch = max(self.params["ef_search"], k)
        elif self.structure in IVF_TYPES:
            self._cpu.nprobe = self.params["nprobe"]
        elif isinstance(self._cpu, RescoredIndex):
            self._cpu.rescore = self.params["rescore"]
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
        if isinstance(self._cpu, RescoredIndex):
            code = self._cpu.code_bytes(self.params)
            return {"index": self._cpu.serialized_bytes() / len(self), "code": code, "rescore": 4.0 * self.dim}
        return {"index": faiss.serialize_index(self._cpu).nbytes / len(self), "code": 0.0, "rescore": 0.0}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to the folder ``path`` atomically (temporary folder, then rename).

        The folder holds ``manifest.json`` (model name and hash, dimension, metric, type, parameters, count,
        sbmoe and faiss versions, file sizes and SHA-256), ``index.faiss``, ``doc_ids.json``, ``lists.ivfdata``
        for lists kept on disk and, for re-scored types, ``vectors.npy``.

        Raises:
            DataError: an id a saved index (or a TREC run) cannot hold, named.
        """
        if self._cpu is None:
            raise ValueError("nothing to save: the index is empty")
        fields = {
            "model": {"name": self.model_name, "hash": self.model_hash},
            "dim": self.dim,
            "type": self.index_type,
            "params": self.params,
            "count": len(self),
        }
        return write_folder(path, self._cpu, self.doc_ids, fields)

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
        manifest, faiss_index, doc_ids = read_folder(path, expect_dim, expect_model_hash, verify)
        settings = {k: v for k, v in manifest["params"].items() if k != "fallback"}
        built_by = manifest["model"]
        index = cls(manifest["dim"], manifest["type"], use_gpu, built_by["name"], built_by["hash"], **settings)
        index.params = dict(manifest["params"])
        index._cpu, index.doc_ids = faiss_index, doc_ids
        return index
