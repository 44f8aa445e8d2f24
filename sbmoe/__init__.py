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

# Fine-tuning (issue 5). ``FinetuneArguments`` loads lazily, so ``python -m sbmoe.finetune`` runs cleanly.
from sbmoe.losses import MoEContrastiveLoss, TrainingDivergedError  # noqa: E402
from sbmoe.splits import unseen_dev_split  # noqa: E402
from sbmoe.trainset import TrainSet, load_train_set  # noqa: E402

__all__ += ["MoEContrastiveLoss", "TrainingDivergedError", "unseen_dev_split", "TrainSet", "load_train_set"]
__all__ += ["FinetuneArguments"]
_harness_getattr = __getattr__


def __getattr__(name: str):  # noqa: F811
    """``FinetuneArguments`` loads lazily too; everything else as above."""
    if name == "FinetuneArguments":
        from sbmoe.finetune import FinetuneArguments

        return FinetuneArguments
    return _harness_getattr(name)
