"""Cheaper models and indexes: packed low-bit experts with mixed-precision bit plans, and int8 encoders.

The names below load on first use, so that ``sbmoe.quant.head`` (the quantized head class, which model loading
may need) imports without the calibration code above the model layer.
"""

import importlib

_LAZY = {
    "LinearStats": "sbmoe.quant.calibrate",
    "capture_inputs": "sbmoe.quant.calibrate",
    "head_frequencies": "sbmoe.quant.calibrate",
    "linear_stats": "sbmoe.quant.calibrate",
    "outlier_score": "sbmoe.quant.calibrate",
    "make_plan": "sbmoe.quant.allocate",
    "plan_table": "sbmoe.quant.allocate",
    "uniform": "sbmoe.quant.allocate",
    "QuantizedSBMoEHead": "sbmoe.quant.head",
    "PackedLinear": "sbmoe.quant.linear",
    "dequantize": "sbmoe.quant.linear",
    "pack": "sbmoe.quant.linear",
    "quantize": "sbmoe.quant.linear",
    "quantize_experts": "sbmoe.quant.linear",
    "unpack": "sbmoe.quant.linear",
    "routed_frequencies": "sbmoe.quant.calibrate",
    "OnnxTransformer": "sbmoe.quant.encoder",
    "save_with_onnx_encoder": "sbmoe.quant.encoder",
    "QuantizedMoETransformer": "sbmoe.quant.transformer",
    "ExpertResidency": "sbmoe.quant.residency",
    "calibrate_head": "sbmoe.quant.recipe",
    "calibrate_layers": "sbmoe.quant.recipe",
    "calibrate_model": "sbmoe.quant.recipe",
    "calibration_texts": "sbmoe.quant.recipe",
    "calibration_vectors": "sbmoe.quant.recipe",
    "choose_plan": "sbmoe.quant.recipe",
    "quantize_head": "sbmoe.quant.recipe",
    "quantize_model": "sbmoe.quant.recipe",
    "read_plan": "sbmoe.quant.recipe",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    """The names in ``_LAZY``, imported from their module on first access."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sbmoe.quant' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
