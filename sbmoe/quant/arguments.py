"""The arguments of ``sbmoe quantize``, a dataclass that ``HfArgumentParser`` fills from its flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sbmoe.quant.recipe import DEFAULT_GROUP


@dataclass
class QuantizeArguments:
    """The flags of ``sbmoe quantize``."""

    model: str = field(metadata={"help": "a saved sbmoe model folder (SB-MoE head or MoE layers)"})
    output: str = field(metadata={"help": "folder for the quantized model"})
    budget: float | None = field(default=None, metadata={"help": "average bits per expert weight (mixed precision)"})
    bits: int | None = field(default=None, metadata={"help": "the same bits (2, 3, 4 or 8) for every expert linear"})
    plan: str | None = field(default=None, metadata={"help": "a plan.json to apply as it is"})
    criterion: Literal["sensitivity", "outlier"] = field(
        default="sensitivity", metadata={"help": "sensitivity (error x frequency) or outlier"}
    )
    calibration: str = field(default="scifact:train", metadata={"help": "dataset whose queries and docs calibrate"})
    corpus_sample: int = field(default=1000, metadata={"help": "documents sampled for calibration"})
    group_size: int = field(default=DEFAULT_GROUP, metadata={"help": "input columns per scale below 8 bits"})
    encoder: Literal["none", "onnx-int8", "onnx-fp32"] = field(
        default="none", metadata={"help": "save the backbone as a dynamic int8 (or fp32) ONNX Runtime file instead"}
    )
