"""A catalogue of damaged BEIR folders through both entry points, ``sbmoe evaluate`` and ``sbmoe finetune``.

Each case says how each command must end: exit code, a message on stderr or in the log (file, line and what was
expected, where there is one), and never a traceback.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from sbmoe import cli

DOCS = [
    {"_id": "d1", "title": "cells", "text": "protein gene expression in cells"},
    {"_id": "d2", "title": "cancer", "text": "drug treatment of cancer patients"},
    {"_id": "d3", "title": "brain", "text": "blood flow in the human brain"},
    {"_id": "d4", "title": "virus", "text": "rna virus in mice"},
    {"_id": "d5", "title": "risk", "text": "risk increase of disease"},
    {"_id": "d6", "title": "dense", "text": "dense vector search index"},
]
QUERIES = [
    {"_id": "q1", "text": "gene expression"},
    {"_id": "q2", "text": "cancer drug"},
    {"_id": "q3", "text": "brain"},
]
QRELS = ["q1\td1\t1", "q2\td2\t1", "q3\td3\t1"]


def jsonl(rows: list) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


def write(folder: Path, docs: str | bytes, queries: str | bytes, qrels: str | bytes) -> None:
    (folder / "qrels").mkdir(parents=True)
    for name, content in (("corpus.jsonl", docs), ("queries.jsonl", queries), ("qrels/test.tsv", qrels)):
        path = folder / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


def beir(docs: list | str | bytes = DOCS, queries: list | str | bytes = QUERIES, qrels: list[str] = QRELS):
    """A case builder writing one BEIR folder."""

    def build(folder: Path) -> Path:
        write(
            folder,
            docs if isinstance(docs, str | bytes) else jsonl(docs),
            queries if isinstance(queries, str | bytes) else jsonl(queries),
            "query-id\tcorpus-id\tscore\n" + "".join(f"{row}\n" for row in qrels),
        )
        return folder

    return build


@dataclass
class Case:
    """A damaged folder and how each entry point must end (``evaluate`` and ``finetune``: exit code, regex)."""

    name: str
    build: Callable[[Path], Path]
    evaluate: tuple[int, str]
    finetune: tuple[int, str]


def _file_not_folder(folder: Path) -> Path:
    beir()(folder)
    return folder / "corpus.jsonl"


def _no_qrels_split(folder: Path) -> Path:
    beir()(folder)
    (folder / "qrels" / "test.tsv").rename(folder / "qrels" / "dev.tsv")
    return folder


BAD_UTF8 = jsonl(DOCS[:2]).encode() + b'{"_id": "d3", "title": "caf\xe9", "text": "x"}\n'
NOTHING = r"nothing to evaluate among 3 judged queries"
CASES = [
    Case("clean", beir(), (0, r"nDCG@10"), (0, r"zero-shot")),
    Case(
        "qrels name unknown query ids",
        beir(qrels=["x1\td1\t1", "x2\td2\t1", "x3\td3\t1"]),
        (1, NOTHING + r": 3 qrels query ids not in the queries \(e\.g\. x1, x2, x3\)"),
        (1, r"no usable training example: none of the 3 qrels query ids is in the queries file"),
    ),
    Case(
        "qrels name only unknown document ids",
        beir(qrels=["q1\tz1\t1", "q2\tz2\t1", "q3\tz3\t1"]),
        (1, NOTHING + r": 3 scored queries have no relevant document in the corpus"),
        (1, r"none of the 3 judged document ids is in the corpus \(e\.g\. z1, z2, z3\)"),
    ),
    Case("empty queries.jsonl", beir(queries=""), (1, NOTHING), (1, r"none of the 3 qrels query ids is in the")),
    Case("blank queries.jsonl", beir(queries="\n  \n"), (1, NOTHING), (1, r"none of the 3 qrels query ids")),
    Case(
        "blank query text",
        beir(queries=[*QUERIES[:2], {"_id": "q3", "text": "  "}]),
        (0, r"nDCG@10"),
        (0, r"1 queries with blank text \(e\.g\. q3\), skipped"),
    ),
    Case(
        "one query judges a missing document",
        beir(qrels=[*QRELS[:2], "q3\tz9\t1"]),
        (0, r"scored 3 of 3 judged queries: 1 scored queries have no relevant document in the corpus"),
        (0, r"1 qrels doc ids not in the corpus \(e\.g\. q3/z9\)"),
    ),
    Case(
        "all judgments zero",
        beir(qrels=["q1\td1\t0", "q2\td2\t0", "q3\td3\t0"]),
        (1, NOTHING),
        (1, r"no qrel has a score >= 1"),
    ),
    Case(
        "empty qrels",
        beir(qrels=[]),
        (1, r"nothing to evaluate among 0 judged queries: the qrels of split 'test'"),
        (1, r"qrels split 'test' has no judgments"),
    ),
    Case(
        "duplicate document id",
        beir(docs=[*DOCS, {"_id": "d2", "title": "again", "text": "a second d2"}]),
        (0, r"1 duplicate document ids \(e\.g\. d2\)"),
        (0, r"1 duplicate document ids \(e\.g\. d2\)"),
    ),
    Case(
        "empty document",
        beir(docs=[*DOCS, {"_id": "d7"}]),
        (0, r"1 documents with empty title and text"),
        (0, r"1 documents with empty title and text"),
    ),
    Case(
        "invalid UTF-8 in corpus.jsonl",
        beir(docs=BAD_UTF8),
        (1, r"corpus\.jsonl:3: invalid UTF-8 at column 28 \(bytes b'\\xe9'\); expected a UTF-8 text file"),
        (1, r"corpus\.jsonl:3: invalid UTF-8 at column 28"),
    ),
    Case("byte-order mark in every file", lambda f: _with_bom(beir()(f)), (0, r"nDCG@10"), (0, r"zero-shot")),
    Case(
        "corpus.jsonl holds a JSON array",
        beir(docs=json.dumps(DOCS, indent=1)),
        (1, r"corpus\.jsonl:1: the file holds a JSON array, expected JSON lines \(one object per line\)"),
        (1, r"corpus\.jsonl:1: the file holds a JSON array"),
    ),
    Case(
        "invalid JSON line",
        beir(docs=[DOCS[0], '{"_id": "d2", "text": "no closing brace"']),
        (1, r"corpus\.jsonl:2: invalid JSON at column 41 \(Expecting ',' delimiter\)"),
        (1, r"corpus\.jsonl:2: invalid JSON at column 41"),
    ),
    Case(
        "document without _id",
        beir(docs=[DOCS[0], {"title": "t", "text": "x"}]),
        (1, r"corpus\.jsonl:2: missing \"_id\"; expected one JSON object per line"),
        (1, r"corpus\.jsonl:2: missing \"_id\""),
    ),
    Case(
        "title is a number",
        beir(docs=[DOCS[0], {"_id": "d2", "title": 7, "text": "x"}]),
        (1, r"corpus\.jsonl:2: 'title' is int, expected a string"),
        (1, r"corpus\.jsonl:2: 'title' is int, expected a string"),
    ),
    Case(
        "qrels row with two fields",
        beir(qrels=["q1\td1\t1", "q2 d2\t1"]),
        (1, r"test\.tsv:3: 2 tab-separated fields, expected 3 \(query-id, corpus-id, score\)"),
        (1, r"test\.tsv:3: 2 tab-separated fields, expected 3"),
    ),
    Case(
        "qrels score not an integer",
        beir(qrels=["q1\td1\tyes"]),
        (1, r"test\.tsv:2: score 'yes' is not an integer"),
        (1, r"test\.tsv:2: score 'yes' is not an integer"),
    ),
    Case(
        "qrels split missing",
        _no_qrels_split,
        (1, r"qrels/test\.tsv: file not found \(splits present: dev\)"),
        (1, r"qrels/test\.tsv: file not found \(splits present: dev\)"),
    ),
    Case(
        "a file given for the folder",
        _file_not_folder,
        (1, r"corpus\.jsonl: is a file; expected a BEIR folder .*\(give the folder that holds it\)"),
        (1, r"corpus\.jsonl: is a file; expected a BEIR folder"),
    ),
    Case(
        "relevant document has the query's id",
        beir(docs=[*DOCS, {"_id": "q1", "title": "gene", "text": "gene expression"}], qrels=[*QRELS, "q1\tq1\t1"]),
        (0, r"1 judged-relevant documents have the query's own id .*pass --keep-identical-ids"),
        (0, r"1 judged-relevant documents have the query's own id"),
    ),
]


def _with_bom(folder: Path) -> Path:
    for path in (folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels" / "test.tsv"):
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    return folder


def run_cli(argv: list[str], capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> tuple[int, str]:
    """Exit code and everything the command said (stdout, stderr, log); a traceback would raise here."""
    with caplog.at_level(logging.INFO):
        code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err + caplog.text


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_damaged_dataset_through_evaluate(case: Case, tiny_bert: str, tmp_path: Path, capsys, caplog) -> None:
    data = case.build(tmp_path / "data")
    code, said = run_cli(
        ["evaluate", "--model", tiny_bert, "--datasets", str(data), "--output", str(tmp_path / "r.json"), "--quiet"],
        capsys,
        caplog,
    )
    expected_code, message = case.evaluate
    assert (code, "Traceback" in said) == (expected_code, False), said
    assert re.search(message, said), said
    if code:
        assert "sbmoe evaluate: error: " in said


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_damaged_dataset_through_finetune(case: Case, tiny_bert: str, tmp_path: Path, capsys, caplog) -> None:
    data = case.build(tmp_path / "data")
    spec = f"{data}:test"
    argv = ["finetune", "--backbone", tiny_bert, "--train-data", spec, "--eval-data", spec, "--epochs", "1"]
    argv += ["--hard-negatives", "1", "--output-dir", str(tmp_path / "out"), "--no-save-model", "--threads", "1"]
    code, said = run_cli(argv, capsys, caplog)
    expected_code, message = case.finetune
    assert (code, "Traceback" in said) == (expected_code, False), said
    assert re.search(message, said), said
    if code:
        assert "sbmoe finetune: error: " in said
