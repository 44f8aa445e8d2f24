"""sbmoe's own error types: what a user can cause and fix. Commands catch these (one line, exit 1); anything else
is a bug, and the ``sbmoe`` command says so."""

from __future__ import annotations


class SbmoeError(Exception):
    """A failure the user can fix; the message names the file, line or id and what to do."""


class DataError(SbmoeError, ValueError):
    """Missing or malformed retrieval data; the message names the file (and line) and what was expected."""


class IndexLoadError(SbmoeError, ValueError):
    """An index folder that cannot be used: missing, truncated or corrupt file, or a manifest mismatch."""


class IndexBusyError(SbmoeError):
    """Another process is writing the same index folder."""


class MissingExtraError(SbmoeError, ImportError):
    """An optional dependency a chosen feature needs is not installed; the message names the extra to install."""


class SetupError(SbmoeError, RuntimeError):
    """The machine cannot do what was asked (e.g. ``use_gpu=True`` without a GPU build of faiss)."""


class ModelLoadError(SbmoeError, ValueError):
    """A model folder that sbmoe refuses to load: a class outside sentence-transformers and sbmoe, or a pickle."""
