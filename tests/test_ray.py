"""The ray backend on a local Ray instance (2 CPUs): the same embeddings and shards as single-process encoding."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_scale import all_rows

from sbmoe.commands import index as index_command
from sbmoe.data import load_corpus
from sbmoe.model import load_any_model
from sbmoe.retrieval import Retriever
from sbmoe.retrieval.encoder import Encoder, unit_rows
from sbmoe.retrieval.ray_encode import ray_encode_to_shards
from sbmoe.retrieval.shards import MANIFEST, ShardSet
from sbmoe.retrieval.stream import encode_to_shards

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'sbmoe[ray]'")

DOCS, SHARD = 200, 64


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    """One small local Ray instance for the module: 2 CPU slots (an actor and a read task), no dashboard."""
    ray.init(num_cpus=2, object_store_memory=80 * 2**20, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_scale import write_corpus

    return write_corpus(tmp_path_factory.mktemp("ray") / "corpus.jsonl", DOCS)


@pytest.fixture(scope="module")
def model(tiny_bert: str):
    torch.set_num_threads(1)
    return load_any_model(tiny_bert, device="cpu")


def test_ray_encoding_equals_single_process_in_the_same_order(model, tiny_bert: str, corpus: Path, tmp_path) -> None:
    shards = ray_encode_to_shards(model, tiny_bert, corpus.as_uri(), tmp_path / "ray", SHARD, workers=1)
    reference = Encoder(model, show_progress=False).encode(load_corpus(corpus), "corpus").vectors
    vectors, ids = all_rows(shards)
    assert ids == [f"d{i}" for i in range(DOCS)]  # read through fsspec from a file:// URL
    np.testing.assert_allclose(vectors, unit_rows(np.asarray(reference)), atol=1e-5)
    streamed = encode_to_shards(model, load_corpus(corpus), tmp_path / "stream", SHARD, show_progress=False)
    assert [vars(s) for s in shards.shards] == [vars(s) for s in streamed.shards]
    assert [shards.rows(s) for s in shards.shards] == [streamed.rows(s) for s in streamed.shards]


def test_ray_resumes_after_the_shards_already_written(model, tiny_bert: str, corpus: Path, tmp_path: Path) -> None:
    whole = encode_to_shards(model, load_corpus(corpus), tmp_path / "s", SHARD, show_progress=False)
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    manifest.update(shards=manifest["shards"][:2], complete=False, count=128)  # as a run killed after shard 2
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(manifest))
    (tmp_path / "s" / "00002.npy").unlink()
    before = whole.vectors(whole.shards[0]).copy()
    resumed = ray_encode_to_shards(model, tiny_bert, str(corpus), tmp_path / "s", SHARD, workers=1)
    assert [s.count for s in resumed.shards] == [64, 64, 64, 8] and resumed.complete
    np.testing.assert_array_equal(resumed.vectors(resumed.shards[0]), before)
    np.testing.assert_allclose(resumed.vectors(resumed.shards[2]), whole.vectors(whole.shards[2]), atol=1e-5)


def test_index_command_ray_backend_reads_parquet(tiny_bert: str, corpus: Path, tmp_path: Path) -> None:
    docs = [json.loads(line) for line in corpus.read_text().splitlines()]
    parquet = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": [d["_id"] for d in docs], "text": [d["text"] for d in docs]}), parquet)
    args = ["--model", tiny_bert, "--corpus", str(parquet), "--quiet", "--shard-size", "50"]
    assert index_command.main([*args, "--output", str(tmp_path / "ray"), "--backend", "ray"]) == 0
    assert index_command.main([*args, "--output", str(tmp_path / "local")]) == 0
    got, want = Retriever.load(tmp_path / "ray"), Retriever.load(tmp_path / "local")
    queries = [d["text"] for d in docs[:10]]
    for hits, local_hits in zip(got.search(queries, 5), want.search(queries, 5), strict=True):
        assert [h.id for h in hits] == [h.id for h in local_hits]
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in local_hits], atol=1e-5)
    assert len(ShardSet.open(tmp_path / "ray.shards").shards) == 4
