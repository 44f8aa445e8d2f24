"""A saved :class:`~sbmoe.retrieval.index.DenseIndex` folder: its files, written atomically under a checksum
manifest, and read back checked against it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from sbmoe.data.ids import check_id
from sbmoe.files import atomic_dir
from sbmoe.retrieval.faiss_types import FAISS_CLASSES, INDEX_TYPES
from sbmoe.retrieval.manifest import MANIFEST, REBUILD, IndexLoadError, check_files, read_manifest, write_manifest
from sbmoe.retrieval.rescore import VECTORS_FILE, RescoredIndex, with_rescoring

INDEX_FILE = "index.faiss"
IDS_FILE = "doc_ids.json"
LISTS_FILE = "lists.ivfdata"  # IVF inverted lists kept on disk, beside INDEX_FILE
METRIC = "inner_product"
KEYS = {"model", "dim", "metric", "type", "params", "count"}  # what a DenseIndex manifest holds


def lists_file(index: Any) -> str | None:
    """The file holding a faiss index's inverted lists when they stay on disk (memory-mapped), else None."""
    ivf = faiss.try_extract_index_ivf(index) if isinstance(index, faiss.Index) else None
    lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
    return lists.filename if isinstance(lists, faiss.OnDiskInvertedLists) else None


def write_folder(path: str | os.PathLike, index: Any, doc_ids: list[str], fields: dict[str, Any]) -> Path:
    """Write ``index`` (a faiss index or a :class:`~sbmoe.retrieval.rescore.RescoredIndex`), its row ids and the
    manifest ``fields`` to the folder ``path`` atomically.

    Raises:
        DataError: an id a saved index (or a TREC run) cannot hold, named.
    """
    for row, doc_id in enumerate(doc_ids):
        check_id(doc_id, f"document {row}")
    final = Path(path)
    with atomic_dir(final) as tmp:
        if isinstance(index, RescoredIndex):
            index.write(tmp / INDEX_FILE)
        else:
            faiss.write_index(index, str(tmp / INDEX_FILE))
        lists = lists_file(index)
        if lists:  # loading finds them beside index.faiss; never written again, so linked if it can
            try:
                os.link(lists, tmp / LISTS_FILE)
            except OSError:  # another file system
                shutil.copyfile(lists, tmp / LISTS_FILE)
        (tmp / IDS_FILE).write_text(json.dumps(doc_ids, ensure_ascii=True), encoding="utf-8")
        write_manifest(tmp, {**fields, "metric": METRIC})
    return final


def read_folder(
    path: str | os.PathLike, expect_dim: int | None, expect_model_hash: str | None, verify: bool
) -> tuple[dict[str, Any], Any, list[str]]:
    """The manifest, the index (re-scoring wrapped around its codes where the type re-scores) and the row ids of
    a folder written by :func:`write_folder`, each checked against the manifest (see
    :meth:`~sbmoe.retrieval.index.DenseIndex.load`)."""
    folder = Path(path)
    manifest = read_manifest(folder, KEYS)
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
    vectors = np.load(folder / VECTORS_FILE, mmap_mode="r") if VECTORS_FILE in manifest["files"] else None
    index = with_rescoring(_read_faiss(folder, manifest), manifest["params"], vectors)
    doc_ids = _read_ids(folder / IDS_FILE)
    if not index.ntotal == len(doc_ids) == manifest["count"]:
        raise IndexLoadError(
            f"{folder}: count mismatch: manifest {manifest['count']}, index {index.ntotal}, ids {len(doc_ids)}"
        )
    return manifest, index, doc_ids


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
