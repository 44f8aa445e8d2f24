"""The document store: ids, titles, texts (and each document's expert) in one SQLite table, read without loading."""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from sbmoe.data.dataset import Doc
from sbmoe.errors import IndexLoadError
from sbmoe.retrieval.manifest import REBUILD

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS docs (id TEXT PRIMARY KEY, title TEXT NOT NULL, text TEXT NOT NULL, expert INTEGER)"
)
LOOKUP_BATCH = 500  # ids per SELECT ... IN (...), under SQLite's parameter limit
TEMP_FILE = "docs.sqlite"


class DocStore:
    """Documents by id in an SQLite file: written once at indexing, looked up per search hit.

    Args:
        path: The SQLite file.
        read_only: Open without write access (a saved retriever's store); :meth:`temporary` copies one to add to.

    Raises:
        IndexLoadError: a read-only store that is missing or no SQLite database with the ``docs`` table.
    """

    def __init__(self, path: str | os.PathLike, read_only: bool = False):
        self.path = Path(path)
        if read_only:
            if not self.path.is_file():
                raise IndexLoadError(f"{self.path}: document store not found: {REBUILD}")
            uri = f"{self.path.resolve().as_uri()}?mode=ro"  # as_uri escapes '#', '?' and '%' in the path
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            try:
                self._db.execute("SELECT id, title, text, expert FROM docs LIMIT 1").fetchall()
            except sqlite3.DatabaseError as err:
                self._db.close()
                raise IndexLoadError(f"{self.path}: not a readable document store ({err}): {REBUILD}") from err
        else:
            self._db = sqlite3.connect(self.path, check_same_thread=False)
            self._db.execute(SCHEMA)
        self.read_only = read_only

    @classmethod
    def temporary(cls, source: DocStore | None = None) -> DocStore:
        """A writable store (a copy of ``source``, or empty) in a new temporary folder, deleted with the object."""
        folder = Path(tempfile.mkdtemp(prefix="sbmoe-store-"))
        store = source.copy_to(folder / TEMP_FILE) if source is not None else cls(folder / TEMP_FILE)
        weakref.finalize(store, _discard, store._db, folder)
        return store

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM docs").fetchone()[0]

    def add(self, docs: Iterable[Doc], experts: Sequence[int] | None = None) -> int:
        """Insert documents (a repeated id keeps its first text); returns how many rows were new."""
        before = len(self)
        rows = (
            (doc.id, doc.title, doc.text, None if experts is None else int(experts[i])) for i, doc in enumerate(docs)
        )
        with self._db:
            self._db.executemany("INSERT OR IGNORE INTO docs VALUES (?, ?, ?, ?)", rows)
        return len(self) - before

    def iter_docs(self) -> Iterator[tuple[Doc, int | None]]:
        """Every ``(Doc, expert)`` in the order they were added."""
        for doc_id, title, text, expert in self._db.execute("SELECT id, title, text, expert FROM docs ORDER BY rowid"):
            yield Doc(doc_id, title, text), expert

    def get(self, ids: Sequence[str]) -> dict[str, tuple[Doc, int | None]]:
        """``{id: (Doc, expert)}`` for the ids present in the store."""
        found: dict[str, tuple[Doc, int | None]] = {}
        for start in range(0, len(ids), LOOKUP_BATCH):
            batch = list(ids[start : start + LOOKUP_BATCH])
            marks = ",".join("?" * len(batch))
            query = f"SELECT id, title, text, expert FROM docs WHERE id IN ({marks})"
            for doc_id, title, text, expert in self._db.execute(query, batch):
                found[doc_id] = (Doc(doc_id, title, text), expert)
        return found

    def missing(self, ids: Sequence[str]) -> list[str]:
        """The ids (in the given order) that are not in the store."""
        present: set[str] = set()
        for start in range(0, len(ids), LOOKUP_BATCH):
            batch = list(ids[start : start + LOOKUP_BATCH])
            marks = ",".join("?" * len(batch))
            present.update(row[0] for row in self._db.execute(f"SELECT id FROM docs WHERE id IN ({marks})", batch))
        return [doc_id for doc_id in ids if doc_id not in present]

    def copy_to(self, path: str | os.PathLike) -> DocStore:
        """A consistent copy of the store at ``path`` (SQLite's backup API), opened for writing."""
        target = sqlite3.connect(path)
        with target:
            self._db.backup(target)
        target.close()
        return DocStore(path)

    def close(self) -> None:
        """Close the connection."""
        self._db.close()


def _discard(db: sqlite3.Connection, folder: Path) -> None:
    """Close a temporary store's connection and delete its folder."""
    db.close()
    shutil.rmtree(folder, ignore_errors=True)
