"""``sbmoe search``: ranked documents from an index folder for a query (a table, or JSON), or a TREC run file."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from sbmoe.commands.common import USER_ERRORS, fail, setup_logging
from sbmoe.commands.flags import new_parser
from sbmoe.data.corpus import read_queries
from sbmoe.errors import DataError
from sbmoe.evaluation.runs import write_trec_run
from sbmoe.retrieval.retriever import Hit, Retriever

SNIPPET = 160
EXAMPLES = (
    'sbmoe search indexes/my_docs "what causes glioblastoma" -k 5',
    'sbmoe search indexes/my_docs "what causes glioblastoma" --json',
    "sbmoe search indexes/scifact --queries queries.jsonl -k 1000 --output runs/scifact.trec",
)


def build_parser(prog: str = "sbmoe search") -> argparse.ArgumentParser:
    """The flags of ``sbmoe search``."""
    parser = new_parser(prog, __doc__, EXAMPLES)
    parser.add_argument("index_dir", metavar="DIR", help="a folder written by `sbmoe index` (or Retriever.save)")
    parser.add_argument("query", nargs="?", help="the query text")
    parser.add_argument("-k", "--top-k", type=int, default=10, help="documents per query (default: 10)")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print JSON instead of a table (with --queries: one line per query, and the run file only with --output)",
    )
    parser.add_argument("--queries", metavar="FILE", help="a .jsonl ({_id, text}) or .tsv (id<TAB>text) of queries")
    parser.add_argument("--output", metavar="RUN", help="run file for --queries (default runs/search/<DIR>.trec)")
    parser.add_argument("--device", help="torch device (default: cuda when available)")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "sbmoe search") -> int:
    """Run the command; returns the exit code (0 ok, 1 missing or damaged index / queries, 2 bad flags)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if (args.query is None) == (args.queries is None):
        parser.error("give either a QUERY or --queries FILE")
    if args.top_k < 1:
        parser.error("-k must be >= 1")
    setup_logging(logging.WARNING)
    if args.query is not None and not args.query.strip():
        return fail("search", DataError(f"the query {args.query!r} is blank; give the words to search for"))
    try:
        queries = read_queries(args.queries) if args.queries else None
        retriever = Retriever.load(args.index_dir, device=args.device)
        if queries is not None:
            return _write_run(retriever, queries, args)
        hits, experts = retriever.search_with_experts(args.query, args.top_k)
    except USER_ERRORS as err:
        return fail("search", err)
    expert = None if experts is None else experts[0]
    if args.json:
        print(json.dumps({"query": args.query, "expert": expert, "hits": [h.to_dict() for h in hits[0]]}, indent=1))
    else:
        _print_table(args.query, expert, hits[0])
    return 0


def _write_run(retriever: Retriever, queries: dict[str, str], args: argparse.Namespace) -> int:
    """Search every query; write the TREC run (default path unless ``--json``), print JSON lines with ``--json``."""
    ids = list(queries)
    hits, experts = retriever.search_with_experts([queries[q] for q in ids], args.top_k)
    if args.json:
        for number, (qid, ranked) in enumerate(zip(ids, hits, strict=True)):
            expert = None if experts is None else experts[number]
            line = {"query_id": qid, "query": queries[qid], "expert": expert, "hits": [h.to_dict() for h in ranked]}
            print(json.dumps(line))
        if not args.output:
            return 0
    run = {qid: {hit.id: hit.score for hit in ranked} for qid, ranked in zip(ids, hits, strict=True)}
    output = Path(args.output or Path("runs") / "search" / f"{Path(args.index_dir).name}.trec")
    write_trec_run(output, run)
    print(f"wrote {len(ids)} queries x top {args.top_k} to {output}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _print_table(query: str, expert: int | None, hits: list[Hit]) -> None:
    from rich.console import Console
    from rich.table import Table

    title = f"{query}" + (f"  (query expert {expert})" if expert is not None else "")
    table = Table(title=title, show_lines=False)
    for column, justify in (("rank", "right"), ("score", "right"), ("id", "left"), ("title", "left")):
        table.add_column(column, justify=justify)
    table.add_column("snippet", ratio=1)
    if expert is not None:
        table.add_column("expert", justify="right")
    for rank, hit in enumerate(hits, start=1):
        text = " ".join(hit.text.split())  # one line: newlines and tabs in a document would break the table
        snippet = text if len(text) <= SNIPPET else text[:SNIPPET].rsplit(" ", 1)[0] + " ..."
        cells = [str(rank), f"{hit.score:.4f}", hit.id, hit.title, snippet]
        table.add_row(*cells, *([] if expert is None else [str(hit.expert)]))
    Console().print(table)
