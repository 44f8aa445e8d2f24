"""Where sbmoe reads data and writes caches: $SBMOE_DATA or ../shared/data, and $SBMOE_CACHE or ~/.cache/sbmoe."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


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


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The cache root: ``explicit``, else ``$SBMOE_CACHE``, else ``$XDG_CACHE_HOME/sbmoe`` or ``~/.cache/sbmoe``.

    Like Hugging Face's cache it lives in the user's cache folder, so every project and working folder shares one
    encoding of each corpus; it is never under the data folder (which may be read-only).
    """
    if explicit is not None:
        return Path(explicit).expanduser()
    if os.environ.get("SBMOE_CACHE"):
        return Path(os.environ["SBMOE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "sbmoe"
