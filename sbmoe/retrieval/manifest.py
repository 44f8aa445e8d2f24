"""An index folder's manifest: what :meth:`DenseIndex.save` wrote, checked file by file on load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sbmoe.files import sha256_file

FORMAT = 1
MANIFEST = "manifest.json"


class IndexLoadError(ValueError):
    """An index folder that cannot be used: missing, truncated or corrupt file, or a manifest mismatch."""


def read_manifest(folder: Path) -> dict[str, Any]:
    file = folder / MANIFEST
    if not file.is_file():
        what = "folder not found" if not folder.exists() else f"no {MANIFEST}"
        raise IndexLoadError(f"{file}: {what}; expected an index folder written by DenseIndex.save")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise IndexLoadError(f"{file}:{err.lineno}: invalid JSON ({err.msg}); the manifest is corrupt") from err
    keys = {"format", "model", "dim", "metric", "type", "params", "count", "files"}
    if not isinstance(manifest, dict) or keys - manifest.keys():
        missing = sorted(keys - manifest.keys()) if isinstance(manifest, dict) else sorted(keys)
        raise IndexLoadError(f"{file}: missing keys {missing}; the manifest is corrupt")
    if manifest["format"] != FORMAT:
        raise IndexLoadError(f"{file}: format {manifest['format']}, this sbmoe reads format {FORMAT}")
    return manifest


def check_file(file: Path, info: dict[str, Any], verify: bool) -> None:
    if not file.is_file():
        raise IndexLoadError(f"{file}: missing (listed in {MANIFEST})")
    size = file.stat().st_size
    if size != info["bytes"]:
        raise IndexLoadError(f"{file}: truncated or altered: {size} bytes, {MANIFEST} says {info['bytes']}")
    if verify and sha256_file(file) != info["sha256"]:
        raise IndexLoadError(f"{file}: corrupt: SHA-256 differs from {MANIFEST}")
