"""One call builds a large index: ``Retriever.build(..., backend="stream", ram_budget=...)``, and the index table
that checks parameters without building anything."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
from test_scale import write_corpus

from sbmoe.data import DataError
from sbmoe.retrieval import Retriever
from sbmoe.retrieval.faiss_types import FACTORY, FAISS_CLASSES, INDEX_TYPES, check_index_params, new_faiss
from sbmoe.retrieval.shards import ShardSet

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def test_the_stream_backend_in_one_call_equals_the_local_build(tiny_bert: str, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus.jsonl", count=120)
    local = Retriever.build(tiny_bert, corpus, show_progress=False)
    stream = Retriever.build(
        tiny_bert,
        corpus,
        backend="stream",
        ram_budget="1MB",
        shards=tmp_path / "s",
        shard_size=50,
        show_progress=False,
    )
    assert len(ShardSet.open(tmp_path / "s").shards) == 3
    assert stream.index.index_type == "flat" and stream.index_choice.reason.startswith("120 vectors: exact search")
    assert local.index_choice is None and len(stream) == len(local) == 120
    queries = ["alpha beta", "gamma delta epsilon"]
    for got, want in zip(stream.search(queries, 5), local.search(queries, 5), strict=True):
        assert [h.id for h in got] == [h.id for h in want]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)


def test_build_refuses_options_its_backend_does_not_take(tiny_bert: str, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus.jsonl", count=5)
    with pytest.raises(ValueError, match="ram_budget, shards and ray need backend='stream' or 'ray'"):
        Retriever.build(tiny_bert, corpus, ram_budget="1GB")
    with pytest.raises(ValueError, match="backend='stream' needs shards=FOLDER"):
        Retriever.build(tiny_bert, corpus, backend="stream")
    with pytest.raises(ValueError, match="unknown backend 'spark'"):
        Retriever.build(tiny_bert, corpus, backend="spark", shards=tmp_path / "s")
    with pytest.raises(ValueError, match="unknown index type 'annoy'"):
        Retriever.build(tiny_bert, corpus, "annoy")


def test_index_parameters_are_checked_without_an_index() -> None:
    check_index_params("ivf", {"nlist": 4, "nprobe": None})
    with pytest.raises(ValueError, match="unknown index type 'lsh'"):
        check_index_params("lsh", {})
    with pytest.raises(ValueError, match=r"unknown index parameters \['nprobes'\]"):
        check_index_params("ivf", {"nprobes": 4})
    for bad in (0, -3, True, 2.5):
        with pytest.raises(DataError, match=f"nlist={bad!r}: expected a positive integer"):
            check_index_params("ivf", {"nlist": bad})


@pytest.mark.parametrize("index_type", INDEX_TYPES)
def test_each_factory_string_gives_the_class_a_saved_index_reads_back_as(index_type: str) -> None:
    params = {"hnsw_m": 8, "ef_construction": 40, "nlist": 4, "pq_m": 4, "pq_bits": 4}
    index = new_faiss(index_type, 16, params)
    if index_type == "binary":
        found = type(faiss.deserialize_index_binary(faiss.serialize_index_binary(index))).__name__
    else:
        found = type(faiss.downcast_index(faiss.deserialize_index(faiss.serialize_index(index)))).__name__
    assert found in FAISS_CLASSES[index_type] and FACTORY[index_type]
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT or index_type == "binary"
