"""A stack of L MoE layers on the pooled embedding, with ReXMoE expert reuse, PSR and pre-gating between layers.

Layer l computes ``x_{l+1} = x_l + MoE_l(x_l)`` with token-routed experts (:class:`~sbmoe.heads.moe_block.MoEBlock`,
ReLU experts of ``expert_hidden`` units, top-k gates renormalised); the head returns
``x_0 + strength * scale * (x_L - x_0)`` (``scale`` the ReZero scalar with ``identity_init``, else 1), normalised
when asked. It trains on cached pooled vectors like the SB-MoE head, whose options it takes and whose saving and
loading (:class:`~sbmoe.heads.base.PooledHead`) it shares.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sbmoe.heads.base import PooledHead
from sbmoe.heads.moe_block import MoEBlock, link_blocks, set_psr
from sbmoe.heads.routing import PSR_SCHEDULES
from sbmoe.heads.usage import top_candidate

SHARED_OPTIONS: dict[str, Any] = {
    "num_experts": 6,
    "top_k": 2,
    "expert_hidden": None,
    "noise": True,
    "normalize_output": False,
    "identity_init": False,
    "query_only": False,
    "strength": 1.0,
}  # the SB-MoE head's options the stack takes, with the same defaults
FIXED_OPTIONS = ("routing", "inference", "residual", "expert_dropout")  # SB-MoE options a stack does not vary


class StackedMoEHead(PooledHead):
    """``head_layers`` MoE layers after pooling.

    Args:
        in_features: Embedding size H of the backbone's pooled output.
        head_layers: L, the layers of the stack.
        reuse_group: r, layers per ReXMoE group (each layer's router scores the r * N experts of its group).
        psr: Progressive scaling routing while training: ``none``, ``linear`` or ``step``.
        pregate: Layer l's router input is layer l-1's input (the first layer gates itself).
        **kwargs: :class:`~sbmoe.heads.sbmoe_head.SBMoEHead` options (``num_experts`` N per layer, ``top_k``,
            ``expert_hidden``, ``noise``, ``normalize_output``, ``identity_init``, ``query_only``, ``strength``).
            The stack always routes ``learned`` with ``topk`` inference, adds its input back and hides no
            experts, so the SB-MoE head's ``routing``, ``inference``, ``residual`` and ``expert_dropout`` are
            accepted (one option set builds either head) and ignored.

    Raises:
        TypeError: an option neither head takes.
        ValueError: an invalid option value.
    """

    routing = "learned"
    inference = "topk"
    residual = True
    config_keys: list[str] = ["in_features", *SHARED_OPTIONS, "head_layers", "reuse_group", "psr", "pregate"]

    def __init__(
        self,
        in_features: int,
        head_layers: int = 2,
        reuse_group: int = 1,
        psr: str = "none",
        pregate: bool = False,
        **kwargs: Any,
    ):
        super().__init__()
        unknown = kwargs.keys() - SHARED_OPTIONS.keys() - set(FIXED_OPTIONS)
        if unknown:
            raise TypeError(f"StackedMoEHead got unexpected options {sorted(unknown)}")
        options = {**SHARED_OPTIONS, **{k: v for k, v in kwargs.items() if k in SHARED_OPTIONS}}
        if psr not in PSR_SCHEDULES:
            raise ValueError(f"unknown PSR schedule {psr!r}; expected one of {PSR_SCHEDULES}")
        if options["strength"] < 0:
            raise ValueError(f"strength must be >= 0, got {options['strength']}")
        if in_features < 2:
            raise ValueError(f"in_features must be >= 2, got {in_features}")
        self.in_features = in_features
        self.num_experts, self.top_k = options["num_experts"], options["top_k"]
        self.expert_hidden = options["expert_hidden"] or in_features // 2
        self.noise, self.normalize_output = options["noise"], options["normalize_output"]
        self.identity_init, self.query_only = options["identity_init"], options["query_only"]
        self.strength = float(options["strength"])
        self.expert_scale = nn.Parameter(torch.zeros(())) if self.identity_init else None
        self.head_layers, self.reuse_group, self.psr, self.pregate = head_layers, reuse_group, psr, pregate
        self.layers = nn.ModuleList(
            MoEBlock(in_features, self.expert_hidden, self.num_experts, self.top_k, "relu", 1, self.noise)
            for _ in range(head_layers)
        )
        link_blocks(list(self.layers), reuse_group, pregate)
        set_psr(self, psr)
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
