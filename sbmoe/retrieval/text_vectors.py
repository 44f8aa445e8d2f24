"""Each text's vector by the hash of the text, one SQLite file per (kind, model): what lets an update encode only
new and changed documents, and a killed encoding resume where it stopped (rows are committed chunk by chunk).

Every row carries a checksum of its vector; a row that fails it is treated as absent and encoded again.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SCHEMA = "CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY, vector BLOB NOT NULL, checksum BLOB NOT NULL)"
LOOKUP_BATCH = 500  # keys per SELECT ... IN (...), under SQLite's parameter limit
BUSY_SECONDS = 120  # how long a writer waits for another process's transaction


def text_key(text: str) -> bytes:
    """The 16-byte BLAKE2b of a text: its row key."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _checksum(vector: bytes) -> bytes:
    return hashlib.blake2b(vector, digest_size=8).digest()


class TextVectors:
    """Float32 vectors of one dimension keyed by :func:`text_key`, in the SQLite file ``path``.

    Args:
        path: The file (created with its folder if absent).
        dim: The vectors' dimension; rows of another size are treated as absent.
    """

    def __init__(self, path: str | Path, dim: int):
        self.path, self.dim = Path(path), dim
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=BUSY_SECONDS)
        with self._db:
            self._db.execute(SCHEMA)

    def get(self, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        """The stored vectors of ``keys`` whose checksum holds (absent or damaged rows are left out)."""
        found: dict[bytes, np.ndarray] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), LOOKUP_BATCH):
            batch = unique[start : start + LOOKUP_BATCH]
            marks = ",".join("?" * len(batch))
            query = f"SELECT key, vector, checksum FROM vectors WHERE key IN ({marks})"
            for key, vector, checksum in self._db.execute(query, batch):
                if len(vector) == 4 * self.dim and _checksum(vector) == checksum:
                    found[key] = np.frombuffer(vector, dtype=np.float32)
        return found

    def put(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        """Store one chunk of vectors in one transaction (all of it or, if killed, none of it)."""
        rows = []
        for key, vector in zip(keys, np.asarray(vectors, dtype=np.float32), strict=True):
            data = vector.tobytes()
            rows.append((key, data, _checksum(data)))
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?)", rows)

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]

    def close(self) -> None:
        """Close the connection."""
        self._db.close()
