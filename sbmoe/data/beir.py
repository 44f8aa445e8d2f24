"""BEIR folders and ``irds:<id>`` ir-datasets ids -> one streaming :class:`RetrievalDataset`, with validation."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from sbmoe.data.dataset import DataError, Doc, RetrievalDataset, select_queries
from sbmoe.data.textfile import json_lines, numbered_lines
from sbmoe.paths import data_dir as _data_dir

IRDS_PREFIX = "irds:"


def load_dataset(spec: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> RetrievalDataset:
    """Load a BEIR folder or an ir-datasets id into a :class:`RetrievalDataset`.

    Args:
        spec: A BEIR folder name under the data folder (``scifact``), a folder path, either of these with a
            ``:split`` suffix (``scifact:train``), or ``irds:<id>`` (``irds:cranfield``).
        split: The qrels split (``qrels/<split>.tsv``) of a BEIR folder; ignored for ``irds:`` ids.
        data_dir: Where BEIR folder names are looked up (default: :func:`sbmoe.paths.data_dir`).

    Raises:
        DataError: missing folder or file, or a malformed line (named by file and line number).
    """
    if spec.startswith(IRDS_PREFIX):
        from sbmoe.data.irds import load_irds

        return load_irds(spec[len(IRDS_PREFIX) :], data_dir=_data_dir(data_dir))
    name, _, suffix = spec.rpartition(":")
    if name and suffix and "/" not in suffix and not Path(spec).exists():
        spec, split = name, suffix
    folder = _beir_folder(spec, data_dir)
    return load_beir(folder, split)


def _beir_folder(spec: str, explicit_dir: str | os.PathLike | None) -> Path:
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        raise DataError(
            f"{path}: is a file; expected a BEIR folder holding corpus.jsonl, queries.jsonl and qrels/<split>.tsv"
            + (" (give the folder that holds it)" if path.name in ("corpus.jsonl", "queries.jsonl") else "")
        )
    root = _data_dir(explicit_dir)
    if root.is_file():
        raise DataError(f"{root}: the data folder is a file; expected a folder of BEIR datasets (--data-dir)")
    if (root / spec).is_dir():
        return root / spec
    available = sorted(p.name for p in root.iterdir() if (p / "corpus.jsonl").is_file()) if root.is_dir() else []
    raise DataError(
        f"dataset {spec!r} not found: no folder {path} nor {root / spec} "
        f"(expected a BEIR folder with corpus.jsonl, queries.jsonl, qrels/<split>.tsv; "
        f"available under {root}: {', '.join(available) or 'none'}; or use irds:<id>)"
    )


def load_beir(folder: Path, split: str = "test") -> RetrievalDataset:
    """Load a BEIR-layout folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``)."""
    corpus_file, queries_file = folder / "corpus.jsonl", folder / "queries.jsonl"
    qrels_file = folder / "qrels" / f"{split}.tsv"
    for required in (corpus_file, queries_file, qrels_file):
        if not required.is_file():
            splits = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
            hint = f" (splits present: {', '.join(splits)})" if required == qrels_file and splits else ""
            raise DataError(f"{required}: file not found{hint}")
    qrels = read_qrels_tsv(qrels_file)
    all_queries = {record["_id"]: record["text"] for record in read_jsonl(queries_file, ("text",))}
    queries, unknown = select_queries(qrels, all_queries)
    return RetrievalDataset(
        folder.name,
        split,
        queries,
        qrels,
        docs=lambda: (Doc(r["_id"], r["title"], r["text"]) for r in read_jsonl(corpus_file, ("title", "text"))),
        unknown_queries=unknown,
    )


def read_jsonl(path: Path, text_fields: tuple[str, ...]) -> Iterator[dict[str, str]]:
    """Yield ``{"_id", *text_fields}`` records; missing or null text fields read as ""; blank lines are skipped."""
    expected = f'expected one JSON object per line with "_id" and {", ".join(repr(f) for f in text_fields)}'
    for line_no, record in json_lines(path, expected):
        if record.get("_id") in (None, ""):
            raise DataError(f'{path}:{line_no}: missing "_id"; {expected}')
        out = {"_id": str(record["_id"])}
        for name in text_fields:
            value = record.get(name)
            if value is not None and not isinstance(value, str):
                raise DataError(f"{path}:{line_no}: {name!r} is {type(value).__name__}, expected a string")
            out[name] = value or ""
        yield out


def tsv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line number, fields)`` of a tab-separated UTF-8 file (no quoting); blank lines are skipped."""
    for line_no, line in numbered_lines(path):
        if line.strip():
            yield line_no, line.split("\t")


def read_qrels_tsv(path: Path) -> dict[str, dict[str, int]]:
    """Read ``query-id<TAB>corpus-id<TAB>score`` rows (the header line is optional)."""
    qrels: dict[str, dict[str, int]] = {}
    for line_no, row in tsv_rows(path):
        if line_no == 1 and row[0] == "query-id":
            continue
        if len(row) != 3:
            raise DataError(
                f"{path}:{line_no}: {len(row)} tab-separated fields, expected 3 (query-id, corpus-id, score)"
            )
        try:
            score = int(row[2])
        except ValueError as err:
            raise DataError(f"{path}:{line_no}: score {row[2]!r} is not an integer") from err
        qrels.setdefault(row[0], {})[row[1]] = score
    return qrels
