"""Reading user text files line by line: UTF-8 (a byte-order mark is accepted), errors named by file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sbmoe.data.dataset import DataError

BOM = b"\xef\xbb\xbf"
JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, text)`` of a UTF-8 file, line ends stripped; a leading byte-order mark is dropped.

    Raises:
        DataError: a line that is not valid UTF-8, with its line and column and the offending bytes.
    """
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if line_no == 1 and raw.startswith(BOM):
                raw = raw[len(BOM) :]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                column = len(raw[: err.start].decode("utf-8", "replace")) + 1
                raise DataError(
                    f"{path}:{line_no}: invalid UTF-8 at column {column} (bytes {raw[err.start : err.end]!r}); "
                    "expected a UTF-8 text file (re-encode it, e.g. iconv -f latin1 -t utf-8)"
                ) from err
            yield line_no, text.rstrip("\r\n")


def json_lines(path: Path, expected: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` of a JSON-lines file; blank lines are skipped.

    Args:
        path: The file.
        expected: What a line should hold, appended to error messages.

    Raises:
        DataError: invalid UTF-8 or JSON (with line and column), a JSON array instead of JSON lines, or a line that
            is not an object.
    """
    for line_no, line in numbered_lines(path):
        if not line.strip():
            continue
        if line_no == 1 and line.lstrip().startswith("["):
            raise DataError(
                f"{path}:1: the file holds a JSON array, expected JSON lines (one object per line); "
                f"convert it with: jq -c '.[]' {path.name} > fixed.jsonl"
            )
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line_no}: invalid JSON at column {err.colno} ({err.msg}); {expected}") from err
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line_no}: a JSON {JSON_TYPES.get(type(record), 'value')}, {expected}")
        yield line_no, record
