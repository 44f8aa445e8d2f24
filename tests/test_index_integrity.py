"""One integrity story for a saved retriever: every file checksummed, names kept inside the folder, one snapshot
per load, one writer at a time, any path name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import sbmoe.retrieval.retriever as retriever_module
from sbmoe.commands.index import main as index_main
from sbmoe.commands.search import main as search_main
from sbmoe.data import Doc
from sbmoe.errors import IndexLoadError
from sbmoe.files import writer_lock
from sbmoe.retrieval import DenseIndex, Retriever

DOCS = [Doc(f"d{i}", f"title {i}", f"the cancer cells study number {i}") for i in range(20)]


@pytest.fixture(scope="module")
def saved(tiny_bert: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "r"
    Retriever.build(tiny_bert, DOCS[:12], show_progress=False).save(folder)
    return folder


@pytest.fixture()
def copy(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "r"))


def edit_json(file: Path, change) -> None:
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:100])


def scramble(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    file.write_bytes(bytes(data))


DAMAGES = {
    "truncated store": (lambda f: truncate(f / "docs.sqlite"), r"docs\.sqlite: truncated or altered"),
    "garbage store": (lambda f: scramble(f / "docs.sqlite"), r"docs\.sqlite: corrupt: SHA-256 differs"),
    "index type edited": (
        lambda f: edit_json(f / "index" / "manifest.json", lambda m: m.update(type="hnsw")),
        r"index/manifest\.json: truncated or altered|index/manifest\.json: corrupt",
    ),
    "dim edited": (
        lambda f: edit_json(f / "manifest.json", lambda m: m.update(dim=64)),
        r"manifest\.json: says 12 64-d flat vectors; the folder holds 12 32-d flat",
    ),
    "config damaged": (lambda f: (f / "retriever.json").write_text("{"), r"retriever\.json: truncated or altered"),
    "manifest damaged": (lambda f: (f / "manifest.json").write_text("[1"), r"manifest\.json:1: invalid JSON"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_store_manifest_or_config_is_one_line_and_exit_1(copy: Path, damage: str, capsys) -> None:
    apply, message = DAMAGES[damage]
    apply(copy)
    assert search_main([str(copy), "cancer cells"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sbmoe search: error: ")
    with pytest.raises(IndexLoadError, match=message):
        Retriever.load(copy)


def test_an_index_manifest_that_disagrees_with_its_faiss_file_is_refused(copy: Path) -> None:
    edit_json(copy / "index" / "manifest.json", lambda m: m.update(type="hnsw"))
    with pytest.raises(IndexLoadError, match=r"says a 32-d hnsw index, index\.faiss holds a 32-d IndexFlatIP"):
        DenseIndex.load(copy / "index", verify=False)


@pytest.mark.parametrize("name", ["../../etc/hostname", "/etc/hostname", "index/../../x"])
def test_a_manifest_file_outside_the_folder_is_refused(copy: Path, name: str) -> None:
    edit_json(copy / "manifest.json", lambda m: m["files"].update({name: {"bytes": 1, "sha256": "0"}}))
    with pytest.raises(IndexLoadError, match=r"lies outside the folder; the manifest is refused"):
        Retriever.load(copy)


@pytest.mark.parametrize("moment", ["before the store opens", "after everything opened"])
def test_a_load_during_a_rebuild_is_never_mixed(
    tiny_bert: str, copy: Path, moment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rebuilt = Retriever.build(tiny_bert, DOCS, show_progress=False)  # 20 documents replace 12
    real_store, real_open = retriever_module.DocStore, Retriever._open.__func__
    swapped = []

    def swap_once() -> None:
        if not swapped:
            swapped.append(True)
            rebuilt.save(copy)  # the writer's atomic swap, replayed at this moment of the load

    def store_after_swap(path, read_only=False):
        swap_once()
        return real_store(path, read_only)

    def open_then_swap(cls, *args):
        opened = real_open(cls, *args)
        swap_once()
        return opened

    if moment == "before the store opens":
        monkeypatch.setattr(retriever_module, "DocStore", store_after_swap)
    else:
        monkeypatch.setattr(Retriever, "_open", classmethod(open_then_swap))
    loaded = Retriever.load(copy)
    assert swapped and (len(loaded.index), len(loaded.store)) == (20, 20)
    assert loaded.search(DOCS[17].full_text, k=1)[0][0].id == "d17"


def test_a_second_writer_of_one_index_is_refused_and_nothing_is_lost(
    tiny_bert: str, copy: Path, tmp_path: Path, capsys
) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"_id": d.id, "title": d.title, "text": d.text}) + "\n" for d in DOCS))
    args = ["--model", tiny_bert, "--corpus", str(corpus), "--output", str(copy), "--quiet"]
    with writer_lock(copy):  # another `sbmoe index` of this folder, still running
        assert index_main(args) == 1
    assert "another process is writing it; run this again once it ends" in capsys.readouterr().err
    assert len(Retriever.load(copy)) == 12
    assert index_main(args) == 0 and len(Retriever.load(copy)) == 20


def test_an_index_path_with_hash_question_mark_and_percent(tiny_bert: str, tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"_id": d.id, "text": d.text}) + "\n" for d in DOCS[:5]))
    out = tmp_path / "odd" / "a#b?c%20d"
    assert index_main(["--model", tiny_bert, "--corpus", str(corpus), "--output", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert search_main([str(out), DOCS[3].text, "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hits"][0]["id"] == "d3"
    assert sorted(p.name for p in out.parent.iterdir()) == ["a#b?c%20d"]  # no stray file beside it


def test_a_failed_first_index_leaves_no_empty_folder(tiny_bert: str, tmp_path: Path, capsys) -> None:
    argv = ["--model", tiny_bert, "--corpus", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "i")]
    assert index_main(argv) == 1 and "corpus file not found" in capsys.readouterr().err
    assert not (tmp_path / "i").exists()
