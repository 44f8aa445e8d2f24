"""sbmoe: dense retrieval with Mixture-of-Experts (SB-MoE) heads on sentence-transformers, faiss and BEIR.

The public names below load on first use, so ``sbmoe search`` and ``import sbmoe`` start quickly.
"""

import importlib

_LAZY = {
    "HUB_IDS": "sbmoe.backbones",
    "BackboneUnavailableError": "sbmoe.backbones",
    "resolve_backbone": "sbmoe.backbones",
    "HeadConfig": "sbmoe.heads",
    "MoELayersConfig": "sbmoe.heads",
    "SBMoEHead": "sbmoe.heads",
    "load_balancing_loss": "sbmoe.heads",
    "StackedMoEHead": "sbmoe.heads.stacked",
    "MoETransformer": "sbmoe.heads.upcycle",
    "upcycle_encoder": "sbmoe.heads.upcycle",
    "SBMoEModel": "sbmoe.model",
    "build_model": "sbmoe.model",
    "find_head": "sbmoe.model",
    "load_model": "sbmoe.model",
    "load_any_model": "sbmoe.model",
    "DataError": "sbmoe.data",
    "Doc": "sbmoe.data",
    "RetrievalDataset": "sbmoe.data",
    "load_dataset": "sbmoe.data",
    "load_corpus": "sbmoe.data",
    "unseen_dev_split": "sbmoe.data",
    "TrainSet": "sbmoe.data",
    "load_train_set": "sbmoe.data",
    "Encoder": "sbmoe.retrieval",
    "DenseIndex": "sbmoe.retrieval",
    "IndexLoadError": "sbmoe.retrieval",
    "DocStore": "sbmoe.retrieval",
    "Hit": "sbmoe.retrieval",
    "Retriever": "sbmoe.retrieval",
    "evaluate_model": "sbmoe.evaluation",
    "evaluate_embeddings": "sbmoe.evaluation",
    "evaluate_run": "sbmoe.evaluation",
    "per_query": "sbmoe.evaluation",
    "FinetuneArguments": "sbmoe.training",
    "MoEContrastiveLoss": "sbmoe.training",
    "TrainingDivergedError": "sbmoe.training",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    """The names in ``_LAZY``, imported from their module on first access."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sbmoe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
