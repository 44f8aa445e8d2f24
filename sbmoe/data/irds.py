"""``irds:<id>`` datasets through ir-datasets, with a writable ``$IR_DATASETS_HOME`` that never touches ../shared."""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from sbmoe.data.dataset import DataError, Doc, RetrievalDataset, select_queries
from sbmoe.paths import cache_dir as default_cache_dir

ENV = "IR_DATASETS_HOME"
# TREC DL convention: for binary metrics (MAP, Recall, P, MRR) grade >= 2 counts as relevant.
TREC_DL_PREFIXES = ("msmarco-passage/trec-dl-", "msmarco-document/trec-dl-")
MSMARCO_COLLECTION = ("collection.tsv", "collectionandqueries.tar.gz")


def irds_home(data_dir: Path) -> Path:
    """The ir-datasets home: ``$IR_DATASETS_HOME`` when the user set it, else a project-local link farm.

    The link farm (``<cache dir>/ir_datasets``) mirrors every file of ``<data_dir>/ir_datasets`` as a symlink, so
    ir-datasets finds the shipped archives (``cranfield/cran.tar.gz``) and writes its caches beside the links,
    never into the read-only data folder. The chosen folder is exported as ``$IR_DATASETS_HOME``.
    """
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    home = default_cache_dir() / "ir_datasets"
    source = data_dir / "ir_datasets"
    if source.is_dir():
        for file in source.rglob("*"):
            link = home / file.relative_to(source)
            if file.is_file() and not file.name.startswith(".") and not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(file.resolve())
    home.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(home)
    return home


def _import_ir_datasets(home: Path) -> ModuleType:
    """Import ir_datasets after ``$IR_DATASETS_HOME`` is set (it fixes dataset paths and makes folders on import)."""
    if "ir_datasets" in sys.modules:
        module = sys.modules["ir_datasets"]
        imported_home = Path(getattr(module, "_sbmoe_home", home))
        if imported_home.resolve() != home.resolve():
            raise DataError(
                f"ir_datasets was already imported with {ENV}={imported_home}; it cannot switch to {home} "
                "within one process"
            )
        return module
    module = importlib.import_module("ir_datasets")
    module._sbmoe_home = str(home)
    return module


def irds_dataset(dataset_id: str, data_dir: Path) -> Any:
    """``ir_datasets.load(dataset_id)`` (no ``irds:`` prefix) with the home of :func:`irds_home`, so ir-datasets
    reads the shipped archives and writes its caches under the cache folder, never beside the data.

    Raises:
        DataError: not an ir-datasets id, or ir_datasets already imported with another home.
    """
    ir_datasets = _import_ir_datasets(irds_home(data_dir))
    try:
        return ir_datasets.load(dataset_id)
    except KeyError as err:
        raise DataError(f"irds:{dataset_id}: not an ir-datasets id (see https://ir-datasets.com)") from err


def missing_collection(dataset_id: str, home: Path) -> str | None:
    """For MS MARCO passage ids: a message naming the file ir-datasets expects when the collection is absent."""
    if not dataset_id.startswith("msmarco-passage"):
        return None
    base = home / "msmarco-passage"
    if any((base / name).exists() for name in MSMARCO_COLLECTION):
        return None
    return (
        f"irds:{dataset_id}: the MS MARCO passage collection is not under {ENV}={home}. ir-datasets expects "
        f"{base / 'collectionandqueries.tar.gz'} (1.06 GB, md5 31644046b18952c1386cd4564ba2ae69, from "
        f"msmarco.z22.web.core.windows.net/msmarcoranking/) or its extracted {base / 'collection.tsv'} (with "
        f"{base / 'irds_version.txt'} containing 'v2'). The queries and qrels alone are in "
        "../shared/data/msmarco-topics; ../shared/data/msmarco-sample is a 5,000-passage slice for an end-to-end "
        "check."
    )


def _missing_downloads(ir_datasets: ModuleType, dataset_id: str, home: Path) -> list[str]:
    """Files from ir-datasets' download table for ``dataset_id`` that are not in the home folder."""
    table = json.loads((Path(ir_datasets.__file__).parent / "etc" / "downloads.json").read_text())
    top, _, sub = dataset_id.partition("/")
    missing = []
    for key, entry in table.get(top, {}).items():
        cache_path = entry.get("cache_path") if isinstance(entry, dict) else None
        related = not sub or key == "main" or sub.startswith(key.split("/")[0])
        if cache_path and related and not (home / top / cache_path).exists():
            missing.append(str(home / top / cache_path))
    return missing


def load_irds(dataset_id: str, data_dir: Path) -> RetrievalDataset:
    """Load ``dataset_id`` (without the ``irds:`` prefix) through ir-datasets.

    Raises:
        DataError: unknown id, MS MARCO collection absent (naming the expected file), or files ir-datasets
            could not fetch offline (naming the missing download paths).
    """
    home = irds_home(data_dir)
    message = missing_collection(dataset_id, home)
    if message:
        raise DataError(message)
    dataset = irds_dataset(dataset_id, data_dir)
    ir_datasets = _import_ir_datasets(home)
    for part in ("queries", "qrels", "docs"):
        if not getattr(dataset, f"has_{part}")():
            raise DataError(f"irds:{dataset_id}: has no {part}; a retrieval evaluation needs docs, queries and qrels")

    def failed(err: Exception) -> DataError:
        missing = _missing_downloads(ir_datasets, dataset_id, home)
        where = f"; files it expects and lacks: {', '.join(missing)}" if missing else ""
        return DataError(f"irds:{dataset_id}: ir-datasets could not read its data under {ENV}={home} ({err}){where}")

    try:
        qrels: dict[str, dict[str, int]] = {}
        for row in dataset.qrels_iter():
            qrels.setdefault(row.query_id, {})[row.doc_id] = int(row.relevance)
        all_queries = {q.query_id: getattr(q, "text", None) or q.default_text() for q in dataset.queries_iter()}
    except Exception as err:  # ir-datasets raises bare RuntimeError/ConnectionError when a download fails
        raise failed(err) from err
    queries, unknown = select_queries(qrels, all_queries)

    def docs() -> Iterator[Doc]:
        try:
            for doc in dataset.docs_iter():
                text = doc.text if hasattr(doc, "text") else doc.default_text()
                yield Doc(doc.doc_id, getattr(doc, "title", "") or "", text or "")
        except Exception as err:
            raise failed(err) from err

    level = 2 if dataset_id.startswith(TREC_DL_PREFIXES) else 1
    return RetrievalDataset(f"irds:{dataset_id}", "test", queries, qrels, docs, level, unknown)
