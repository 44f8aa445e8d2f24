"""Training: fine-tune a head alone on cached pooled vectors, or the backbone with it (SentenceTransformerTrainer)."""

from sbmoe.training.arguments import FinetuneArguments
from sbmoe.training.losses import MoEContrastiveLoss, TrainingDivergedError
from sbmoe.training.runner import run

__all__ = ["FinetuneArguments", "MoEContrastiveLoss", "TrainingDivergedError", "run"]
