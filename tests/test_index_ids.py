"""Ids that would break an index or a run file are refused up front; repeated ids keep the first document."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from sbmoe.commands.index import main as index_main
from sbmoe.data import DataError, Doc, load_corpus
from sbmoe.data.corpus import read_queries
from sbmoe.evaluation.runs import read_trec_run, write_trec_run
from sbmoe.retrieval import Retriever

DOCS = [Doc(f"d{i}", f"title {i}", f"the cancer cells study {i}") for i in range(12)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("bad", ["a\rb", "a\u2028b", "a\x85b", "a\x1cb", "a\x00b", "a\tb", "a b"])
def test_an_id_with_a_line_separator_control_or_space_is_refused_by_file_and_line(tmp_path: Path, bad: str) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"_id": "ok", "text": "x"}, {"_id": bad, "text": "y"}])
    with pytest.raises(DataError, match=r"c\.jsonl:2: id '.*' holds the"):
        list(load_corpus(corpus).iter_docs())
    with pytest.raises(DataError, match="rename it in the file"):
        Retriever.build("unused", [{"_id": bad, "text": "y"}])  # refused before any model is loaded


def test_a_line_separator_id_never_reaches_a_saved_index(tiny_bert: str, tmp_path: Path, capsys) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [{"_id": d.id, "text": d.text} for d in DOCS])
    bad = write_jsonl(tmp_path / "bad.jsonl", [*[{"_id": d.id, "text": d.text} for d in DOCS], {"_id": "x\u2028y"}])
    out = tmp_path / "idx"
    assert index_main(["--model", tiny_bert, "--corpus", str(good), "--output", str(out), "--quiet"]) == 0
    assert index_main(["--model", tiny_bert, "--corpus", str(bad), "--output", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.jsonl:13: id 'x\\u2028y' holds the line break" in err
    assert len(Retriever.load(out)) == 12  # the index before the refused update still loads


def test_a_run_file_never_holds_an_id_with_whitespace(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"run\.trec: document: id 'a\\tb' holds the line break or control character"):
        write_trec_run(tmp_path / "run.trec", {"q1": {"a\tb": 1.0}})
    with pytest.raises(DataError, match=r"run\.trec: query: id 'q 1' holds the whitespace"):
        write_trec_run(tmp_path / "run.trec", {"q 1": {"d": 1.0}})
    assert not (tmp_path / "run.trec").exists()


@pytest.mark.parametrize("score", ["nan", "inf", "-inf"])
def test_a_run_file_with_a_non_finite_score_is_refused_by_line(tmp_path: Path, score: str) -> None:
    (tmp_path / "run.trec").write_text(f"q1 Q0 d1 1 0.5 x\nq1 Q0 d2 2 {score} x\n")
    with pytest.raises(DataError, match=rf"run\.trec:2: score '{score}' is not finite"):
        read_trec_run(tmp_path / "run.trec")


def test_repeated_ids_keep_the_first_document_and_index_and_store_agree(
    tiny_bert: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    docs = [*DOCS, Doc("d1", "second copy", "a different text"), Doc("d2", "third", "another")]
    with caplog.at_level(logging.WARNING, logger="sbmoe"):
        retriever = Retriever.build(tiny_bert, docs, show_progress=False)
    assert "2 repeated document ids, the first of each kept (e.g. d1, d2)" in caplog.text
    assert len(retriever) == len(retriever.store) == 12 and retriever.index.doc_ids == [d.id for d in DOCS]
    hit = retriever.search(DOCS[1].full_text, k=1)[0][0]
    assert (hit.id, hit.title) == ("d1", "title 1")


def test_a_numeric_id_with_a_fraction_is_refused_and_integers_read_as_text(tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"_id": 4983, "text": "x"}, {"id": "b", "text": "y"}])
    assert [d.id for d in load_corpus(corpus).iter_docs()] == ["4983", "b"]  # "id" reads as "_id" does
    write_jsonl(corpus, [{"_id": 4983.0, "text": "x"}])
    with pytest.raises(DataError, match=r"c\.jsonl:1: id 4983\.0 is a JSON float; write ids as strings"):
        list(load_corpus(corpus).iter_docs())


def test_a_tsv_header_is_not_indexed_as_a_document(tmp_path: Path) -> None:
    (tmp_path / "c.tsv").write_text("docid\tpassage\nd1\tfirst\n")
    (tmp_path / "q.tsv").write_text("qid\ttext\nq1\tfirst question\n")
    assert [d.id for d in load_corpus(tmp_path / "c.tsv").iter_docs()] == ["d1"]
    assert read_queries(tmp_path / "q.tsv") == {"q1": "first question"}


def test_a_queries_file_with_query_instead_of_text_names_the_key(tmp_path: Path) -> None:
    queries = write_jsonl(tmp_path / "q.jsonl", [{"_id": "q1", "query": "cancer"}])
    with pytest.raises(DataError, match=r"q\.jsonl:1: no 'text' \(keys: _id, query\)"):
        read_queries(queries)


def test_blank_and_repeated_queries_are_skipped_with_a_warning(tmp_path: Path, caplog) -> None:
    records = [{"_id": "q1", "text": "cancer"}, {"_id": "q2", "text": "  "}, {"_id": "q1", "text": "other"}]
    with caplog.at_level(logging.WARNING, logger="sbmoe"):
        assert read_queries(write_jsonl(tmp_path / "q.jsonl", records)) == {"q1": "cancer"}
    assert "1 blank queries skipped (e.g. line 2)" in caplog.text
    assert "1 repeated query ids, the first text of each kept (e.g. q1 at line 3)" in caplog.text
    with pytest.raises(DataError, match="no queries with text"):
        read_queries(write_jsonl(tmp_path / "blank.jsonl", [{"_id": "q1", "text": ""}]))


def test_repeated_ids_through_the_stream_backend_leave_an_index_that_loads(tiny_bert: str, tmp_path: Path) -> None:
    records = [{"_id": d.id, "text": d.text} for d in DOCS] + [{"_id": "d0", "text": "a second copy"}]
    corpus = write_jsonl(tmp_path / "c.jsonl", records)
    out = tmp_path / "idx"
    argv = ["--model", tiny_bert, "--corpus", str(corpus), "--output", str(out), "--quiet", "--backend", "stream"]
    assert index_main(argv) == 0
    loaded = Retriever.load(out)
    assert len(loaded) == len(loaded.store) == 12
    assert loaded.search(DOCS[0].text, k=1)[0][0].text == DOCS[0].text
