"""``sbmoe quantize``: quantize a model's experts to a bit budget (mixed precision) and save it packed, or save it
with an int8 ONNX encoder.

Calibrates on a dataset's queries and a sample of its documents, chooses bits per expert linear (the head's and
the upcycled encoder layers'; routers stay full precision), writes the quantized model and its ``plan.json``, and
prints the plan: bits per linear and why. With ``--encoder onnx-int8`` the saved backbone runs through a dynamic
int8 ONNX Runtime file instead (``sbmoe.load_model``, ``sbmoe index`` and ``sbmoe evaluate`` use it as it is).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

from sbmoe.commands.common import USER_ERRORS, fail, setup_logging
from sbmoe.commands.flags import FlagParser, new_parser
from sbmoe.files import atomic_dir
from sbmoe.model import load_any_model
from sbmoe.quant.allocate import plan_table
from sbmoe.quant.arguments import QuantizeArguments
from sbmoe.quant.encoder import save_with_onnx_encoder
from sbmoe.quant.recipe import calibrate_model, choose_plan, quantize_model, read_plan

EXAMPLES = (
    "sbmoe quantize --model out/minilm-sbmoe --budget 3 --calibration scifact:train --output out/minilm-sbmoe-q3",
    "sbmoe quantize --model out/minilm-sbmoe --plan out/minilm-sbmoe-q3/plan.json --output out/again",
    "sbmoe quantize --model out/minilm-sbmoe --encoder onnx-int8 --output out/minilm-sbmoe-onnx-int8",
)


def build_parser(prog: str = "sbmoe quantize") -> FlagParser:
    """The flags of ``sbmoe quantize``: the fields of :class:`~sbmoe.quant.arguments.QuantizeArguments`."""
    return new_parser(prog, __doc__, EXAMPLES, [QuantizeArguments])


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
    (args,) = build_parser(prog).parse_flags(argv)
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
