"""The stream and ray backends of :meth:`Retriever.build <sbmoe.retrieval.retriever.Retriever.build>`: its index and
document store.

The corpus is encoded into resumable embedding shards (in chunks here, or in a Ray actor pool), then indexed shard
by shard (:func:`~sbmoe.retrieval.build.build_index`): memory holds a chunk plus the index, never the corpus. An
``ivf`` or ``ivfpq`` index keeps its lists on disk, out of memory. A ``ram_budget`` without an index type picks the
most exact type that fits (:func:`sbmoe.retrieval.index_settings.choose_index`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from typing import Any

from sentence_transformers import SentenceTransformer

from sbmoe.retrieval.build import build_index
from sbmoe.retrieval.documents import Corpus, as_dataset
from sbmoe.retrieval.index import DenseIndex
from sbmoe.retrieval.index_settings import IndexSettings, choose_index, parse_bytes
from sbmoe.retrieval.ivf import IVF_TYPES
from sbmoe.retrieval.shards import ShardSet
from sbmoe.retrieval.store import DocStore
from sbmoe.retrieval.stream import encode_to_shards, store_from_shards

BACKENDS = ("local", "stream", "ray")


def build_sharded(
    model: SentenceTransformer,
    model_spec: str | None,
    corpus: Corpus,
    index: str | None,
    params: dict[str, Any],
    *,
    backend: str,
    ram_budget: int | str | None,
    shards: str | os.PathLike | None,
    shard_size: int,
    ray: dict[str, Any],
    batch_size: int,
    data_dir: str | os.PathLike | None,
    use_gpu: bool | str,
    show_progress: bool,
) -> tuple[DenseIndex, DocStore, IndexSettings | None]:
    """The index, the document store and the index choice made (if any) of :meth:`Retriever.build` with
    ``backend`` ``stream`` or ``ray`` (its arguments, the model loaded)."""
    if backend not in BACKENDS[1:]:
        raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if shards is None:
        raise ValueError(f"backend={backend!r} needs shards=FOLDER, where the resumable embedding shards go")
    shard_set = encode_shards(
        model, model_spec, corpus, backend, shards, shard_size, batch_size, data_dir, show_progress, ray
    )
    index_type, params, choice = index_choice(index, params, len(shard_set), shard_set.dim, ram_budget)
    dense = index_of_shards(shard_set, index_type, params, use_gpu, show_progress)
    return dense, store_from_shards(model, shard_set), choice


def encode_shards(
    model: SentenceTransformer,
    model_spec: str | None,
    corpus: Corpus,
    backend: str,
    shards: str | os.PathLike,
    shard_size: int,
    batch_size: int,
    data_dir: str | os.PathLike | None,
    show_progress: bool,
    ray: dict[str, Any],
) -> ShardSet:
    """The complete shard set of ``corpus`` in ``shards`` (resuming after the shards already there).

    ``ray`` holds :func:`~sbmoe.retrieval.ray_encode.ray_encode_to_shards`'s ``workers``, ``gpus_per_worker`` and
    ``address``.
    """
    if backend == "stream":
        dataset = as_dataset(corpus, data_dir)
        return encode_to_shards(model, dataset, shards, shard_size, batch_size, show_progress=show_progress)
    if model_spec is None or not isinstance(corpus, str | os.PathLike):
        raise ValueError("the ray backend loads the model and reads the corpus in each actor: pass both as names")
    from sbmoe.retrieval.ray_encode import ray_encode_to_shards

    return ray_encode_to_shards(model, model_spec, str(corpus), shards, shard_size, batch_size, **ray)


def index_choice(
    index: str | None, params: dict[str, Any], n: int, dim: int, ram_budget: int | str | None
) -> tuple[str, dict[str, Any], IndexSettings | None]:
    """The index type and parameters for ``n`` ``dim``-d vectors: ``index`` if given, else the type that fits
    ``ram_budget`` (given parameters win over the chosen ones), else ``flat``; and the choice made, if any."""
    if index is not None or ram_budget is None:
        return index or "flat", params, None
    budget = parse_bytes(ram_budget) if isinstance(ram_budget, str) else ram_budget
    chosen = choose_index(n, dim, budget)
    return chosen.index_type, {**chosen.params, **params}, chosen


def index_of_shards(
    shard_set: ShardSet, index_type: str, params: dict[str, Any], use_gpu: bool | str, show_progress: bool
) -> DenseIndex:
    """The index of complete shards; ivf and ivfpq keep their lists on disk, in a folder beside the shards that
    goes with the index (saving links or copies the lists into the index folder)."""
    if index_type not in IVF_TYPES:
        return build_index(shard_set, None, index_type, params, use_gpu=use_gpu, show_progress=show_progress)
    folder = shard_set.folder
    work_dir = tempfile.mkdtemp(prefix=f".{folder.name}.lists-", dir=folder.parent)
    try:
        dense = build_index(shard_set, None, index_type, params, lists_dir=work_dir, show_progress=show_progress)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    weakref.finalize(dense, shutil.rmtree, work_dir, True)
    return dense
