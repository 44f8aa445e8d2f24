"""Document and query ids that every file sbmoe writes can hold: no line break, control character or whitespace."""

from __future__ import annotations

import unicodedata

from sbmoe.errors import DataError

ID_RULE = "ids must hold no whitespace, line break or control character (TREC run files split on them)"


def id_problem(doc_id: str) -> str | None:
    """What makes ``doc_id`` unusable (``str.splitlines`` would split it, TREC runs would split it), or None."""
    if not doc_id:
        return "is empty"
    for char in doc_id:
        if len(f"a{char}b".splitlines()) > 1 or unicodedata.category(char) == "Cc":
            return f"holds the line break or control character {char!r}"
        if char.isspace():
            return f"holds the whitespace {char!r}"
    return None


def check_id(doc_id: str, where: str) -> str:
    """``doc_id`` unchanged, or DataError naming ``where`` (``file:line``), the id and the fix."""
    problem = id_problem(doc_id)
    if problem is not None:
        raise DataError(f"{where}: id {doc_id!r} {problem}; {ID_RULE}: rename it in the file")
    return doc_id
