"""A stack of L MoE layers on the pooled embedding, with ReXMoE expert reuse, PSR and pre-gating between layers.

Layer l computes ``x_{l+1} = x_l + MoE_l(x_l)`` with token-routed experts (:class:`~sbmoe.heads.moe_block.MoEBlock`,
ReLU experts of ``expert_hidden`` units, top-k gates renormalised); the head returns
``x_0 + strength * scale * (x_L - x_0)`` (``scale`` the ReZero scalar with ``identity_init``, else 1), normalised
when asked. It trains on cached pooled vectors like the SB-MoE head, whose options, saving and loading it shares.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sbmoe.heads.config import HeadConfig
from sbmoe.heads.moe_block import MoEBlock, block_utilization, link_blocks, set_psr
from sbmoe.heads.sbmoe_head import SBMoEHead


class StackedMoEHead(SBMoEHead):
    """``config.head_layers`` MoE layers after pooling.

    The config's ``head_layers`` is L, the layers of the stack; ``reuse_group`` r, layers per ReXMoE group (each
    layer's router scores the r * N experts of its group); ``psr`` the progressive scaling routing while training;
    ``pregate``: layer l's router input is layer l-1's input (the first layer gates itself). Its other options are
    :class:`SBMoEHead`'s (``num_experts`` N per layer, ...); ``routing`` is ``learned`` and ``inference`` ``topk``
    (the training selection), whatever the config says.
    """

    config_keys: list[str] = [*SBMoEHead.config_keys, "head_layers", "reuse_group", "psr", "pregate"]

    def __init__(self, in_features: int, config: HeadConfig | None = None, normalize_output: bool = False):
        config = replace(config or HeadConfig(head_layers=2), routing="learned", inference="topk")
        super().__init__(in_features, config, normalize_output)
        del self.experts, self.router
        self.head_layers, self.reuse_group = config.head_layers, config.reuse_group
        self.psr, self.pregate = config.psr, config.pregate
        self.layers = nn.ModuleList(
            MoEBlock(in_features, self.expert_hidden, self.num_experts, self.top_k, "relu", 1, self.noise)
            for _ in range(self.head_layers)
        )
        link_blocks(list(self.layers), self.reuse_group, self.pregate)
        set_psr(self, self.psr)

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
        return features

    def reset_routing_stats(self) -> None:
        for layer in self.layers:
            layer.reset_routing_stats()

    def routing_stats(self) -> dict[str, Any]:
        """Per layer: top-1 shares over the layer's candidates and the share kept on its own experts."""
        return {"layers": [block_utilization(layer) for layer in self.layers]}
