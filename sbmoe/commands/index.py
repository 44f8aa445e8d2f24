"""``sbmoe index``: encode a corpus (through the cache), index it with faiss, store its texts, save it all.

``--backend stream`` and ``--backend ray`` encode into resumable embedding shards instead of the cache (memory
bounded by a chunk plus the index; ray encodes in an actor pool, locally or on a cluster), then index shard by shard;
an ``ivf`` or ``ivfpq`` index is built per shard on one quantizer and merged on disk, its lists left out of memory.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from sbmoe.commands.common import USER_ERRORS, add_index_arguments, fail, index_params
from sbmoe.commands.flags import new_parser
from sbmoe.data.corpus import FORMATS
from sbmoe.errors import DataError
from sbmoe.files import recover_dir, writer_lock
from sbmoe.retrieval.backends import BACKENDS
from sbmoe.retrieval.faiss_types import INDEX_TYPES, check_index_params
from sbmoe.retrieval.index_settings import parse_bytes
from sbmoe.retrieval.retriever import CONFIG, Retriever, absolute_spec
from sbmoe.retrieval.shards import ShardSet

EXAMPLES = (
    "sbmoe index --model minilm --corpus my_docs.jsonl --output indexes/my_docs",
    "sbmoe index --model minilm --corpus docs.tsv --output indexes/docs   # again later: mirrors the changes",
    "sbmoe index --model minilm --corpus big.jsonl --output indexes/big --backend stream --ram-budget 8GB"
    "   # or --backend ray --ray-address auto --ray-workers 8 --gpus-per-worker 1 (docs/scale.md)",
)


def build_parser(prog: str = "sbmoe index") -> argparse.ArgumentParser:
    """The flags of ``sbmoe index``."""
    parser = new_parser(prog, __doc__, EXAMPLES)
    parser.add_argument(
        "--model",
        required=True,
        help="backbone name (minilm), sbmoe or SentenceTransformer folder, or fine-tuned output folder",
    )
    parser.add_argument("--corpus", required=True, help=FORMATS)
    parser.add_argument("--output", required=True, metavar="DIR", help="the index folder (written atomically)")
    add_index_arguments(parser, INDEX_TYPES)
    parser.set_defaults(index=None)
    parser.add_argument("--rebuild", action="store_true", help="rebuild DIR from scratch instead of updating it")
    parser.add_argument("--data-dir", help="where dataset names live (default $SBMOE_DATA or ../shared/data)")
    parser.add_argument("--cache-dir", help="embedding cache (default $SBMOE_CACHE or ~/.cache/sbmoe)")
    parser.add_argument("--batch-size", type=int, default=64, help="encoder batch size (default: 64)")
    parser.add_argument("--device", help="torch device (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    scale = parser.add_argument_group("large corpora (stream and ray backends)")
    scale.add_argument(
        "--backend",
        choices=BACKENDS,
        default="local",
        help="local: through the embedding cache "
        "(default); stream: chunks -> resumable shards -> index; ray: that on Ray Data",
    )
    scale.add_argument(
        "--shards", metavar="DIR", help="embedding shard folder, kept to resume or re-index (default: OUTPUT.shards)"
    )
    scale.add_argument("--shard-size", type=int, default=100_000, help="vectors per shard (default: 100000)")
    scale.add_argument(
        "--ram-budget",
        metavar="SIZE",
        help="without --index: pick the index type that fits SIZE (4GB, 512MiB) for the corpus size",
    )
    scale.add_argument("--ray-address", help="Ray cluster to join (auto, ray://head:10001; default: start Ray here)")
    scale.add_argument("--ray-workers", type=int, default=1, help="encoding actors (default: 1)")
    scale.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per actor (default: 0, CPU)")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "sbmoe index") -> int:
    """Run the command; returns the exit code (0 ok, 1 data/model error or refused growth, 2 bad flags)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        params = index_params(args.index_param)
        check_index_params(args.index or "flat", params)
        budget = parse_bytes(args.ram_budget) if args.ram_budget else None
    except (argparse.ArgumentTypeError, ValueError) as err:
        parser.error(str(err))
    if args.backend == "local" and (budget or args.ray_address or args.shards):
        parser.error("--ram-budget, --shards and --ray-address need --backend stream or ray")
    if args.shard_size < 1 or args.ray_workers < 1:
        parser.error("--shard-size and --ray-workers must be positive")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    output, started = Path(args.output), time.perf_counter()
    try:
        with writer_lock(output):
            message = _write(output, args, params, budget)
    except USER_ERRORS as err:
        return fail("index", err)
    print(f"{message} in {output} ({time.perf_counter() - started:.1f} s)")
    print(f'search it: sbmoe search {output} "your question"')
    return 0


def _write(output: Path, args: argparse.Namespace, params: dict, budget: int | None) -> str:
    """Build, rebuild or update the index folder ``output`` (its writer lock held); the summary line."""
    recover_dir(output)  # what a killed earlier run left beside it
    _check_output(output)
    if (output / CONFIG).is_file() and not args.rebuild:
        if args.backend != "local":
            raise DataError(f"{output} holds an index: the {args.backend} backend builds from scratch; pass --rebuild")
        return _sync(output, args)
    sharded = args.backend != "local"
    shards = (Path(args.shards) if args.shards else output.with_name(f"{output.name}.shards")) if sharded else None
    ray = {"workers": args.ray_workers, "gpus_per_worker": args.gpus_per_worker, "address": args.ray_address}
    retriever = Retriever.build(
        args.model,
        args.corpus,
        args.index,
        params,
        args.data_dir,
        args.cache_dir,
        args.batch_size,
        show_progress=not args.quiet,
        device=args.device,
        backend=args.backend,
        ram_budget=budget,
        shards=shards,
        shard_size=args.shard_size,
        ray=ray if args.backend == "ray" else None,
    )
    retriever.save(output)
    choice = f"; {retriever.index_choice.reason}" if retriever.index_choice else ""
    source = f" from {len(ShardSet.open(shards).shards)} shards in {shards}" if sharded else ""
    return f"indexed {len(retriever)} documents ({retriever.index.index_type}{choice}){source}"


def _check_output(output: Path) -> None:
    """Refuse an ``--output`` that holds something other than an index: saving replaces the whole folder."""
    if (output / CONFIG).is_file() or not output.exists() or (output.is_dir() and not any(output.iterdir())):
        return
    raise DataError(
        f"{output} exists and is not an index folder (no {CONFIG}); saving would replace it whole, so it is left "
        "alone: choose another --output, or remove it first"
    )


def _sync(output: Path, args: argparse.Namespace) -> str:
    """Make the index in ``output`` mirror the corpus (new, changed, removed ids); refuse another model or type."""
    retriever = Retriever.load(output, device=args.device)
    wanted = absolute_spec(args.model)
    if retriever.model_spec != wanted:
        raise DataError(
            f"{output} was built with model {retriever.model_spec or 'embedded in it'!r}, not {args.model!r}; "
            "pass --rebuild to replace it"
        )
    if args.index and args.index != retriever.index.index_type:
        raise DataError(
            f"{output} holds a {retriever.index.index_type!r} index, not {args.index!r}; pass --rebuild to replace it"
        )
    retriever.cache_dir = args.cache_dir
    before = len(retriever)
    changes = retriever.sync(args.corpus, args.data_dir, args.batch_size, show_progress=not args.quiet)
    if not changes:
        return f"up to date: all {before} documents indexed as they are in the corpus"
    retriever.save(output)
    return f"{changes} documents: {len(retriever)} indexed, {before} before ({retriever.index.index_type})"
