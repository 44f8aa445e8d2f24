"""``sbmoe quantize``: quantize a model's experts to a bit budget (mixed precision) and save it packed, or save it
with an int8 ONNX encoder.

Calibrates on a dataset's queries and a sample of its documents, chooses bits per expert linear (the head's and
the upcycled encoder layers'; routers stay full precision), writes the quantized model and its ``plan.json``, and
prints the plan: bits per linear and why. With ``--encoder onnx-int8`` the saved backbone runs through a dynamic
int8 ONNX Runtime file instead (``sbmoe.load_model``, ``sbmoe index`` and ``sbmoe evaluate`` use it as it is).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from sbmoe.commands.common import USER_ERRORS, fail, setup_logging
from sbmoe.commands.dataclass_args import add_dataclass_arguments
from sbmoe.commands.flags import new_parser
from sbmoe.files import atomic_dir
from sbmoe.model import load_any_model
from sbmoe.quant.allocate import plan_table
from sbmoe.quant.encoder import save_with_onnx_encoder
from sbmoe.quant.recipe import DEFAULT_GROUP, calibrate_model, choose_plan, quantize_model, read_plan

EXAMPLES = (
    "sbmoe quantize --model out/minilm-sbmoe --budget 3 --calibration scifact:train --output out/minilm-sbmoe-q3",
    "sbmoe quantize --model out/minilm-sbmoe --plan out/minilm-sbmoe-q3/plan.json --output out/again",
    "sbmoe quantize --model out/minilm-sbmoe --encoder onnx-int8 --output out/minilm-sbmoe-onnx-int8",
)


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


def build_parser(prog: str = "sbmoe quantize") -> argparse.ArgumentParser:
    """The flags of ``sbmoe quantize``: the fields of :class:`QuantizeArguments`."""
    parser = new_parser(prog, __doc__, EXAMPLES)
    add_dataclass_arguments(parser, QuantizeArguments)
    return parser


def run(args: QuantizeArguments) -> dict | None:
    """Calibrate, plan, quantize and save; returns the plan (also written to ``output/plan.json``), or None when
    only the encoder was converted."""
    model = load_any_model(args.model, device="cpu")
    if args.encoder != "none":
        with atomic_dir(args.output) as folder:
            save_with_onnx_encoder(model, folder, int8=args.encoder == "onnx-int8")
        return None
    if args.plan is not None:
        plan = read_plan(args.plan)
    else:
        stats = calibrate_model(model, args.calibration, args.corpus_sample, args.group_size)
        plan = choose_plan(stats, args.budget, args.bits, args.criterion, args.group_size)
    plan = {**plan, "arguments": asdict(args)}
    with atomic_dir(args.output) as folder:
        quantize_model(model, plan).save(str(folder))
        (folder / "plan.json").write_text(json.dumps(plan, indent=1))
    return plan


def main(argv: Sequence[str] | None = None, prog: str = "sbmoe quantize") -> int:
    """Run the command; returns the exit status (2 on bad or contradictory flags, 1 on bad data)."""
    setup_logging(format="%(message)s")
    args = QuantizeArguments(**vars(build_parser(prog).parse_args(argv)))
    chosen = sum(x is not None for x in (args.budget, args.bits, args.plan)) + (args.encoder != "none")
    if chosen != 1:
        print(f"{prog}: error: give exactly one of --budget, --bits, --plan, --encoder", file=sys.stderr)
        return 2
    try:
        plan = run(args)
    except USER_ERRORS as err:
        return fail("quantize", err)
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    if plan is None:
        print(f"model with the {args.encoder} ONNX encoder saved to {args.output}")
        return 0
    print(plan_table(plan))
    print(f"quantized model and plan.json saved to {args.output}")
    return 0
