"""A user's own corpus as a streaming dataset: a BEIR folder or name, irds:<id>, .jsonl, .tsv or .parquet."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sbmoe.data.beir import IRDS_PREFIX, load_dataset, tsv_rows
from sbmoe.data.dataset import DataError, Doc, Problem, RetrievalDataset
from sbmoe.data.ids import check_id
from sbmoe.data.textfile import json_lines
from sbmoe.paths import data_dir as _data_dir

logger = logging.getLogger(__name__)

FORMATS = "a BEIR folder or name, irds:<id>, a .jsonl of {_id, title, text}, a .tsv of id<TAB>text, or a .parquet"
PARQUET_BATCH = 4096
ID_KEYS = ("_id", "id")
TSV_HEADER_IDS = ("id", "_id", "docid", "doc_id", "qid", "query_id", "query-id")


def load_corpus(spec: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> RetrievalDataset:
    """The documents of ``spec`` as a :class:`RetrievalDataset` without queries (for indexing).

    Args:
        spec: A BEIR folder (only ``corpus.jsonl`` is needed) or a dataset name under the data folder,
            ``irds:<id>``, a ``.jsonl`` file of ``{"_id", "title", "text"}`` objects, a ``.tsv`` file of
            ``id<TAB>text`` rows (a header row such as ``id<TAB>text`` is skipped) or a ``.parquet`` file with columns
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
    for _, doc in jsonl_records(path, ("title", "text")):
        yield doc


def jsonl_records(path: Path, fields: tuple[str, ...]) -> Iterator[tuple[int, Doc]]:
    """``(line number, Doc)`` per line of ``{"_id" (or "id"), *fields}`` objects; ``fields`` are title and/or text.

    Raises:
        DataError: no id, an id that is not a string or integer or breaks :data:`sbmoe.data.ids.ID_RULE`, a field
            that is not a string, or a line with none of ``fields`` (naming the keys it has), by file and line.
    """
    expected = f'expected one JSON object per line with "_id" and {", ".join(repr(f) for f in fields)}'
    for line_no, record in json_lines(path, expected):
        where = f"{path}:{line_no}"
        key = next((k for k in ID_KEYS if record.get(k) not in (None, "")), None)
        if key is None:
            raise DataError(f'{where}: missing "_id"; {expected}')
        doc_id = check_id(_id_text(record[key], where), where)
        if not any(name in record for name in fields):
            wanted = " or ".join(repr(f) for f in fields)
            raise DataError(f"{where}: no {wanted} (keys: {', '.join(record)}); {expected}")
        values = {}
        for name in fields:
            value = record.get(name)
            if value is not None and not isinstance(value, str):
                raise DataError(f"{where}: {name!r} is {type(value).__name__}, expected a string")
            values[name] = value or ""
        yield line_no, Doc(doc_id, values.get("title", ""), values.get("text", ""))


def _id_text(value: Any, where: str) -> str:
    """A JSON id as text: strings as they are, integers in decimal; anything else is refused (4983.0 is no id)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataError(f'{where}: id {value!r} is a JSON {type(value).__name__}; write ids as strings, e.g. "4983"')


def _tsv_docs(path: Path) -> Iterator[Doc]:
    for _, doc in _tsv_records(path):
        yield doc


def _tsv_records(path: Path) -> Iterator[tuple[int, Doc]]:
    for line_no, row in tsv_rows(path):
        if line_no == 1 and (row[0].lower() in TSV_HEADER_IDS or row[-1].lower() == "text"):
            continue
        if len(row) != 2 or not row[0]:
            raise DataError(f"{path}:{line_no}: {len(row)} tab-separated fields, expected 2 (id, text)")
        yield line_no, Doc(check_id(row[0], f"{path}:{line_no}"), "", row[1])


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
            yield Doc(check_id(str(doc_id), f"{path}: row {row}"), title or "", text or "")


def read_queries(path: str | os.PathLike) -> dict[str, str]:
    """Queries from a ``.jsonl`` file of ``{"_id", "text"}`` objects or a ``.tsv`` file of ``id<TAB>text`` rows.

    Blank queries are skipped and a repeated id keeps its first text, each with a warning that counts them.

    Raises:
        DataError: a missing file, another extension, a malformed line (named by file and line), or no query left.
    """
    path = Path(path).expanduser()
    if path.suffix not in (".jsonl", ".tsv"):
        raise DataError(f"{path}: expected a .jsonl file of {{_id, text}} or a .tsv file of id<TAB>text")
    if not path.is_file():
        raise DataError(f"{path}: queries file not found")
    records = jsonl_records(path, ("text",)) if path.suffix == ".jsonl" else _tsv_records(path)
    queries: dict[str, str] = {}
    blank, repeated = Problem("blank queries skipped"), Problem("repeated query ids, the first text of each kept")
    for line_no, query in records:
        if not query.text.strip():
            blank.add(f"line {line_no}")
        elif query.id in queries:
            repeated.add(f"{query.id} at line {line_no}")
        else:
            queries[query.id] = query.text
    for problem in (blank, repeated):
        if problem.count:
            logger.warning("%s: %s", path, problem)
    if not queries:
        raise DataError(f"{path}: no queries with text")
    return queries
