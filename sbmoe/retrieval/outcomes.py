"""What a :class:`~sbmoe.retrieval.retriever.Retriever` hands back: search hits and the changes an update made."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Hit:
    """One search result: the document's id, score, title and text, and its expert (None without a head)."""

    id: str
    score: float
    title: str
    text: str
    expert: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The hit as a JSON-ready dict."""
        return asdict(self)


@dataclass
class Changes:
    """What an update did: documents added (new ids), updated (new text) and removed."""

    added: int = 0
    updated: int = 0
    removed: int = 0

    def __bool__(self) -> bool:
        return bool(self.added or self.updated or self.removed)

    def __str__(self) -> str:
        return f"added {self.added}, updated {self.updated}, removed {self.removed}"
