"""sbmoe: dense retrieval with Mixture-of-Experts (SB-MoE) heads on sentence-transformers."""

from sbmoe.backbones import HUB_IDS, BackboneUnavailableError, resolve_backbone
from sbmoe.head import SBMoEHead, load_balancing_loss
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
]
