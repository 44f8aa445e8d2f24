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
from sbmoe.model import build_model
from sbmoe.retrieval import DocStore, Retriever
from sbmoe.training.arguments import FinetuneArguments
from sbmoe.training.finetune import run

TOPICS = ["cancer cells", "brain study", "virus dna", "blood risk", "drug treatment", "gene protein", "mice human"]
DOCS = [Doc(f"d{i}", f"{TOPICS[i % 7]} {i}", f"the {TOPICS[(i * 3) % 7]} results of study {i}") for i in range(60)]


def write_beir(folder: Path, docs: list[Doc]) -> Path:
    """A BEIR folder over ``docs`` with 7 queries, each judging the documents of its topic."""
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": d.id, "title": d.title, "text": d.text}) + "\n"
                                                 for d in docs))  # fmt: skip
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{t}", "text": TOPICS[t]}) + "\n"
                                                  for t in range(7)))  # fmt: skip
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


def test_growth_adds_new_ids_for_flat_and_hnsw_and_refuses_ivf(tiny_bert: str, tmp_path: Path) -> None:
    for index_type in ("flat", "hnsw"):
        retriever = Retriever.build(tiny_bert, DOCS[:40], index=index_type, show_progress=False)
        assert retriever.add(DOCS) == 20 and retriever.add(DOCS) == 0
        assert len(retriever) == len(retriever.store) == 60
        assert retriever.index.doc_ids == [d.id for d in DOCS]
        hit = retriever.search(DOCS[55].full_text, k=1)[0][0]
        assert (hit.id, hit.text) == ("d55", DOCS[55].text)
    ivf = Retriever.build(tiny_bert, DOCS[:40], index="ivf", show_progress=False)
    assert ivf.add(DOCS[:40]) == 0  # nothing new: nothing to refuse
    with pytest.raises(ValueError, match=r"cannot add 20 new documents to a 'ivf' index: .* trained on the first 40"):
        ivf.add(DOCS)


def test_index_command_grows_in_place_and_refuses_a_trained_index(
    tiny_bert: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    small, full = write_beir(tmp_path / "small", DOCS[:40]), write_beir(tmp_path / "full", DOCS)
    for index_type in ("flat", "ivf"):
        out = tmp_path / index_type
        args = ["--model", tiny_bert, "--index", index_type, "--output", str(out), "--quiet"]
        assert index_main([*args, "--corpus", str(small)]) == 0
        code = index_main([*args, "--corpus", str(full)])
        captured = capsys.readouterr()
        if index_type == "flat":
            assert code == 0 and "added 20 new documents to the 40 already indexed (flat)" in captured.out
            assert len(Retriever.load(out)) == 60
        else:
            assert code == 1 and "cannot add 20 new documents to a 'ivf' index" in captured.err
            assert "--rebuild" in captured.err and len(Retriever.load(out)) == 40  # the old index is intact
    assert index_main(["--model", tiny_bert, "--corpus", str(full), "--output", str(tmp_path / "ivf"),
                       "--index", "ivf", "--rebuild", "--quiet"]) == 0  # fmt: skip
    assert len(Retriever.load(tmp_path / "ivf")) == 60


def test_search_with_an_sbmoe_model_shows_experts(tiny_bert: str, beir: Path, tmp_path: Path, capsys) -> None:
    model = build_model(tiny_bert, num_experts=4)
    model.save(str(tmp_path / "moe"))
    assert index_main(["--model", str(tmp_path / "moe"), "--corpus", str(beir), "--output", str(tmp_path / "i"),
                       "--quiet"]) == 0  # fmt: skip
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
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"_id": d.id, "title": d.title, "text": d.text}) + "\n"
                                              for d in docs))  # fmt: skip
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
        build_model(tiny_bert, num_experts=experts).save(str(tmp_path / f"head{experts}"))
    for model in (tiny_bert, str(tmp_path / "head4"), str(tmp_path / "head6")):
        argv = ["--model", model, "--datasets", str(beir), "--cache-dir", cache, "--quiet"]
        assert evaluate_main([*argv, "--output", str(tmp_path / f"{Path(model).name}.json")]) == 0
    run(FinetuneArguments(backbone=tiny_bert, train_data=f"{beir}:train", eval_data=str(beir), cache_dir=cache,
                          output_dir=str(tmp_path / "ft"), epochs=2, hard_negatives=2, save_model=False))  # fmt: skip
    assert [count for kind, count in encoded if kind == "corpus"] == [60]
