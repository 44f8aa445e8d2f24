"""``sbmoe finetune``: train an SB-MoE (or dense, or no) head, alone on cached vectors or with the backbone."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from sbmoe.commands.common import USER_ERRORS, fail, setup_logging
from sbmoe.commands.flags import FlagParser, new_parser
from sbmoe.evaluation.report import finetune_table
from sbmoe.training.arguments import FINETUNE_GROUPS, FinetuneArguments
from sbmoe.training.losses import TrainingDivergedError
from sbmoe.training.runner import run

EXAMPLES = (
    "sbmoe finetune --train-data scifact:train --output-dir out/minilm-sbmoe "
    "--eval-data scifact:test,scifact:test-unseen,cranfield:test",
    "sbmoe finetune --train full --epochs 1 --hard-negatives 3 --output-dir out/full",
    "sbmoe finetune experiments/scifact/rows/recipe-query-only-routing.json   # a study row: every argument",
)


def build_parser(prog: str = "sbmoe finetune") -> FlagParser:
    """The flags of ``sbmoe finetune``: the fields of the groups of
    :class:`~sbmoe.training.arguments.FinetuneArguments`, one help section each."""
    parser = new_parser(prog, __doc__, EXAMPLES, FINETUNE_GROUPS)
    parser.usage = f"{prog} [FLAGS] (grouped below)\n       {prog} CONFIG.json"
    parser.description = parser.description.rstrip(".") + (
        ". The output directory is a SentenceTransformer folder plus run.json; a single .json argument (of these "
        "names with underscores, or a run.json) gives every argument at once."
    )
    return parser


def parse_args(argv: Sequence[str] | None = None, prog: str = "sbmoe finetune") -> FinetuneArguments:
    """Parse flags, or a single ``.json`` config file, into :class:`FinetuneArguments`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return FinetuneArguments(*parser.parse_json_config(argv[0]))
    return FinetuneArguments(*parser.parse_flags(argv))


def main(argv: Sequence[str] | None = None, prog: str = "sbmoe finetune") -> int:
    """Run the command; returns the exit status (2 on contradictory flags, 1 on bad data or divergence)."""
    setup_logging(format="%(message)s")
    try:
        args = parse_args(argv, prog)
    except USER_ERRORS as err:
        return fail("finetune", err)
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    try:
        record = run(args)
    except (*USER_ERRORS, TrainingDivergedError) as err:
        return fail("finetune", err)
    if record.get("rank"):  # under torchrun only rank 0 evaluates, saves and reports
        return 0
    print(finetune_table(record), end="")
    output = args.training.output_dir
    saved = f"model and run.json saved to {output}" if args.training.save_model else f"run.json in {output}"
    print(f"{saved} ({record['seconds']:.0f} s)")
    return 0
