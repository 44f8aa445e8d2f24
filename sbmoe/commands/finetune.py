"""``sbmoe finetune``: train an SB-MoE (or dense, or no) head, alone on cached vectors or with the backbone."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from transformers import HfArgumentParser

from sbmoe.commands.common import USER_ERRORS, description, epilog, fail
from sbmoe.training.arguments import FinetuneArguments
from sbmoe.training.finetune import run
from sbmoe.training.losses import TrainingDivergedError

EXAMPLES = (
    "sbmoe finetune --train-data scifact:train --train head --output-dir out/minilm-sbmoe "
    "--eval-data scifact:test,scifact:test-unseen,cranfield:test",
    "sbmoe finetune --train full --epochs 1 --hard-negatives 3 --output-dir out/full",
    "sbmoe finetune config.json            # the same arguments as a JSON file",
)


def build_parser(prog: str = "sbmoe finetune") -> HfArgumentParser:
    """The flags of ``sbmoe finetune``: the fields of :class:`~sbmoe.training.arguments.FinetuneArguments`."""
    return HfArgumentParser(
        FinetuneArguments,
        prog=prog,
        description=description(__doc__) + " The output directory is a SentenceTransformer folder plus run.json.",
        epilog=epilog(EXAMPLES),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def parse_args(argv: Sequence[str] | None = None, prog: str = "sbmoe finetune") -> FinetuneArguments:
    """Parse flags, or a single ``.json`` config file, into :class:`FinetuneArguments`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])[0]
    return parser.parse_args_into_dataclasses(args=argv)[0]


def main(argv: Sequence[str] | None = None, prog: str = "sbmoe finetune") -> int:
    """Run the command; returns the exit status (2 on contradictory flags, 1 on bad data or divergence)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = parse_args(argv, prog)
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    try:
        record = run(args)
    except (*USER_ERRORS, TrainingDivergedError) as err:
        return fail("finetune", err)
    for spec, result in record["eval"].items():
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items())
        print(f"{spec}: {metrics}")
    saved = f"saved to {args.output_dir}" if args.save_model else f"run.json in {args.output_dir}"
    print(f"{saved} ({record['seconds']:.0f} s)")
    return 0
