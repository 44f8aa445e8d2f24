"""sbmoe: dense retrieval with Mixture-of-Experts (SB-MoE) heads on sentence-transformers."""

from sbmoe.backbones import HUB_IDS, BackboneUnavailableError, resolve_backbone
from sbmoe.cache import encode_cached
from sbmoe.data import DataError, Doc, RetrievalDataset, load_dataset
from sbmoe.head import SBMoEHead, load_balancing_loss
from sbmoe.index import DenseIndex, IndexLoadError
from sbmoe.losses import MoEContrastiveLoss, TrainingDivergedError
from sbmoe.metrics import evaluate_run, per_query
from sbmoe.model import SBMoEModel, build_model, find_head, load_model
from sbmoe.splits import unseen_dev_split
from sbmoe.trainset import TrainSet, load_train_set

# Loaded on first use, so ``python -m sbmoe.evaluate`` / ``python -m sbmoe.finetune`` run without runpy's warning.
_LAZY = {
    "evaluate_model": "sbmoe.evaluate",
    "evaluate_embeddings": "sbmoe.evaluate",
    "FinetuneArguments": "sbmoe.finetune",
}

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
    "DenseIndex",
    "IndexLoadError",
    "evaluate_run",
    "per_query",
    "MoEContrastiveLoss",
    "TrainingDivergedError",
    "unseen_dev_split",
    "TrainSet",
    "load_train_set",
    *_LAZY,
]


def __getattr__(name: str):
    """The names in ``_LAZY``, imported from their module on first access."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sbmoe' has no attribute {name!r}")
