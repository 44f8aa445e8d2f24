"""A stack of L MoE layers on the pooled embedding, with ReXMoE expert reuse, PSR and pre-gating between layers.

Layer l computes ``x_{l+1} = x_l + MoE_l(x_l)`` with token-routed experts (:class:`~sbmoe.heads.moe_block.MoEBlock`,
ReLU experts of ``expert_hidden`` units, top-k gates renormalised); the head returns
``x_0 + strength * scale * (x_L - x_0)`` (``scale`` the ReZero scalar with ``identity_init``, else 1), normalised
when asked. It trains on cached pooled vectors like the SB-MoE head, whose configuration it takes and whose saving and
loading (:class:`~sbmoe.heads.base.PooledHead`) it shares.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sbmoe.heads.base import PooledHead
from sbmoe.heads.config import HeadConfig
from sbmoe.heads.moe_block import MoEBlock, link_blocks, set_psr
from sbmoe.heads.usage import top_candidate


class StackedMoEHead(PooledHead):
    """``config.head_layers`` MoE layers after pooling, built from a :class:`~sbmoe.heads.config.HeadConfig`.

    The config's ``head_layers`` is L, the layers of the stack; ``reuse_group`` r, layers per ReXMoE group (each
    layer's router scores the r * N experts of its group); ``psr`` the progressive scaling routing while training;
    ``pregate``: layer l's router input is layer l-1's input (the first layer gates itself). It reads the SB-MoE
    head's ``num_experts`` (N per layer), ``top_k``, ``expert_hidden``, ``noise``, ``identity_init``, ``query_only``
    and ``strength``; the stack always routes ``learned`` with ``topk`` inference, adds its input back and hides no
    experts, whatever the config's ``routing``, ``inference``, ``residual`` and ``expert_dropout`` say.

    Args:
        in_features: Embedding size H of the backbone's pooled output.
        config: The head's options (default: :class:`HeadConfig`'s, with two layers).
        normalize_output: L2-normalise the head's output (for cosine similarity).
    """

    routing = "learned"
    inference = "topk"
    residual = True
    expert_dropout = 0.0
    config_keys: list[str] = [
        *("in_features", "num_experts", "top_k", "expert_hidden", "noise", "normalize_output", "identity_init"),
        *("query_only", "strength", "head_layers", "reuse_group", "psr", "pregate"),
    ]

    def __init__(self, in_features: int, config: HeadConfig | None = None, normalize_output: bool = False):
        super().__init__()
        config = config or HeadConfig(head_layers=2)
        if in_features < 2:
            raise ValueError(f"in_features must be >= 2, got {in_features}")
        self.in_features, self.normalize_output = in_features, normalize_output
        self.num_experts, self.top_k = config.num_experts, config.top_k
        self.expert_hidden = config.expert_hidden or in_features // 2
        self.noise, self.identity_init, self.query_only = config.noise, config.identity_init, config.query_only
        self.strength = float(config.strength)
        self.expert_scale = nn.Parameter(torch.zeros(())) if self.identity_init else None
        self.head_layers, self.reuse_group = config.head_layers, config.reuse_group
        self.psr, self.pregate = config.psr, config.pregate
        self.layers = nn.ModuleList(
            MoEBlock(in_features, self.expert_hidden, self.num_experts, self.top_k, "relu", 1, self.noise)
            for _ in range(self.head_layers)
        )
        link_blocks(list(self.layers), self.reuse_group, self.pregate)
        set_psr(self, self.psr)
        self.aux_loss: Tensor = torch.zeros(())
        self.z_loss: Tensor = torch.zeros(())

    def forward(self, features: dict[str, Tensor | Any], **kwargs) -> dict[str, Tensor | Any]:
        x0 = h = features["sentence_embedding"]
        for layer in self.layers:
            h = h + layer(h)
        first = self.layers[0].last_routing
        if self.query_only and kwargs.get("task", features.get("task")) == "document":
            y = x0
        else:
            scale = self.strength * (self.expert_scale if self.expert_scale is not None else 1.0)
            y = x0 + scale * (h - x0)
        if self.normalize_output:
            y = F.normalize(y, dim=-1)
        self.aux_loss = torch.stack([layer.aux_loss for layer in self.layers]).mean()
        self.z_loss = torch.stack([layer.z_loss for layer in self.layers]).mean()
        features["sentence_embedding"] = y
        features["expert_index"] = first.indices[:, 0]
        features["router_probs"] = first.probs
        features["layer_choices"] = torch.stack([top_candidate(b.last_routing) for b in self.layers], dim=-1)
        return features
