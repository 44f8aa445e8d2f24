"""A folder's checksum manifest: what was written (sizes, SHA-256, versions), checked file by file on load."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path, PurePosixPath
from typing import Any

import faiss

from sbmoe.errors import IndexLoadError
from sbmoe.files import sha256_file

FORMAT = 2
MANIFEST = "manifest.json"
REBUILD = "rebuild it (sbmoe index --rebuild, or DenseIndex.save)"


def sbmoe_version() -> str:
    """The installed sbmoe's version (recorded in manifests), or ``unknown`` for a source tree never installed."""
    try:
        return importlib.metadata.version("sbmoe")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def file_entries(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative posix path: {bytes, sha256}}`` of every file under ``folder`` except its manifest."""
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f != folder / MANIFEST)
    return {f.relative_to(folder).as_posix(): {"bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in files}


def write_manifest(folder: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Write ``folder/manifest.json``: ``fields``, the format, sbmoe and faiss versions and every file's checksum."""
    manifest = {"format": FORMAT, **fields, "sbmoe_version": sbmoe_version(), "faiss_version": faiss.__version__}
    manifest["files"] = file_entries(folder)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


def read_manifest(folder: Path, keys: set[str], written_by: str = "DenseIndex.save") -> dict[str, Any]:
    """``folder/manifest.json`` with at least ``keys`` (and ``format``, ``files``), or IndexLoadError saying why."""
    file = folder / MANIFEST
    if not file.is_file():
        what = "folder not found" if not folder.exists() else f"no {MANIFEST}"
        raise IndexLoadError(f"{file}: {what}; expected an index folder written by {written_by}")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise IndexLoadError(
            f"{file}:{err.lineno}: invalid JSON ({err.msg}); the manifest is corrupt: {REBUILD}"
        ) from err
    except UnicodeDecodeError as err:
        raise IndexLoadError(f"{file}: not UTF-8 text; the manifest is corrupt: {REBUILD}") from err
    keys = keys | {"format", "files"}
    if not isinstance(manifest, dict) or keys - manifest.keys():
        missing = sorted(keys - manifest.keys()) if isinstance(manifest, dict) else sorted(keys)
        raise IndexLoadError(f"{file}: missing keys {missing}; the manifest is corrupt: {REBUILD}")
    if manifest["format"] != FORMAT:
        raise IndexLoadError(f"{file}: format {manifest['format']}, this sbmoe reads format {FORMAT}: {REBUILD}")
    if not isinstance(manifest["files"], dict):
        raise IndexLoadError(f"{file}: 'files' is no object; the manifest is corrupt: {REBUILD}")
    return manifest


def manifest_field(folder: Path, key: str) -> Any:
    """``key`` of ``folder/manifest.json`` as it is now, or None when the file cannot be read (a writer's swap)."""
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def inside(folder: Path, name: str) -> Path:
    """``folder / name`` for a relative path that stays inside ``folder``; IndexLoadError for any other name."""
    parts = PurePosixPath(name).parts
    if not name or PurePosixPath(name).is_absolute() or "\\" in name or ".." in parts or ":" in name:
        raise IndexLoadError(f"{folder / MANIFEST}: file {name!r} lies outside the folder; the manifest is refused")
    return folder / name


def check_files(folder: Path, manifest: dict[str, Any], verify: bool) -> None:
    """Every file the manifest lists: inside ``folder``, present, of its size and (``verify``) its SHA-256."""
    for name, info in manifest["files"].items():
        file = inside(folder, name)
        if not isinstance(info, dict) or not {"bytes", "sha256"} <= info.keys():
            raise IndexLoadError(f"{folder / MANIFEST}: entry {name!r} has no bytes/sha256; the manifest is corrupt")
        if not file.is_file():
            raise IndexLoadError(f"{file}: missing (listed in {MANIFEST}): {REBUILD}")
        size = file.stat().st_size
        if size != info["bytes"]:
            said = info["bytes"]
            raise IndexLoadError(f"{file}: truncated or altered: {size} bytes, {MANIFEST} says {said}: {REBUILD}")
        if verify and sha256_file(file) != info["sha256"]:
            raise IndexLoadError(f"{file}: corrupt: SHA-256 differs from {MANIFEST}: {REBUILD}")
