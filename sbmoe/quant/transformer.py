"""The MoE Transformer whose upcycled experts are packed low-bit linears: saved packed, reloaded packed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from sentence_transformers.sentence_transformer.modules import Transformer
from transformers.utils import logging as hf_logging

from sbmoe.heads.config import MoELayersConfig
from sbmoe.heads.upcycle import MoETransformer, upcycle_encoder
from sbmoe.quant.linear import PackedLinear, quantize_experts, replace_module


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
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the dense architecture's load report would list every expert weight
        try:
            Transformer.__init__(self, model_name_or_path, **kwargs)  # not MoETransformer's: its load expects floats
        finally:
            hf_logging.set_verbosity(verbosity)
        self.moe, self.quant_plan = moe, quant_plan
        upcycle_encoder(self.auto_model, moe)
        for name, spec in quant_plan["linears"].items():
            linear = self.get_submodule(name)
            bias = linear.bias is not None
            replace_module(self, name, PackedLinear(linear.in_features, linear.out_features, spec["bits"],
                                                    spec["group_size"], bias))  # fmt: skip
        weights = Path(model_name_or_path) / "model.safetensors"
        state = load_file(str(weights), device=str(next(self.auto_model.parameters()).device))
        missing, unexpected = self.auto_model.load_state_dict(state, strict=False)
        if [k for k in missing if ".intermediate." in k] or unexpected:
            raise ValueError(f"{weights} does not match the quantized MoE settings: {missing or unexpected}")

    @classmethod
    def from_transformer(cls, transformer: MoETransformer, plan: dict[str, Any]) -> QuantizedMoETransformer:
        """``transformer`` itself, its expert linears quantized (round to nearest) as ``plan`` says, in place."""
        linears = plan["linears"]
        bits = {name: spec["bits"] for name, spec in linears.items()}
        groups = {name: spec["group_size"] for name, spec in linears.items()}
        quantize_experts(transformer, bits, groups)
        transformer.__class__ = cls  # same state, plus the plan it saves
        transformer.quant_plan = plan
        return transformer

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), "quant_plan": self.quant_plan}
