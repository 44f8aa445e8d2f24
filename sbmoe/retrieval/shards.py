"""Embedding shards on disk: fixed-size pieces of a corpus's vectors, written one at a time, resumable.

A shard folder holds ``NNNNN.npy`` (the vectors, float32) and ``NNNNN.parquet`` (``id``, ``title``, ``text``,
``expert`` per row, in the same order) for each shard, and ``manifest.json``, which lists the shards written so
far. Every file is written atomically and the manifest last, so a killed writer leaves only whole shards listed:
reopening the folder resumes after them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sbmoe.data.dataset import DataError, Doc
from sbmoe.files import atomic_file, write_atomic

FORMAT = 1
MANIFEST = "manifest.json"


@dataclass
class Shard:
    """One written shard: its number, the corpus row it starts at and its row count."""

    number: int
    start: int
    count: int

    @property
    def name(self) -> str:
        """The shard's file stem (``00000``)."""
        return f"{self.number:05d}"


class ShardSet:
    """A folder of embedding shards: append rows, they are cut into shards of ``shard_size`` and written.

    Args:
        folder: The shard folder (created if absent; an existing one is reopened to resume).
        dim: Vector dimension.
        shard_size: Rows per shard (the last may hold fewer).
        model_hash: Fingerprint of the model that encodes; an existing folder made by another model, or with
            another dimension or shard size, is refused.

    Raises:
        DataError: the folder holds shards of another model, dimension or shard size.
    """

    def __init__(self, folder: str | os.PathLike, dim: int, shard_size: int, model_hash: str = ""):
        if shard_size < 1:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.folder = Path(folder)
        self.dim, self.shard_size, self.model_hash = dim, shard_size, model_hash
        self.shards: list[Shard] = []
        self.complete = False
        self._buffer: list[tuple[np.ndarray, list[Doc], np.ndarray | None]] = []
        self._buffered = 0
        self._written_ids: list[str] | None = None  # read once by check_written
        if (self.folder / MANIFEST).is_file():
            self._resume()
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write_manifest()

    @classmethod
    def open(cls, folder: str | os.PathLike) -> ShardSet:
        """An existing shard folder, with the settings its manifest records."""
        manifest = _read_manifest(Path(folder))
        return cls(folder, manifest["dim"], manifest["shard_size"], manifest["model_hash"])

    def __len__(self) -> int:
        """Rows in the written shards (buffered rows not counted)."""
        return sum(shard.count for shard in self.shards)

    def __repr__(self) -> str:
        return f"ShardSet({str(self.folder)!r}, shards={len(self.shards)}, rows={len(self)}, complete={self.complete})"

    def _resume(self) -> None:
        manifest = _read_manifest(self.folder)
        found = (manifest["dim"], manifest["shard_size"], manifest["model_hash"])
        if found != (self.dim, self.shard_size, self.model_hash):
            raise DataError(
                f"{self.folder}: shards of dim {found[0]}, shard size {found[1]}, model {found[2][:12] or 'none'}; "
                f"this run wants dim {self.dim}, shard size {self.shard_size}, model {self.model_hash[:12] or 'none'}"
                ": remove the folder or pass another one"
            )
        self.shards = [Shard(**shard) for shard in manifest["shards"]]
        self.complete = manifest["complete"]
        for shard in self.shards:
            vectors = self.vectors(shard)
            if vectors.shape != (shard.count, self.dim):
                raise DataError(f"{self.folder}/{shard.name}.npy: shape {vectors.shape}, manifest says {shard.count}")

    def _write_manifest(self) -> None:
        manifest = {
            "format": FORMAT,
            "dim": self.dim,
            "shard_size": self.shard_size,
            "model_hash": self.model_hash,
            "count": len(self),
            "complete": self.complete,
            "shards": [vars(shard) for shard in self.shards],
        }
        write_atomic(self.folder / MANIFEST, json.dumps(manifest, indent=1))

    def append(self, vectors: np.ndarray, docs: Sequence[Doc], experts: np.ndarray | None = None) -> None:
        """Add rows (in corpus order); every full shard's worth is written at once."""
        if len(vectors) != len(docs) or (experts is not None and len(experts) != len(docs)):
            raise ValueError(f"{len(vectors)} vectors, {len(docs)} documents and experts of another length")
        if self.complete:
            raise ValueError(f"{self.folder}: the shard set is complete; nothing more can be appended")
        self._buffer.append((np.asarray(vectors, dtype=np.float32), list(docs), experts))
        self._buffered += len(docs)
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size)

    def finish(self) -> ShardSet:
        """Write the last (partial) shard and mark the set complete."""
        if self._buffered:
            self._flush(self._buffered)
        self.complete = True
        self._write_manifest()
        return self

    def _flush(self, rows: int) -> None:
        """Write the first ``rows`` buffered rows as the next shard, then list it in the manifest."""
        vectors = np.concatenate([part[0] for part in self._buffer])
        docs = [doc for part in self._buffer for doc in part[1]]
        has_experts = all(part[2] is not None for part in self._buffer)
        experts = np.concatenate([part[2] for part in self._buffer]) if has_experts else None
        shard = Shard(len(self.shards), len(self), rows)
        with atomic_file(self.folder / f"{shard.name}.npy") as tmp, tmp.open("wb") as handle:
            np.save(handle, vectors[:rows])
        expert = pa.nulls(rows, pa.int64()) if experts is None else pa.array(experts[:rows], type=pa.int64())
        columns = {"id": [d.id for d in docs[:rows]], "title": [d.title for d in docs[:rows]]}
        table = pa.table({**columns, "text": [d.text for d in docs[:rows]], "expert": expert})
        with atomic_file(self.folder / f"{shard.name}.parquet") as tmp:
            pq.write_table(table, tmp)
        self.shards.append(shard)
        self._written_ids = None
        self._write_manifest()
        rest = (vectors[rows:], docs[rows:], None if experts is None else experts[rows:])
        self._buffer = [rest] if len(rest[1]) else []
        self._buffered = len(rest[1])

    def vectors(self, shard: Shard) -> np.ndarray:
        """A shard's vectors, memory-mapped read-only."""
        return np.load(self.folder / f"{shard.name}.npy", mmap_mode="r")

    def rows(self, shard: Shard) -> dict[str, list[Any]]:
        """A shard's ``id``, ``title``, ``text`` and ``expert`` columns."""
        return pq.read_table(self.folder / f"{shard.name}.parquet").to_pydict()

    def ids(self, shard: Shard) -> list[str]:
        """A shard's document ids."""
        return pq.read_table(self.folder / f"{shard.name}.parquet", columns=["id"]).column("id").to_pylist()

    def check_written(self, ids: Sequence[str], start: int) -> None:
        """Check that a resumed run's corpus rows ``start, start+1, ...`` have the ids the shards hold there.

        Raises:
            DataError: they differ: the shards were written from another corpus.
        """
        if self._written_ids is None:
            self._written_ids = [doc_id for shard in self.shards for doc_id in self.ids(shard)]
        if list(ids) != self._written_ids[start : start + len(ids)]:
            raise DataError(
                f"{self.folder}: rows {start}-{start + len(ids) - 1} of the corpus hold other ids than these shards: "
                "they were written from another corpus; remove the shard folder or pass another one"
            )

    def iter_vectors(self) -> Iterator[tuple[Shard, np.ndarray]]:
        """Each written shard with its memory-mapped vectors, in order."""
        for shard in self.shards:
            yield shard, self.vectors(shard)

    def sample(self, size: int, seed: int = 0) -> np.ndarray:
        """``size`` rows (or all) drawn uniformly without replacement over all shards, read shard by shard."""
        total = len(self)
        rows = np.sort(np.random.default_rng(seed).choice(total, size=min(size, total), replace=False))
        parts = []
        for shard, vectors in self.iter_vectors():
            mine = rows[(rows >= shard.start) & (rows < shard.start + shard.count)] - shard.start
            parts.append(np.asarray(vectors[mine]))
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), dtype=np.float32)


def _read_manifest(folder: Path) -> dict[str, Any]:
    file = folder / MANIFEST
    if not file.is_file():
        raise DataError(f"{file}: not found; expected a shard folder written by sbmoe")
    manifest = json.loads(file.read_text())
    if manifest.get("format") != FORMAT:
        raise DataError(f"{file}: format {manifest.get('format')}, this sbmoe reads format {FORMAT}")
    return manifest
