"""Mixture-of-Experts machinery: routing, expert banks, the SB-MoE head, the stacked head, MoE encoder layers."""

from sbmoe.heads.base import PooledHead
from sbmoe.heads.config import INFERENCE_MODES, ROUTING_MODES, HeadConfig, MoELayersConfig
from sbmoe.heads.experts import ExpertBank, FeedForwardExpert, combine_experts
from sbmoe.heads.routing import PSR_SCHEDULES, Router, load_balancing_loss, psr_open_count, router_z_loss, top_k_gates
from sbmoe.heads.sbmoe_head import Expert, SBMoEHead

__all__ = [
    "INFERENCE_MODES",
    "PSR_SCHEDULES",
    "ROUTING_MODES",
    "Expert",
    "ExpertBank",
    "FeedForwardExpert",
    "HeadConfig",
    "MoELayersConfig",
    "PooledHead",
    "Router",
    "SBMoEHead",
    "combine_experts",
    "load_balancing_loss",
    "psr_open_count",
    "router_z_loss",
    "top_k_gates",
]
