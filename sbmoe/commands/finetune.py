"""``sbmoe finetune``: train an SB-MoE (or dense, or no) head, alone on cached vectors or with the backbone."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sbmoe.commands.common import USER_ERRORS, fail, setup_logging
from sbmoe.commands.dataclass_args import add_dataclass_arguments, from_json_file
from sbmoe.commands.flags import new_parser
from sbmoe.evaluation.report import finetune_table
from sbmoe.training.arguments import FinetuneArguments
from sbmoe.training.finetune import run
from sbmoe.training.losses import TrainingDivergedError

EXAMPLES = (
    "sbmoe finetune --train-data scifact:train --output-dir out/minilm-sbmoe "
    "--eval-data scifact:test,scifact:test-unseen,cranfield:test",
    "sbmoe finetune --train full --epochs 1 --hard-negatives 3 --output-dir out/full",
    "sbmoe finetune experiments/scifact/rows/recipe-query-only-routing.json   # a study row: every argument",
)
# --help lists the flags under these titles (fields of FinetuneArguments; any other field comes last, as "other").
FLAG_GROUPS = {
    "data": "train_data train_weights one_positive_per_epoch max_positives_per_query eval_data data_dir dev_queries "
    "dev_weighting self_supervised keep_identical_ids cache_dir",
    "hard negatives (mined once with the backbone, cached)": "hard_negatives negatives_skip negatives_depth "
    "negatives_margin negatives_relative_margin negatives_sampling",
    "model and head": "backbone max_seq_length head num_experts top_k routing inference expert_hidden dense_size "
    "identity_init router_init query_only expert_dropout tune_strength noise similarity",
    "MoE layers inside the encoder, stacked heads": "moe_layers upcycle_init head_layers reuse_group psr pregate "
    "frozen_layers token_cache_dir",
    "training": "train epochs max_steps batch_size learning_rate backbone_learning_rate weight_decay temperature "
    "symmetric_loss aux_loss_weight domain_loss_weight z_loss_weight anchor_weight patience eval_steps seed threads",
    "output and checkpoints": "output_dir save_model overwrite resume save_steps logging_steps",
}


def build_parser(prog: str = "sbmoe finetune") -> argparse.ArgumentParser:
    """The flags of ``sbmoe finetune``: the fields of :class:`~sbmoe.training.arguments.FinetuneArguments`."""
    parser = new_parser(prog, __doc__, EXAMPLES)
    parser.usage = f"{prog} [FLAGS] (grouped below)\n       {prog} CONFIG.json"
    parser.description = parser.description.rstrip(".") + (
        ". The output directory is a SentenceTransformer folder plus run.json; a single .json argument (of these "
        "names with underscores, or a run.json) gives every argument at once."
    )
    add_dataclass_arguments(parser, FinetuneArguments, {t: names.split() for t, names in FLAG_GROUPS.items()})
    return parser


def parse_args(argv: Sequence[str] | None = None, prog: str = "sbmoe finetune") -> FinetuneArguments:
    """Parse flags, or a single ``.json`` config file, into :class:`FinetuneArguments`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return from_json_file(FinetuneArguments, argv[0])
    return FinetuneArguments(**vars(build_parser(prog).parse_args(argv)))


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
    saved = f"model and run.json saved to {args.output_dir}" if args.save_model else f"run.json in {args.output_dir}"
    print(f"{saved} ({record['seconds']:.0f} s)")
    return 0
