"""sbmoe: dense retrieval with Mixture-of-Experts (SB-MoE) heads on sentence-transformers."""

from sbmoe.backbones import HUB_IDS, BackboneUnavailableError, resolve_backbone
from sbmoe.cache import encode_cached
from sbmoe.data import DataError, Doc, RetrievalDataset, load_dataset
from sbmoe.head import SBMoEHead, load_balancing_loss
from sbmoe.index import DenseIndex, IndexLoadError
from sbmoe.metrics import evaluate_run, per_query
from sbmoe.model import SBMoEModel, build_model, find_head, load_model

__all__ = [
    "HUB_IDS",
    "BackboneUnavailableError",
    "SBMoEHead",
    "SBMoEModel",
    "build_model",
    "find_head",
    "load_balancing_loss",
    "load_model",
    "resolve_backbone",
    "encode_cached",
    "DataError",
    "Doc",
    "RetrievalDataset",
    "load_dataset",
    "evaluate_embeddings",
    "evaluate_model",
    "DenseIndex",
    "IndexLoadError",
    "evaluate_run",
    "per_query",
]


def __getattr__(name: str):
    """``evaluate_model`` / ``evaluate_embeddings`` load lazily, so ``python -m sbmoe.evaluate`` runs cleanly."""
    if name in ("evaluate_model", "evaluate_embeddings"):
        from sbmoe import evaluate

        return getattr(evaluate, name)
    raise AttributeError(f"module 'sbmoe' has no attribute {name!r}")
