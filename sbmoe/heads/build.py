"""A head module from a :class:`~sbmoe.heads.config.HeadConfig`: the config resolved for the embedding size, then
the SB-MoE head or the stacked head it describes."""

from __future__ import annotations

from dataclasses import replace

import torch

from sbmoe.heads.base import PooledHead
from sbmoe.heads.config import HeadConfig
from sbmoe.heads.sbmoe_head import SBMoEHead
from sbmoe.heads.stacked import StackedMoEHead


def resolve_head(dim: int, config: HeadConfig) -> HeadConfig:
    """``config`` as the head module holds it: identity init only for learned, query-only and dense heads, a dense
    head as one expert (of :func:`dense_hidden` units for ``dense_size`` ``total``), a stacked head's fixed
    ``topk`` inference, residual and no expert dropout, and the expert width filled in. Resolving a resolved config
    changes nothing."""
    identity = config.identity_init and (config.routing == "learned" or config.query_only or config.head == "dense")
    config = replace(config, identity_init=identity)
    if config.head == "dense":
        hidden = dense_hidden(dim, config) if config.dense_size == "total" else config.expert_hidden
        config = replace(config, head="sbmoe", num_experts=1, top_k=1, routing="learned", inference="soft")
        config = replace(config, expert_hidden=hidden, dense_size="expert", expert_dropout=0.0)
    if config.head_layers:  # what a stack always does (see StackedMoEHead)
        config = replace(config, inference="topk", residual=True, expert_dropout=0.0)
    return replace(config, expert_hidden=config.expert_hidden or dim // 2)


def build_head(dim: int, config: HeadConfig, normalize_output: bool) -> PooledHead | None:
    """The head ``config`` describes on ``dim``-wide pooled vectors (None for ``head`` ``none``)."""
    if config.head == "none":
        return None
    resolved = resolve_head(dim, config)
    if resolved.head_layers:
        return StackedMoEHead(dim, resolved, normalize_output=normalize_output)
    return SBMoEHead(dim, resolved, normalize_output=normalize_output)


def dense_hidden(dim: int, config: HeadConfig) -> int:
    """Hidden width of a one-expert head with as many parameters as the SB-MoE head of ``config``."""
    width = config.expert_hidden
    moe = SBMoEHead(dim, HeadConfig(num_experts=config.num_experts, top_k=1, expert_hidden=width, noise=config.noise))
    one = SBMoEHead(dim, HeadConfig(num_experts=1, top_k=1, expert_hidden=1, noise=config.noise))
    per_unit = 2 * dim + 1  # one hidden unit: a row of `up`, its bias, a column of `down`
    fixed = count_parameters(one) - per_unit
    return max(1, round((count_parameters(moe) - fixed) / per_unit))


def count_parameters(module: torch.nn.Module | None) -> int:
    """Number of parameters of ``module`` (0 for None)."""
    return 0 if module is None else sum(p.numel() for p in module.parameters())
