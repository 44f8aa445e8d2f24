"""Training: fine-tune a head alone on cached pooled vectors, or the backbone with it (SentenceTransformerTrainer)."""

from sbmoe.training.arguments import FinetuneArguments
from sbmoe.training.finetune import run
from sbmoe.training.losses import MoEContrastiveLoss, TrainingDivergedError

__all__ = ["FinetuneArguments", "MoEContrastiveLoss", "TrainingDivergedError", "run"]
