"""Retriever and document store on a tiny random BERT: save/load, growth, experts, one encoding per corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sbmoe.retrieval.cache as cache_module
from sbmoe.commands.evaluate import main as evaluate_main
from sbmoe.commands.index import main as index_main
from sbmoe.commands.search import main as search_main
from sbmoe.data import DataError, Doc, load_corpus
from sbmoe.heads import HeadConfig
from sbmoe.model import build_model
from sbmoe.retrieval import DocStore, Retriever
from sbmoe.training.arguments import FinetuneArguments
from sbmoe.training.runner import run

TOPICS = ["cancer cells", "brain study", "virus dna", "blood risk", "drug treatment", "gene protein", "mice human"]
DOCS = [Doc(f"d{i}", f"{TOPICS[i % 7]} {i}", f"the {TOPICS[(i * 3) % 7]} results of study {i}") for i in range(60)]


def write_beir(folder: Path, docs: list[Doc]) -> Path:
    """A BEIR folder over ``docs`` with 7 queries, each judging the documents of its topic."""
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": d.id, "title": d.title, "text": d.text}) + "\n" for d in docs)
    )
    (folder / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{t}", "text": TOPICS[t]}) + "\n" for t in range(7))
    )
    rows = [f"q{int(d.id[1:]) % 7}\t{d.id}\t1\n" for d in docs]
    for split in ("test", "train"):
        (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(rows))
    return folder


@pytest.fixture()
def beir(tmp_path: Path) -> Path:
    return write_beir(tmp_path / "toy", DOCS)


def test_saved_and_loaded_retriever_gives_identical_hits(tiny_bert: str, beir: Path, tmp_path: Path) -> None:
    built = Retriever.build(tiny_bert, str(beir), index="hnsw", show_progress=False)
    before = built.search(["cancer cells", "virus dna"], k=5)
    built.save(tmp_path / "r")
    loaded = Retriever.load(tmp_path / "r")
    assert loaded.search(["cancer cells", "virus dna"], k=5) == before
    assert [len(h) for h in before] == [5, 5] and before[0][0].title and before[0][0].expert is None
    assert (loaded.index.index_type, len(loaded), len(loaded.store)) == ("hnsw", 60, 60)


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf"])
def test_upsert_and_delete_leave_no_stale_text_or_removed_id(tiny_bert: str, index_type: str) -> None:
    retriever = Retriever.build(tiny_bert, DOCS[:40], index=index_type, show_progress=False)
    changed = Doc("d3", "glioblastoma radiation", "stem cells resist radiation")
    assert str(retriever.upsert([*DOCS[40:], changed], show_progress=False)) == "added 20, updated 1, removed 0"
    assert not retriever.upsert(DOCS[40:], show_progress=False)  # nothing new: nothing done
    assert retriever.delete(["d5", "nope"], show_progress=False) == 1
    assert len(retriever) == len(retriever.store) == 59 and "d5" not in retriever.index.doc_ids
    hit = retriever.search(changed.full_text, k=1)[0][0]
    assert (hit.id, hit.title, hit.text) == ("d3", changed.title, changed.text)
    assert all(h.id != "d5" for h in retriever.search(DOCS[5].full_text, k=59)[0])


def test_index_command_mirrors_new_changed_and_removed_documents(
    tiny_bert: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    changed = Doc("d3", "glioblastoma radiation", "stem cells resist radiation")
    small = write_beir(tmp_path / "small", DOCS[:40])
    mirrored = write_beir(tmp_path / "full", [d for d in [*DOCS[:3], changed, *DOCS[4:]] if d.id != "d5"])
    for index_type in ("flat", "ivf"):
        out = tmp_path / index_type
        args = ["--model", tiny_bert, "--index", index_type, "--output", str(out), "--quiet"]
        assert index_main([*args, "--corpus", str(small)]) == 0
        capsys.readouterr()
        assert index_main([*args, "--corpus", str(mirrored)]) == 0
        assert "added 20, updated 1, removed 1 documents: 59 indexed, 40 before" in capsys.readouterr().out
        assert index_main([*args, "--corpus", str(mirrored)]) == 0
        assert "up to date: all 59 documents indexed as they are in the corpus" in capsys.readouterr().out
        assert search_main([str(out), changed.full_text, "-k", "59", "--json"]) == 0
        hits = json.loads(capsys.readouterr().out)["hits"]
        assert (hits[0]["id"], hits[0]["text"]) == ("d3", changed.text) and "d5" not in {h["id"] for h in hits}


def test_search_with_an_sbmoe_model_shows_experts(tiny_bert: str, beir: Path, tmp_path: Path, capsys) -> None:
    model = build_model(tiny_bert, HeadConfig(num_experts=4))
    model.save(str(tmp_path / "moe"))
    assert (
        index_main(
            ["--model", str(tmp_path / "moe"), "--corpus", str(beir), "--output", str(tmp_path / "i"), "--quiet"]
        )
        == 0
    )
    capsys.readouterr()
    assert search_main([str(tmp_path / "i"), "cancer cells", "-k", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["expert"] in range(4) and all(hit["expert"] in range(4) for hit in result["hits"])
    assert search_main([str(tmp_path / "i"), "cancer cells", "-k", "2"]) == 0
    assert "query expert" in capsys.readouterr().out


def test_corpus_formats_read_alike(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = DOCS[:5]
    (tmp_path / "c.jsonl").write_text(
        "".join(json.dumps({"_id": d.id, "title": d.title, "text": d.text}) + "\n" for d in docs)
    )
    (tmp_path / "c.tsv").write_text("id\ttext\n" + "".join(f"{d.id}\t{d.text}\n" for d in docs))
    table = {"_id": [d.id for d in docs], "title": [d.title for d in docs], "text": [d.text for d in docs]}
    pq.write_table(pa.table(table), tmp_path / "c.parquet")
    assert list(load_corpus(tmp_path / "c.jsonl").iter_docs()) == docs
    assert list(load_corpus(tmp_path / "c.parquet").iter_docs()) == docs
    assert [(d.id, d.text) for d in load_corpus(tmp_path / "c.tsv").iter_docs()] == [(d.id, d.text) for d in docs]
    (tmp_path / "bad.tsv").write_text("a\tb\nc\n")
    with pytest.raises(DataError, match=r"bad.tsv:2: 1 tab-separated fields, expected 2 \(id, text\)"):
        list(load_corpus(tmp_path / "bad.tsv").iter_docs())
    with pytest.raises(DataError, match="corpus file not found"):
        load_corpus(tmp_path / "none.jsonl")


def test_store_keeps_first_text_of_a_repeated_id(tmp_path: Path) -> None:
    store = DocStore(tmp_path / "s.sqlite")
    assert store.add([Doc("a", "t", "x"), Doc("b", "", "y"), Doc("a", "t2", "z")], [0, 1, 2]) == 2
    assert store.get(["a", "b", "nope"]) == {"a": (Doc("a", "t", "x"), 0), "b": (Doc("b", "", "y"), 1)}
    assert store.missing(["b", "c", "a", "d"]) == ["c", "d"]


def test_one_corpus_encoding_for_evaluate_heads_and_finetune(
    tiny_bert: str, beir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoded: list[tuple[str, int]] = []
    real = cache_module._encode_to

    def counting(folder, model, items, kind, *args):
        meta = real(folder, model, items, kind, *args)
        encoded.append((kind, meta["count"]))
        return meta

    monkeypatch.setattr(cache_module, "_encode_to", counting)
    cache = str(tmp_path / "cache")
    for experts in (4, 6):
        build_model(tiny_bert, HeadConfig(num_experts=experts)).save(str(tmp_path / f"head{experts}"))
    for model in (tiny_bert, str(tmp_path / "head4"), str(tmp_path / "head6")):
        argv = ["--model", model, "--datasets", str(beir), "--cache-dir", cache, "--quiet"]
        assert evaluate_main([*argv, "--output", str(tmp_path / f"{Path(model).name}.json")]) == 0
    options = {"backbone": tiny_bert, "train_data": f"{beir}:train", "eval_data": str(beir), "cache_dir": cache}
    run(
        FinetuneArguments.from_flat(
            {**options, "output_dir": str(tmp_path / "ft"), "epochs": 2, "hard_negatives": 2, "save_model": False}
        )
    )
    assert [count for kind, count in encoded if kind == "corpus"] == [60]


def test_reindexing_a_corpus_with_one_changed_document_encodes_that_document_only(
    tiny_bert: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from sentence_transformers import SentenceTransformer

    changed = [*DOCS[:9], Doc("d9", "glioblastoma radiation", "stem cells resist radiation"), *DOCS[10:]]
    args = ["--model", tiny_bert, "--output", str(tmp_path / "idx"), "--cache-dir", str(tmp_path / "c"), "--quiet"]
    assert index_main([*args, "--corpus", str(write_beir(tmp_path / "old", DOCS))]) == 0
    encoded: list[str] = []
    real = SentenceTransformer.encode_document

    def counting(self, texts, *rest, **kwargs):
        encoded.extend(texts)
        return real(self, texts, *rest, **kwargs)

    monkeypatch.setattr(SentenceTransformer, "encode_document", counting)
    capsys.readouterr()
    assert index_main([*args, "--corpus", str(write_beir(tmp_path / "new", changed))]) == 0
    assert encoded == [changed[9].full_text] and "added 0, updated 1, removed 0" in capsys.readouterr().out
