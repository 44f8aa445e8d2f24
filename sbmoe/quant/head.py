"""The SB-MoE head whose experts are packed low-bit linears: saved packed, reloaded packed."""

from __future__ import annotations

import copy
from typing import Any

from sbmoe.heads import SBMoEHead
from sbmoe.quant.linear import PackedLinear, quantize_experts, replace_module


class QuantizedSBMoEHead(SBMoEHead):
    """An :class:`SBMoEHead` whose expert linears are :class:`PackedLinear` (the router stays float32).

    Args:
        quant_plan: ``{"linears": {name inside the head: {"bits", "group_size", ...}}, ...}`` (see
            :func:`sbmoe.quant.allocate.make_plan`); it is saved in the head's config, so the head reloads packed.
        **arguments: The :class:`SBMoEHead` arguments.
    """

    config_keys: list[str] = [*SBMoEHead.config_keys, "quant_plan"]

    def __init__(self, quant_plan: dict[str, Any], **arguments: Any):
        super().__init__(**arguments)
        self.quant_plan = quant_plan
        for name, spec in quant_plan["linears"].items():
            linear = self.get_submodule(name)
            packed = PackedLinear(
                linear.in_features, linear.out_features, spec["bits"], spec["group_size"], linear.bias is not None
            )
            replace_module(self, name, packed)

    @classmethod
    def from_head(cls, head: SBMoEHead, plan: dict[str, Any]) -> QuantizedSBMoEHead:
        """``head`` with its expert linears quantized (round to nearest) as ``plan`` says."""
        quantized = cls(plan, in_features=head.in_features, config=head.config, normalize_output=head.normalize_output)
        linears = plan["linears"]
        bits = {name: spec["bits"] for name, spec in linears.items()}
        groups = {name: spec["group_size"] for name, spec in linears.items()}
        quantized.load_state_dict(quantize_experts(copy.deepcopy(head), bits, groups).state_dict())
        return quantized.to(next(head.parameters()).device).train(head.training)
