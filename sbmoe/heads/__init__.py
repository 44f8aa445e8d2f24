"""Heads on the pooled embedding: the SB-MoE block (router, experts, routing modes, load-balancing loss)."""

from sbmoe.heads.sbmoe_head import INFERENCE_MODES, ROUTING_MODES, Expert, Router, SBMoEHead, load_balancing_loss

__all__ = ["INFERENCE_MODES", "ROUTING_MODES", "Expert", "Router", "SBMoEHead", "load_balancing_loss"]
