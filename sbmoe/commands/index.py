"""``sbmoe index``: encode a corpus (through the cache), index it with faiss, store its texts, save it all."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from sbmoe.commands.common import USER_ERRORS, add_index_arguments, fail, index_params, new_parser
from sbmoe.data.corpus import FORMATS
from sbmoe.files import recover_dir
from sbmoe.retrieval.index import INDEX_TYPES, DenseIndex
from sbmoe.retrieval.retriever import CONFIG, Retriever, absolute_spec

EXAMPLES = (
    "sbmoe index --model minilm --corpus my_docs.jsonl --output indexes/my_docs",
    "sbmoe index --model out/minilm-sbmoe --corpus scifact --index hnsw --output indexes/scifact",
    "sbmoe index --model minilm --corpus docs.tsv --output indexes/docs   # again later: adds only the new ids",
)


def build_parser(prog: str = "sbmoe index") -> argparse.ArgumentParser:
    """The flags of ``sbmoe index``."""
    parser = new_parser(prog, __doc__, EXAMPLES)
    parser.add_argument("--model", required=True, help="backbone name (minilm), sbmoe or SentenceTransformer folder, "
                        "or fine-tuned output folder")  # fmt: skip
    parser.add_argument("--corpus", required=True, help=FORMATS)
    parser.add_argument("--output", required=True, metavar="DIR", help="the index folder (written atomically)")
    add_index_arguments(parser, INDEX_TYPES)
    parser.set_defaults(index=None)
    parser.add_argument("--rebuild", action="store_true", help="rebuild DIR from scratch instead of adding new ids")
    parser.add_argument("--data-dir", help="where dataset names live (default $SBMOE_DATA or ../shared/data)")
    parser.add_argument("--cache-dir", help="embedding cache (default $SBMOE_CACHE or ~/.cache/sbmoe)")
    parser.add_argument("--batch-size", type=int, default=64, help="encoder batch size (default: 64)")
    parser.add_argument("--device", help="torch device (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "sbmoe index") -> int:
    """Run the command; returns the exit code (0 ok, 1 data/model error or refused growth, 2 bad flags)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        params = index_params(args.index_param)
        DenseIndex(8, args.index or "flat", use_gpu=False, **params)
    except (argparse.ArgumentTypeError, ValueError) as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    output, started = Path(args.output), time.perf_counter()
    try:
        recover_dir(output)  # what a killed earlier run left beside it
        _check_output(output)
        if (output / CONFIG).is_file() and not args.rebuild:
            message = _grow(output, args)
        else:
            retriever = Retriever.build(
                args.model, args.corpus, args.index or "flat", params, args.data_dir, args.cache_dir,
                args.batch_size, show_progress=not args.quiet,
            )  # fmt: skip
            retriever.save(output)
            message = f"indexed {len(retriever)} documents ({retriever.index.index_type})"
    except (ValueError, *USER_ERRORS) as err:  # a refused growth (ValueError) is the user's to fix too
        return fail("index", err)
    print(f"{message} in {output} ({time.perf_counter() - started:.1f} s)")
    print(f'search it: sbmoe search {output} "your question"')
    return 0


def _check_output(output: Path) -> None:
    """Refuse an ``--output`` that holds something other than an index: saving replaces the whole folder."""
    if (output / CONFIG).is_file() or not output.exists() or (output.is_dir() and not any(output.iterdir())):
        return
    raise ValueError(
        f"{output} exists and is not an index folder (no {CONFIG}); saving would replace it whole, so it is left "
        "alone: choose another --output, or remove it first"
    )


def _grow(output: Path, args: argparse.Namespace) -> str:
    """Add the corpus's new ids to the existing index in ``output``; refuse a different model or index type."""
    retriever = Retriever.load(output, device=args.device)
    wanted = absolute_spec(args.model)
    if retriever.model_spec != wanted:
        raise ValueError(
            f"{output} was built with model {retriever.model_spec or 'embedded in it'!r}, not {args.model!r}; "
            "pass --rebuild to replace it"
        )
    if args.index and args.index != retriever.index.index_type:
        raise ValueError(
            f"{output} holds a {retriever.index.index_type!r} index, not {args.index!r}; pass --rebuild to replace it"
        )
    retriever.cache_dir = args.cache_dir
    before = len(retriever)
    added = retriever.add(args.corpus, args.data_dir, args.batch_size, show_progress=not args.quiet)
    if not added:
        return f"up to date: all {before} documents already indexed"
    retriever.save(output)
    return f"added {added} new documents to the {before} already indexed ({retriever.index.index_type})"
