"""Past one machine, on one: streaming encode into resumable shards, IVF lists on disk, index settings from RAM."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORDS

from sbmoe.commands import index as index_command
from sbmoe.commands import search as search_command
from sbmoe.data import DataError, Doc, load_corpus
from sbmoe.heads import HeadConfig
from sbmoe.model import load_any_model
from sbmoe.retrieval import DenseIndex, Retriever, build_index
from sbmoe.retrieval.encoder import Encoder, unit_rows
from sbmoe.retrieval.index_settings import choose_index, parse_bytes
from sbmoe.retrieval.shards import ShardSet
from sbmoe.retrieval.stream import encode_to_shards, store_from_shards

DOCS, SHARD = 300, 64

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def write_corpus(path: Path, count: int = DOCS, seed: int = 0) -> Path:
    """A jsonl corpus of ``count`` short random-word documents (every third without a title)."""
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for i in range(count):
            title = "" if i % 3 == 0 else " ".join(rng.choice(WORDS, 3))
            f.write(json.dumps({"_id": f"d{i}", "title": title, "text": " ".join(rng.choice(WORDS, 6 + i % 20))}))
            f.write("\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("scale") / "corpus.jsonl")


@pytest.fixture(scope="module")
def model(tiny_bert: str):
    torch.set_num_threads(1)
    return load_any_model(tiny_bert, device="cpu")


def all_rows(shards: ShardSet) -> tuple[np.ndarray, list[str]]:
    vectors = np.concatenate([np.asarray(v) for _, v in shards.iter_vectors()])
    return vectors, [doc_id for shard in shards.shards for doc_id in shards.ids(shard)]


def test_stream_shards_hold_what_the_cached_encoding_indexes(model, corpus: Path, tmp_path: Path) -> None:
    dataset = load_corpus(corpus)
    shards = encode_to_shards(model, dataset, tmp_path / "shards", shard_size=SHARD, chunk=50, show_progress=False)
    reference = Encoder(model, show_progress=False).encode(dataset, "corpus").vectors
    vectors, ids = all_rows(ShardSet.open(tmp_path / "shards"))
    assert [s.count for s in shards.shards] == [64, 64, 64, 64, 44] and shards.complete
    assert ids == [f"d{i}" for i in range(DOCS)]
    np.testing.assert_allclose(vectors, unit_rows(np.asarray(reference)), atol=1e-5)
    rows = shards.rows(shards.shards[1])
    assert (rows["id"][2], rows["title"][2], rows["expert"][2]) == ("d66", "", None)  # d66: no title, no head


def test_stream_shards_keep_each_documents_expert(tiny_bert: str, corpus: Path, tmp_path: Path) -> None:
    from sbmoe.model import build_model

    torch.manual_seed(0)
    moe = build_model(tiny_bert, HeadConfig(num_experts=4), device="cpu")
    with torch.no_grad():  # a random router this small may send every document to one expert: spread its choices
        for name, weight in moe.head.router.named_parameters():
            weight.zero_() if name.endswith("bias") else weight.normal_(0.0, 3.0 / weight.shape[1] ** 0.5)
    dataset = load_corpus(corpus)
    shards = encode_to_shards(moe, dataset, tmp_path / "shards", SHARD, show_progress=False)
    reference = Encoder(moe, show_progress=False).encode(dataset, "corpus")
    experts = [e for shard in shards.shards for e in shards.rows(shard)["expert"]]
    assert experts == reference.experts.tolist() and len(set(experts)) > 1
    np.testing.assert_allclose(all_rows(shards)[0], unit_rows(reference.vectors), atol=1e-5)


def killing_docs(corpus: Path, at: int) -> Iterator[Doc]:
    """The corpus's documents; at document ``at`` the process kills itself (SIGKILL: no cleanup runs)."""
    for i, doc in enumerate(load_corpus(corpus).iter_docs()):
        if i == at:
            os.kill(os.getpid(), signal.SIGKILL)
        yield doc


def test_a_killed_encode_resumes_and_ends_with_the_same_shards(model, corpus: Path, tmp_path: Path) -> None:
    from sbmoe.data.dataset import RetrievalDataset

    whole = encode_to_shards(model, load_corpus(corpus), tmp_path / "whole", SHARD, chunk=40, show_progress=False)
    pid = os.fork()
    if pid == 0:  # the child encodes until document 150 kills it, mid-chunk and mid-shard
        dying = RetrievalDataset("c", "corpus", {}, {}, lambda: killing_docs(corpus, 150))
        try:
            encode_to_shards(model, dying, tmp_path / "killed", SHARD, chunk=40, show_progress=False)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    left = ShardSet.open(tmp_path / "killed")
    assert (len(left.shards), len(left), left.complete) == (1, 64, False)  # rows 64-149 were only buffered
    resumed = encode_to_shards(model, load_corpus(corpus), tmp_path / "killed", SHARD, chunk=40, show_progress=False)
    assert resumed.complete and [s.count for s in resumed.shards] == [s.count for s in whole.shards]
    for shard in whole.shards:
        np.testing.assert_array_equal(resumed.vectors(shard), whole.vectors(shard))
        assert resumed.rows(shard) == whole.rows(shard)
    stale = sorted(p.name for p in (tmp_path / "killed").iterdir() if not p.name[0].isdigit())
    assert stale == ["manifest.json"]  # the killed writer's temporary files are gone


def test_resuming_refuses_another_corpus_or_model(model, corpus: Path, tmp_path: Path, tiny_bert: str) -> None:
    encode_to_shards(model, load_corpus(corpus), tmp_path / "s", SHARD, show_progress=False)
    other = write_corpus(tmp_path / "other.jsonl", seed=1)
    other.write_text(other.read_text().replace('"d0"', '"x0"'))
    with pytest.raises(DataError, match="rows 0-63 of the corpus hold other ids than these shards"):
        encode_to_shards(model, load_corpus(other), tmp_path / "s", SHARD, show_progress=False)
    with pytest.raises(DataError, match="shard size 64"):
        encode_to_shards(model, load_corpus(corpus), tmp_path / "s", 32, show_progress=False)


def test_ray_resume_drops_the_written_rows_and_checks_their_ids(tmp_path: Path) -> None:
    from sbmoe.retrieval.ray_encode import unwritten

    docs = [Doc(f"d{i}", "", "") for i in range(10)]
    vectors = np.arange(40, dtype=np.float32).reshape(10, 4)
    shards = ShardSet(tmp_path / "s", 4, 3)
    shards.append(vectors[:5], docs[:5])  # a killed run: shard 0 (rows 0-2) written, rows 3-4 lost
    batches = [(docs[i : i + 2], vectors[i : i + 2], None) for i in range(0, 10, 2)]
    rest = list(unwritten(shards, batches))
    assert [d.id for part in rest for d in part[0]] == [f"d{i}" for i in range(3, 10)]
    np.testing.assert_array_equal(np.concatenate([part[1] for part in rest]), vectors[3:])
    renamed = [([Doc("x0", "", ""), *batches[0][0][1:]], *batches[0][1:]), *batches[1:]]
    with pytest.raises(DataError, match="rows 0-1 of the corpus hold other ids"):
        list(unwritten(shards, renamed))


def test_index_command_stream_backend_equals_local_and_loads(corpus: Path, tiny_bert: str, tmp_path: Path) -> None:
    common = ["--model", tiny_bert, "--corpus", str(corpus), "--quiet"]
    assert index_command.main([*common, "--output", str(tmp_path / "local")]) == 0
    args = [*common, "--output", str(tmp_path / "stream"), "--backend", "stream", "--shard-size", "100"]
    assert index_command.main(args) == 0
    assert len(ShardSet.open(tmp_path / "stream.shards").shards) == 3
    local, stream = Retriever.load(tmp_path / "local"), Retriever.load(tmp_path / "stream")
    docs = [json.loads(line) for line in corpus.read_text().splitlines()[:20]]
    queries = [f"{d['title']} {d['text']}".strip() for d in docs]
    for want, got_local, got_stream in zip(docs, local.search(queries, 5), stream.search(queries, 5), strict=True):
        assert [h.id for h in got_stream] == [h.id for h in got_local]
        np.testing.assert_allclose([h.score for h in got_stream], [h.score for h in got_local], atol=1e-5)
        assert got_stream[0].id == want["_id"] and got_stream[0].text == want["text"]
    assert index_command.main(args) == 1  # an index is there: the stream backend asks for --rebuild


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_index_command_merges_ivf_lists_on_disk_and_serves_the_in_ram_top_100(
    model, corpus: Path, tiny_bert: str, tmp_path: Path, capsys, kind: str
) -> None:
    out = tmp_path / "disk"
    params = ["--index-param", "nlist=4", "--index-param", "nprobe=2", "--index-param", "pq_m=8"]
    args = ["--model", tiny_bert, "--corpus", str(corpus), "--output", str(out), "--quiet", "--index", kind]
    assert index_command.main([*args, *params, "--backend", "stream", "--shard-size", "100"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "disk.shards"]  # the merge folder is gone
    assert {"index.faiss", "lists.ivfdata"} <= {p.name for p in (out / "index").iterdir()}
    disk = Retriever.load(out)
    assert disk.index.lists_on_disk == str(out / "index" / "lists.ivfdata")  # memory-mapped where it was saved
    shards = ShardSet.open(tmp_path / "disk.shards")  # the same vectors, one index filled in RAM
    in_ram = build_index(shards, None, kind, {"nlist": 4, "nprobe": 2, "pq_m": 8}, use_gpu=False, show_progress=False)
    ram = Retriever(model, in_ram, store_from_shards(model, shards), tiny_bert)
    assert ram.index.lists_on_disk is None and len(disk) == len(ram) == DOCS
    queries = [doc.full_text for doc in list(load_corpus(corpus).iter_docs())[:20]]
    for got, want in zip(disk.search(queries, 100), ram.search(queries, 100), strict=True):
        assert [h.id for h in got] == [h.id for h in want] and len(got) == 100
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)
    assert search_command.main([str(out), queries[0], "-k", "100", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert [h["id"] for h in hits] == [h.id for h in ram.search(queries[:1], 100)[0]]
    with pytest.raises(ValueError, match="lists on disk"):
        disk.index.add(np.zeros((1, disk.index.dim), dtype=np.float32))


def test_index_command_picks_the_index_from_a_ram_budget(corpus: Path, tiny_bert: str, tmp_path: Path, capsys) -> None:
    args = ["--model", tiny_bert, "--corpus", str(corpus), "--output", str(tmp_path / "i"), "--quiet"]
    assert index_command.main([*args, "--backend", "stream", "--ram-budget", "1MB"]) == 0
    assert "indexed 300 documents (flat; 300 vectors: exact search is cheap below 16384)" in capsys.readouterr().out
    assert DenseIndex.load(tmp_path / "i" / "index").index_type == "flat"
    with pytest.raises(SystemExit):
        index_command.main([*args, "--ram-budget", "1MB"])  # the local backend takes no budget


def test_index_settings_follow_the_budget() -> None:
    assert choose_index(10_000, 384, 10**9).index_type == "flat"
    ivf = choose_index(1_000_000, 384, parse_bytes("4GB"))
    assert (ivf.index_type, ivf.params, ivf.bytes) == ("ivf", {"nlist": 4000, "nprobe": 500}, 1_550_144_000)
    pq = choose_index(100_000_000, 384, parse_bytes("8GB"))
    assert (pq.index_type, pq.params["pq_m"], pq.params["nlist"]) == ("ivfpq", 64, 40_000)
    assert pq.bytes <= 8 * 10**9 < (96 + 8) * 10**8  # 64-byte codes fit, the next divisor (96) would not
    with pytest.raises(DataError, match="need at least 961,"):
        choose_index(100_000_000, 384, parse_bytes("900MB"))
    assert parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("2e9") == 2 * 10**9
    with pytest.raises(DataError, match="expected a size"):
        parse_bytes("lots")


@pytest.fixture(scope="module")
def clustered(tmp_path_factory: pytest.TempPathFactory) -> tuple[ShardSet, np.ndarray, np.ndarray]:
    """20,000 unit vectors around 200 centres in 5 shards of 4,000, and 100 queries near documents."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(200, 32))
    docs = centres[rng.integers(0, 200, 20_000)] + 0.4 * rng.normal(size=(20_000, 32))
    docs = (docs / np.linalg.norm(docs, axis=1, keepdims=True)).astype(np.float32)
    queries = docs[rng.choice(20_000, 100, replace=False)] + 0.2 * rng.normal(size=(100, 32)).astype(np.float32)
    shards = ShardSet(tmp_path_factory.mktemp("clustered") / "shards", 32, 4000)
    shards.append(docs, [Doc(f"d{i}", "", "") for i in range(len(docs))])
    return shards.finish(), docs, queries.astype(np.float32)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_lists_on_disk_give_the_in_memory_results(clustered, tmp_path: Path, kind: str) -> None:
    shards, docs, queries = clustered
    params = {"nlist": 128, "nprobe": 8, "pq_m": 8}
    in_ram = build_index(shards, None, kind, params, use_gpu=False, show_progress=False)
    disk = build_index(shards, None, kind, params, lists_dir=tmp_path / "lists", show_progress=False)
    assert in_ram.lists_on_disk is None and disk.lists_on_disk == str(tmp_path / "lists" / "lists.ivfdata")
    assert sorted(p.name for p in (tmp_path / "lists").iterdir()) == ["lists.ivfdata"]  # the parts are merged
    assert len(disk) == 20_000 and disk.doc_ids == in_ram.doc_ids == [f"d{i}" for i in range(20_000)]
    (scores, ids), (ram_scores, ram_ids) = disk.search(queries, 100), in_ram.search(queries, 100)
    np.testing.assert_array_equal(ids, ram_ids)
    np.testing.assert_allclose(scores, ram_scores, atol=1e-5)
    truth = np.argsort(-(queries @ docs.T), axis=1)[:, :100]
    assert 0.5 < recall(ids, truth) < 1.0  # approximate: the equality above means something
    loaded = DenseIndex.load(disk.save(tmp_path / "saved"), use_gpu=False)
    assert loaded.lists_on_disk == str(tmp_path / "saved" / "lists.ivfdata")
    np.testing.assert_array_equal(loaded.search(queries, 100)[1], ram_ids)


def test_a_shard_set_names_its_rows_and_must_be_complete(clustered, tmp_path: Path) -> None:
    shards, docs, _ = clustered
    with pytest.raises(ValueError, match="a shard set names its rows itself"):
        build_index(shards, ["d0"], show_progress=False)
    partial = ShardSet(tmp_path / "partial", 32, 4000)
    partial.append(docs[:10], [Doc(f"d{i}", "", "") for i in range(10)])
    with pytest.raises(DataError, match="the shard set is incomplete or empty"):
        build_index(partial, show_progress=False)


def test_ray_backend_without_ray_names_the_extra(
    corpus: Path, tiny_bert: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    args = ["--model", tiny_bert, "--corpus", str(corpus), "--output", str(tmp_path / "i"), "--backend", "ray"]
    assert index_command.main(args) == 1
    assert "needs Ray Data, which is not installed: pip install 'sbmoe[ray]'" in capsys.readouterr().err
