"""BEIR folders and ``irds:<id>`` ir-datasets ids -> one streaming :class:`RetrievalDataset`, with validation."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
IRDS_PREFIX = "irds:"
EXAMPLES = 5


class DataError(ValueError):
    """Missing or malformed retrieval data; the message names the file (and line) and what was expected."""


def beir_text(title: str | None, text: str | None) -> str:
    """BEIR's document text: ``title + " " + text``, stripped (title-only and text-only documents work)."""
    return f"{title or ''} {text or ''}".strip()


@dataclass(frozen=True)
class Doc:
    """One corpus document."""

    id: str
    title: str
    text: str

    @property
    def full_text(self) -> str:
        """BEIR's document text (see :func:`beir_text`)."""
        return beir_text(self.title, self.text)


@dataclass
class Problem:
    """A validation finding: how many items are affected, with a few examples."""

    what: str
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, item: str) -> None:
        """Count ``item`` and keep it as an example while there are fewer than :data:`EXAMPLES`."""
        self.count += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(item)

    def __str__(self) -> str:
        return f"{self.count} {self.what} (e.g. {', '.join(self.examples)})"


@dataclass
class CorpusScan:
    """What one streaming pass over the corpus found."""

    size: int
    fingerprint: str
    empty_docs: Problem
    duplicate_ids: Problem
    qrel_docs_found: set[str]


class RetrievalDataset:
    """Queries, qrels and a corpus that streams in batches (it never needs to fit in RAM).

    Attributes:
        name: Dataset name (``scifact``, ``irds:cranfield``...).
        split: The qrels split.
        queries: Query id -> text, only the queries that have qrels in ``split`` (as BEIR's loader does).
        qrels: Query id -> {doc id: graded relevance}.
        relevance_level: Lowest grade that binary metrics (MAP, Recall, P, MRR) count as relevant.
    """

    def __init__(
        self,
        name: str,
        split: str,
        queries: dict[str, str],
        qrels: dict[str, dict[str, int]],
        docs: Callable[[], Iterable[Doc]],
        relevance_level: int = 1,
        unknown_queries: Problem | None = None,
    ):
        self.name = name
        self.split = split
        self.queries = queries
        self.qrels = qrels
        self.relevance_level = relevance_level
        self._docs = docs
        self._unknown_queries = unknown_queries or Problem("qrels query ids not in the queries")

    def __repr__(self) -> str:
        return f"RetrievalDataset({self.name!r}, split={self.split!r}, queries={len(self.queries)})"

    def iter_docs(self) -> Iterator[Doc]:
        """Stream the corpus one document at a time, in file order."""
        yield from self._docs()

    def iter_corpus(self, batch_size: int = 10_000) -> Iterator[list[Doc]]:
        """Stream the corpus in lists of at most ``batch_size`` documents."""
        batch: list[Doc] = []
        for doc in self.iter_docs():
            batch.append(doc)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def corpus(self) -> dict[str, dict[str, str]]:
        """The whole corpus in BEIR's in-memory form: doc id -> ``{"title", "text"}`` (small corpora only)."""
        return {doc.id: {"title": doc.title, "text": doc.text} for doc in self.iter_docs()}

    @cached_property
    def scan(self) -> CorpusScan:
        """One pass over the corpus: size, content fingerprint, empty and duplicate documents, qrel docs seen."""
        digest = hashlib.blake2b(digest_size=16)
        wanted = {doc_id for rels in self.qrels.values() for doc_id in rels}
        empty, duplicates = Problem("documents with empty title and text"), Problem("duplicate document ids")
        seen: set[str] = set()
        found: set[str] = set()
        size = 0
        for doc in self.iter_docs():
            size += 1
            for part in (doc.id, doc.title, doc.text):
                digest.update(part.encode("utf-8", "surrogatepass") + b"\x00")
            if not doc.full_text:
                empty.add(doc.id)
            if doc.id in wanted:
                found.add(doc.id)
            if size <= 1_000_000 and doc.id in seen:  # bounded memory: duplicates are checked in the first 1M only
                duplicates.add(doc.id)
            elif size <= 1_000_000:
                seen.add(doc.id)
        return CorpusScan(size, digest.hexdigest(), empty, duplicates, found)

    @property
    def corpus_size(self) -> int:
        """Number of documents (one streaming pass, cached)."""
        return self.scan.size

    @property
    def fingerprint(self) -> str:
        """Content hash of the corpus (ids, titles, texts in order); keys the embedding cache."""
        return self.scan.fingerprint

    def validate(self) -> list[str]:
        """Problems worth a warning: qrels pointing at unknown query/doc ids, empty or duplicate documents.

        Returns:
            One human-readable line per problem found, each with a count and examples; empty when all is well.
        """
        scan = self.scan
        unknown_docs = Problem("qrels doc ids not in the corpus")
        for qid, rels in self.qrels.items():
            for doc_id in rels:
                if doc_id not in scan.qrel_docs_found:
                    unknown_docs.add(f"{qid}/{doc_id}")
        problems = (self._unknown_queries, unknown_docs, scan.empty_docs, scan.duplicate_ids)
        return [f"{self.name}: {problem}" for problem in problems if problem.count]


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data folder: ``explicit``, else ``$SBMOE_DATA``, else ``../shared/data`` from cwd, else from the repo."""
    if explicit is not None:
        return Path(explicit).expanduser()
    if os.environ.get("SBMOE_DATA"):
        return Path(os.environ["SBMOE_DATA"]).expanduser()
    for base in (Path.cwd(), REPO_ROOT):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return REPO_ROOT.parent / "shared" / "data"


def load_dataset(spec: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> RetrievalDataset:
    """Load a BEIR folder or an ir-datasets id into a :class:`RetrievalDataset`.

    Args:
        spec: A BEIR folder name under the data folder (``scifact``), a folder path, either of these with a
            ``:split`` suffix (``scifact:train``), or ``irds:<id>`` (``irds:cranfield``).
        split: The qrels split (``qrels/<split>.tsv``) of a BEIR folder; ignored for ``irds:`` ids.
        data_dir: Where BEIR folder names are looked up (default: :func:`data_dir`).

    Raises:
        DataError: missing folder or file, or a malformed line (named by file and line number).
    """
    if spec.startswith(IRDS_PREFIX):
        from sbmoe.irds import load_irds

        return load_irds(spec[len(IRDS_PREFIX) :], data_dir=globals()["data_dir"](data_dir))
    name, _, suffix = spec.rpartition(":")
    if name and suffix and "/" not in suffix and not Path(spec).exists():
        spec, split = name, suffix
    folder = _beir_folder(spec, data_dir)
    return load_beir(folder, split)


def _beir_folder(spec: str, explicit_dir: str | os.PathLike | None) -> Path:
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    root = data_dir(explicit_dir)
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
    all_queries = {record["_id"]: record["text"] for record in _read_jsonl(queries_file, ("text",))}
    queries, unknown = _select_queries(qrels, all_queries)
    return RetrievalDataset(
        folder.name,
        split,
        queries,
        qrels,
        docs=lambda: (Doc(r["_id"], r["title"], r["text"]) for r in _read_jsonl(corpus_file, ("title", "text"))),
        unknown_queries=unknown,
    )


def _select_queries(qrels: dict[str, dict[str, int]], queries: dict[str, str]) -> tuple[dict[str, str], Problem]:
    """Queries that have qrels, in qrels order, and the qrels query ids that have no query text."""
    unknown = Problem("qrels query ids not in the queries")
    selected = {}
    for qid in qrels:
        if qid in queries:
            selected[qid] = queries[qid]
        else:
            unknown.add(qid)
    return selected, unknown


def _read_jsonl(path: Path, text_fields: tuple[str, ...]) -> Iterator[dict[str, str]]:
    """Yield ``{"_id", *text_fields}`` records; missing or null text fields read as ""; blank lines are skipped."""
    expected = f'expected one JSON object per line with "_id" and {", ".join(repr(f) for f in text_fields)}'
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: invalid JSON ({err.msg}, column {err.colno}); {expected}") from err
            if not isinstance(record, dict) or record.get("_id") in (None, ""):
                raise DataError(f'{path}:{line_no}: missing "_id"; {expected}')
            out = {"_id": str(record["_id"])}
            for name in text_fields:
                value = record.get(name)
                if value is not None and not isinstance(value, str):
                    raise DataError(f"{path}:{line_no}: {name!r} is {type(value).__name__}, expected a string")
                out[name] = value or ""
            yield out


def read_qrels_tsv(path: Path) -> dict[str, dict[str, int]]:
    """Read ``query-id<TAB>corpus-id<TAB>score`` rows (the header line is optional)."""
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        for line_no, row in enumerate(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if not row or (line_no == 1 and row[0] == "query-id"):
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
