"""The MoE Transformer whose upcycled experts are packed low-bit linears: saved packed, reloaded packed."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from sentence_transformers.sentence_transformer.modules import Transformer

from sbmoe.heads.config import MoELayersConfig
from sbmoe.heads.upcycle import MoETransformer, upcycle_encoder
from sbmoe.quant.linear import PackedLinear, quantize_experts, replace_module
from sbmoe.quiet import quiet_loading


class QuantizedMoETransformer(MoETransformer):
    """A :class:`~sbmoe.heads.upcycle.MoETransformer` whose expert linears are :class:`PackedLinear`.

    Args:
        model_name_or_path: A folder saved by this class.
        moe: The MoE layers (:class:`~sbmoe.heads.config.MoELayersConfig`).
        quant_plan: ``{"linears": {name inside this module: {"bits", "group_size", ...}}, ...}``; it is saved in
            the module's config, so the experts reload packed.
    """

    config_keys: list[str] = [*MoETransformer.config_keys, "quant_plan"]

    def __init__(self, model_name_or_path: str, *, moe: MoELayersConfig, quant_plan: dict[str, Any], **kwargs: Any):
        with quiet_loading(load_report=False):  # the dense architecture's report would list every expert weight
            Transformer.__init__(self, model_name_or_path, **kwargs)  # not MoETransformer's: its load expects floats
        self.moe, self.quant_plan = moe, quant_plan
        upcycle_encoder(self.auto_model, moe)
        for name, spec in quant_plan["linears"].items():
            linear = self.get_submodule(name)
            bias = linear.bias is not None
            packed = PackedLinear(linear.in_features, linear.out_features, spec["bits"], spec["group_size"], bias)
            replace_module(self, name, packed)
        weights = Path(model_name_or_path) / "model.safetensors"
        state = load_file(str(weights), device=str(next(self.auto_model.parameters()).device))
        missing, unexpected = self.auto_model.load_state_dict(state, strict=False)
        if [k for k in missing if ".intermediate." in k] or unexpected:
            raise ValueError(f"{weights} does not match the quantized MoE settings: {missing or unexpected}")

    @classmethod
    def from_transformer(cls, transformer: MoETransformer, plan: dict[str, Any]) -> QuantizedMoETransformer:
        """A new module with ``transformer``'s weights, its expert linears quantized (round to nearest) as ``plan``
        says: ``transformer`` is quantized in place, saved packed and reloaded as this class (on its device)."""
        linears = plan["linears"]
        bits = {name: spec["bits"] for name, spec in linears.items()}
        groups = {name: spec["group_size"] for name, spec in linears.items()}
        quantize_experts(transformer, bits, groups)
        device = next(transformer.auto_model.parameters()).device
        with tempfile.TemporaryDirectory() as folder:
            transformer.save(folder)
            quantized = cls.load(folder, init_defaults={"quant_plan": plan})
        return quantized.to(device).train(transformer.training)

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), "quant_plan": self.quant_plan}
