"""A user's own corpus as a streaming dataset: a BEIR folder or name, irds:<id>, .jsonl, .tsv or .parquet."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from sbmoe.data.beir import IRDS_PREFIX, load_dataset, read_jsonl, tsv_rows
from sbmoe.data.dataset import DataError, Doc, RetrievalDataset
from sbmoe.paths import data_dir as _data_dir

FORMATS = "a BEIR folder or name, irds:<id>, a .jsonl of {_id, title, text}, a .tsv of id<TAB>text, or a .parquet"
PARQUET_BATCH = 4096


def load_corpus(spec: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> RetrievalDataset:
    """The documents of ``spec`` as a :class:`RetrievalDataset` without queries (for indexing).

    Args:
        spec: A BEIR folder (only ``corpus.jsonl`` is needed) or a dataset name under the data folder,
            ``irds:<id>``, a ``.jsonl`` file of ``{"_id", "title", "text"}`` objects, a ``.tsv`` file of
            ``id<TAB>text`` rows (an ``id``/``_id`` header row is skipped) or a ``.parquet`` file with columns
            ``_id`` (or ``id``), ``text`` and optionally ``title``.
        data_dir: Where dataset names are looked up (default: :func:`sbmoe.paths.data_dir`).

    Raises:
        DataError: a missing file or folder, an unknown format, or a malformed record (named by file and line).
    """
    text = str(spec)
    if text.startswith(IRDS_PREFIX):
        dataset = load_dataset(text, data_dir=data_dir)
        return RetrievalDataset(dataset.name, "corpus", {}, {}, dataset.iter_docs)
    path = Path(text).expanduser()
    readers = {".jsonl": _jsonl_docs, ".tsv": _tsv_docs, ".parquet": _parquet_docs}
    if path.suffix in readers:
        if not path.is_file():
            raise DataError(f"{path}: corpus file not found (expected {FORMATS})")
        return RetrievalDataset(path.stem, "corpus", {}, {}, lambda: readers[path.suffix](path))
    if path.is_file():
        raise DataError(f"{path}: is a file with extension {path.suffix or '(none)'!r}; expected {FORMATS}")
    folder = path if path.is_dir() else _data_dir(data_dir) / text
    corpus_file = folder / "corpus.jsonl"
    if not corpus_file.is_file():
        raise DataError(f"corpus {text!r}: no {path / 'corpus.jsonl'} nor {corpus_file} (expected {FORMATS})")
    return RetrievalDataset(folder.name, "corpus", {}, {}, lambda: _jsonl_docs(corpus_file))


def _jsonl_docs(path: Path) -> Iterator[Doc]:
    for record in read_jsonl(path, ("title", "text")):
        yield Doc(record["_id"], record["title"], record["text"])


def _tsv_docs(path: Path) -> Iterator[Doc]:
    for line_no, row in tsv_rows(path):
        if line_no == 1 and row[0] in ("id", "_id"):
            continue
        if len(row) != 2 or not row[0]:
            raise DataError(f"{path}:{line_no}: {len(row)} tab-separated fields, expected 2 (id, text)")
        yield Doc(row[0], "", row[1])


def _parquet_docs(path: Path) -> Iterator[Doc]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError for a file that is not parquet
        raise DataError(f"{path}: not a readable parquet file ({err})") from err
    names = table.schema_arrow.names
    id_column = next((c for c in ("_id", "id") if c in names), None)
    if id_column is None or "text" not in names:
        raise DataError(f"{path}: columns {names}; expected '_id' (or 'id'), 'text' and optionally 'title'")
    columns = [id_column, "text", *(["title"] if "title" in names else [])]
    row = 0
    for batch in table.iter_batches(batch_size=PARQUET_BATCH, columns=columns):
        values = batch.to_pydict()
        titles = values.get("title") or [""] * batch.num_rows
        for doc_id, text, title in zip(values[id_column], values["text"], titles, strict=True):
            row += 1
            if doc_id is None or str(doc_id) == "":
                raise DataError(f"{path}: row {row} has an empty {id_column!r}")
            yield Doc(str(doc_id), title or "", text or "")


def read_queries(path: str | os.PathLike) -> dict[str, str]:
    """Queries from a ``.jsonl`` file of ``{"_id", "text"}`` objects or a ``.tsv`` file of ``id<TAB>text`` rows.

    Raises:
        DataError: a missing file, another extension, or a malformed line (named by file and line).
    """
    path = Path(path).expanduser()
    if path.suffix not in (".jsonl", ".tsv"):
        raise DataError(f"{path}: expected a .jsonl file of {{_id, text}} or a .tsv file of id<TAB>text")
    if not path.is_file():
        raise DataError(f"{path}: queries file not found")
    if path.suffix == ".jsonl":
        queries = {record["_id"]: record["text"] for record in read_jsonl(path, ("text",))}
    else:
        queries = {doc.id: doc.text for doc in _tsv_docs(path)}
    if not queries:
        raise DataError(f"{path}: no queries")
    return queries
