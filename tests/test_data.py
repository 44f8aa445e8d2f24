"""Data loading: BEIR folders, irds: ids, streaming, and every bad-input message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sbmoe.data import DataError, Doc, data_dir, load_dataset


def write_beir(folder: Path, docs: list, queries: dict[str, str], qrels: list[str], split: str = "test") -> Path:
    """A BEIR folder; ``docs`` are dicts (written as JSON) or raw strings (written as they are)."""
    (folder / "qrels").mkdir(parents=True)
    lines = [d if isinstance(d, str) else json.dumps(d) for d in docs]
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    query_lines = [json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items()]
    (folder / "queries.jsonl").write_text("".join(query_lines))
    (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(r + "\n" for r in qrels))
    return folder


def test_scifact_loads_and_streams(shared_data: Path) -> None:
    ds = load_dataset("scifact", data_dir=shared_data)
    assert (ds.name, ds.split, len(ds.queries), ds.corpus_size) == ("scifact", "test", 300, 5183)
    assert sum(len(r) for r in ds.qrels.values()) == 339
    batches = list(ds.iter_corpus(2000))
    assert [len(b) for b in batches] == [2000, 2000, 1183]
    first = batches[0][0]
    assert first.id == "4983" and first.full_text.startswith("Microstructural development of human newborn")
    assert ds.corpus()[first.id] == {"title": first.title, "text": first.text}
    assert ds.validate() == []
    train = load_dataset("scifact:train", data_dir=shared_data)
    assert (train.split, len(train.queries)) == ("train", 809)
    assert not set(train.queries) & set(ds.queries)


def test_data_dir_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SBMOE_DATA", str(tmp_path / "env"))
    assert data_dir("explicit") == Path("explicit")
    assert data_dir() == tmp_path / "env"
    monkeypatch.delenv("SBMOE_DATA")
    (tmp_path / "repo").mkdir()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "repo")
    assert data_dir() == tmp_path / "shared" / "data"


def test_empty_and_partial_texts_are_kept(tmp_path: Path) -> None:
    docs = [
        {"_id": "t", "title": "Title only", "text": ""},
        {"_id": "x", "text": "text only"},
        {"_id": "n", "title": None, "text": None},
        {"_id": 7, "title": "numeric id", "text": "ok"},
    ]
    ds = load_dataset(str(write_beir(tmp_path / "d", docs, {"q": "query"}, ["q\tt\t1"])))
    assert [d.full_text for d in ds.iter_docs()] == ["Title only", "text only", "", "numeric id ok"]
    assert list(ds.iter_docs())[3] == Doc("7", "numeric id", "ok")
    assert ds.validate() == ["d: 1 documents with empty title and text (e.g. n)"]


def test_malformed_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    docs = [{"_id": "a", "text": "fine"}, "", '{"_id": "b" "text": "comma missing"}']
    ds = load_dataset(str(write_beir(tmp_path / "d", docs, {"q": "x"}, ["q\ta\t1"])))
    message = r"corpus\.jsonl:3: invalid JSON at column 13 \(Expecting ',' delimiter\); expected one JSON object"
    with pytest.raises(DataError, match=message):
        _ = ds.corpus_size


def test_missing_id_and_wrong_type_are_named(tmp_path: Path) -> None:
    ds = load_dataset(str(write_beir(tmp_path / "a", [{"text": "no id"}], {"q": "x"}, ["q\ta\t1"])))
    with pytest.raises(DataError, match=r'corpus\.jsonl:1: missing "_id"'):
        list(ds.iter_docs())
    ds = load_dataset(str(write_beir(tmp_path / "b", [{"_id": "a", "text": ["list"]}], {"q": "x"}, ["q\ta\t1"])))
    with pytest.raises(DataError, match=r"corpus\.jsonl:1: 'text' is list, expected a string"):
        list(ds.iter_docs())


def test_malformed_qrels_lines(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"test\.tsv:3: 2 tab-separated fields, expected 3 \(query-id, corpus-id"):
        load_dataset(str(write_beir(tmp_path / "a", [{"_id": "a", "text": "t"}], {"q": "x"}, ["q\ta\t1", "q\ta"])))
    with pytest.raises(DataError, match=r"test\.tsv:2: score 'high' is not an integer"):
        load_dataset(str(write_beir(tmp_path / "b", [{"_id": "a", "text": "t"}], {"q": "x"}, ["q\ta\thigh"])))


def test_unknown_qrel_ids_are_counted_with_examples(tmp_path: Path) -> None:
    qrels = ["q1\ta\t1", "q1\tmissing1\t1", "q2\tmissing2\t1", "ghost\ta\t1"]
    ds = load_dataset(str(write_beir(tmp_path / "d", [{"_id": "a", "text": "t"}], {"q1": "x", "q2": "y"}, qrels)))
    assert list(ds.queries) == ["q1", "q2"]
    assert ds.validate() == [
        "d: 1 qrels query ids not in the queries (e.g. ghost)",
        "d: 2 qrels doc ids not in the corpus (e.g. q1/missing1, q2/missing2)",
    ]


def test_missing_dataset_folder_and_split(tmp_path: Path, shared_data: Path) -> None:
    with pytest.raises(DataError, match=r"dataset 'nope' not found: .*available under .*: cranfield, msmarco-sample"):
        load_dataset("nope", data_dir=shared_data)
    with pytest.raises(DataError, match=r"qrels/dev\.tsv: file not found \(splits present: test, test-unseen, train"):
        load_dataset("scifact", split="dev", data_dir=shared_data)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty/corpus\.jsonl: file not found"):
        load_dataset(str(tmp_path / "empty"))


def test_msmarco_without_collection_names_the_expected_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IR_DATASETS_HOME", str(tmp_path))
    expected = tmp_path / "msmarco-passage" / "collectionandqueries.tar.gz"
    for dataset_id in ("msmarco-passage/dev/small", "msmarco-passage/trec-dl-2019/judged"):
        with pytest.raises(DataError, match=f"ir-datasets expects {expected}"):
            load_dataset(f"irds:{dataset_id}")


def test_irds_cranfield_equals_the_beir_folder(shared_data: Path) -> None:
    """Same documents, queries and relevant pairs; ir-datasets keeps raw codes (-1 rows: not relevant)."""
    irds = load_dataset("irds:cranfield", data_dir=shared_data)
    beir = load_dataset("cranfield", data_dir=shared_data)
    assert (irds.name, irds.relevance_level, irds.corpus_size, beir.corpus_size) == ("irds:cranfield", 1, 1400, 1400)

    def norm(text: str) -> str:
        return " ".join(text.split())

    pairs = list(zip(irds.iter_docs(), beir.iter_docs(), strict=True))
    assert all(a.id == b.id and norm(a.title) == b.title and norm(a.text) == b.text for a, b in pairs)
    assert {q: norm(t) for q, t in irds.queries.items()} == beir.queries
    assert sum(len(r) for r in irds.qrels.values()) == 1837
    assert {s for r in irds.qrels.values() for s in r.values()} == {-1, 1, 2, 3, 4}
    relevant = {(q, d) for q, r in irds.qrels.items() for d, s in r.items() if s > 0}
    assert relevant == {(q, d) for q, r in beir.qrels.items() for d in r}
    assert len(relevant) == 1612
    # graded labels differ by design: BEIR folder grade = 5 - ir_datasets code
    assert all(beir.qrels[q][d] == 5 - irds.qrels[q][d] for q, d in relevant)
    # ir_datasets wrote its caches into the writable home, never beside the shared archive
    assert sorted(p.name for p in (shared_data / "ir_datasets" / "cranfield").iterdir()) == ["cran.tar.gz"]
