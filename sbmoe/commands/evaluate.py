"""``sbmoe evaluate``: score a model (encode through the cache, index, search) or a TREC run file against qrels."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sbmoe.commands.common import USER_ERRORS, add_index_arguments, fail, index_params, setup_logging, slug
from sbmoe.commands.flags import new_parser
from sbmoe.data import RetrievalDataset, load_dataset
from sbmoe.evaluation.evaluator import evaluate_model, score_run
from sbmoe.evaluation.metrics import DEFAULT_METRICS, parse_metric
from sbmoe.evaluation.report import markdown_table
from sbmoe.evaluation.runs import read_trec_run
from sbmoe.files import write_atomic
from sbmoe.model import load_any_model
from sbmoe.retrieval.cache import model_fingerprint
from sbmoe.retrieval.faiss_types import INDEX_TYPES, check_index_params

logger = logging.getLogger("sbmoe.evaluate")

EXAMPLES = (
    "sbmoe evaluate --model minilm --datasets scifact",
    "sbmoe evaluate --model out/minilm-sbmoe --datasets scifact,scifact:test-unseen,irds:cranfield --index hnsw",
    "sbmoe evaluate --run runs/scifact.trec --datasets scifact",
)


def build_parser(prog: str = "sbmoe evaluate") -> argparse.ArgumentParser:
    """The flags of ``sbmoe evaluate``."""
    parser = new_parser(prog, __doc__, EXAMPLES)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model",
        help="backbone name (minilm = minilm-plain, no head), SentenceTransformer or sbmoe folder, HF encoder folder, "
        "or Hub id",
    )
    source.add_argument("--run", help="a TREC run file (qid Q0 docid rank score tag) to score instead of a model")
    parser.add_argument("--datasets", required=True, help="comma-separated BEIR folder names, paths or irds:<id>")
    parser.add_argument("--data-dir", help="where BEIR folder names live (default $SBMOE_DATA or ../shared/data)")
    parser.add_argument("--split", default="test", help="qrels split of BEIR folders (default: test)")
    add_index_arguments(parser, INDEX_TYPES)
    parser.add_argument("--top-k", type=int, default=1000, help="documents retrieved per query (default: 1000)")
    parser.add_argument("--batch-size", type=int, default=64, help="encoder batch size (default: 64)")
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated metric names")
    parser.add_argument(
        "--output",
        help="JSON result path (default runs/evaluate/<model>_<datasets>[_<index>]_<settings hash>.json); .md beside",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an --output computed with other settings")
    parser.add_argument("--cache-dir", help="embedding cache (default $SBMOE_CACHE or ~/.cache/sbmoe)")
    parser.add_argument("--no-cache", action="store_true", help="encode without reading or writing the cache")
    parser.add_argument("--save-index", metavar="DIR", help="also save each built index to DIR/<dataset>/")
    parser.add_argument(
        "--keep-identical-ids",
        action="store_true",
        help="keep documents whose id equals the query id (BEIR drops them by default)",
    )
    parser.add_argument("--device", help="torch device (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def parse_args(argv: Sequence[str] | None = None, prog: str = "sbmoe evaluate") -> argparse.Namespace:
    """Parse and check the flags (argparse exits with 2 on a bad one)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be >= 1")
    try:
        args.index_params = index_params(args.index_param)
        check_index_params(args.index, args.index_params)
        args.metric_names = [m.strip() for m in args.metrics.split(",") if m.strip()]
        for name in args.metric_names:
            parse_metric(name)
    except (argparse.ArgumentTypeError, ValueError) as err:
        parser.error(str(err))
    args.dataset_specs = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if not args.dataset_specs:
        parser.error("--datasets is empty")
    return args


def main(argv: Sequence[str] | None = None, prog: str = "sbmoe evaluate") -> int:
    """Run the command; returns the exit code (0 ok, 1 data/model error; argparse exits with 2 on bad flags)."""
    args = parse_args(argv, prog)
    setup_logging()
    started = time.perf_counter()
    output, settings = output_path(args), result_settings(args)
    try:
        datasets = [load_dataset(spec, args.split, args.data_dir) for spec in args.dataset_specs]
        check_overwrite(output, settings, args.overwrite)
        if args.run:
            run = read_trec_run(args.run)
            results = [
                score_run(run, d, metrics=args.metric_names, ignore_identical_ids=not args.keep_identical_ids)
                for d in datasets
            ]
            source, report = args.run, {"run": str(args.run)}
        else:
            model = load_any_model(args.model, args.device)
            results = [_evaluate(model, dataset, args) for dataset in datasets]
            source, report = args.model, {"model": args.model, "model_fingerprint": model_fingerprint(model)}
    except USER_ERRORS as err:
        return fail("evaluate", err)
    report.update(settings=settings, results=results, seconds=round(time.perf_counter() - started, 3))
    write_atomic(output, json.dumps(report, indent=1) + "\n")
    write_atomic(output.with_suffix(".md"), markdown_table(source, results))
    print(markdown_table(source, results), end="")
    print(f"wrote {output} and {output.with_suffix('.md')}")
    return 0


def output_path(args: argparse.Namespace) -> Path:
    """``--output``, or ``runs/evaluate/<model or run file>_<datasets>[_<index>]_<settings hash>.json`` (exact
    search adds no index part): runs with other settings never share a default name."""
    if args.output:
        return Path(args.output)
    datasets = [Path(spec).name if Path(spec).exists() else spec for spec in args.dataset_specs]  # folders by name
    name = slug(Path(args.run).stem if args.run else args.model) + "_" + slug("+".join(datasets))
    if args.index != "flat":
        name += "_" + slug("-".join([args.index, *(f"{k}{v}" for k, v in sorted(args.index_params.items()))]))
    digest = hashlib.sha256(json.dumps(result_settings(args), sort_keys=True).encode()).hexdigest()[:8]
    return Path("runs") / "evaluate" / f"{name[:100]}_{digest}.json"


def result_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a result depends on besides the model: a rerun with the same settings may replace it."""
    keys = ("model", "run", "datasets", "split", "index", "index_params", "top_k", "metric_names")
    keys += ("keep_identical_ids",)
    return {key: getattr(args, key) for key in keys}


def check_overwrite(output: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Refuse to replace a result computed with other settings unless ``overwrite``.

    Raises:
        FileExistsError: naming the settings that differ.
    """
    if overwrite or not output.is_file():
        return
    try:
        old = json.loads(output.read_text()).get("settings", {})
    except (json.JSONDecodeError, AttributeError):
        old = {}
    changed = [f"{key} {old.get(key)!r} -> {value!r}" for key, value in settings.items() if old.get(key) != value]
    if changed:
        raise FileExistsError(
            f"{output} holds a result with other settings ({'; '.join(changed)}); "
            "pass --overwrite to replace it or --output to write elsewhere"
        )


def _evaluate(model: Any, dataset: RetrievalDataset, args: argparse.Namespace) -> dict[str, Any]:
    logger.info("evaluating %s on %s:%s (%d queries)", args.model, dataset.name, dataset.split, len(dataset.queries))
    result = evaluate_model(
        model,
        dataset,
        top_k=args.top_k,
        index=args.index,
        index_params=args.index_params,
        batch_size=args.batch_size,
        metrics=args.metric_names,
        cache=not args.no_cache,
        cache_dir=args.cache_dir,
        ignore_identical_ids=not args.keep_identical_ids,
        save_index=Path(args.save_index) / slug(dataset.name) if args.save_index else None,
        model_name=args.model,
        show_progress=not args.quiet,
    )
    metrics = {k: round(v, 4) for k, v in result["metrics"].items()}
    logger.info("%s:%s: %s", dataset.name, dataset.split, json.dumps(metrics))
    return result
