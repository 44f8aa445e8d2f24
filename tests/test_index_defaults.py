"""IVF defaults that scale with the corpus, the exact-search fallback on small ones, and impossible settings."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import write_beir_slice

from sbmoe.cli import main as cli_main
from sbmoe.data import DataError
from sbmoe.evaluation.report import markdown_table
from sbmoe.retrieval.build import build_index
from sbmoe.retrieval.index import DenseIndex
from sbmoe.retrieval.ivf import EXACT_BELOW, filled_params, ivf_defaults, searches_exactly

DIM = 32
FALLBACK_WARNING = (
    "{type} index on 300 vectors: searching exactly (flat) instead: below 16384 vectors IVF would have to scan at "
    "least half of them (default: 7 of 7 lists) to find the top results reliably; pass nlist to force IVF"
)


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def clustered(n: int, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors around 60 centres (neighbour structure, like document embeddings)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(60, DIM))
    x = centres[rng.integers(0, 60, n)] + 0.35 * rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def small() -> tuple[np.ndarray, np.ndarray]:
    """300 documents and 40 queries."""
    return clustered(300), clustered(40, seed=1)


def test_defaults_scale_with_the_corpus() -> None:
    """nlist = min(4 sqrt(n), n / 39); nprobe scans at least 8,192 vectors, at least an eighth of the lists."""
    assert ivf_defaults(300) == (7, 7)
    assert ivf_defaults(5183) == (132, 132)  # SciFact: IVF would probe every list
    assert ivf_defaults(EXACT_BELOW) == (420, 210)  # the fallback threshold: exactly half the lists
    assert ivf_defaults(20_000) == (512, 210)
    assert ivf_defaults(100_000) == (1264, 158)  # large corpora keep nlist / 8
    assert ivf_defaults(1_000_000) == (4000, 500)


def test_filled_params_choose_ivf_defaults_or_exact_search_and_leave_other_types_alone() -> None:
    assert [searches_exactly("ivf", n, None) for n in (300, EXACT_BELOW - 1, EXACT_BELOW)] == [True, True, False]
    assert not searches_exactly("ivfpq", 300, 4) and not searches_exactly("hnsw", 300, None)
    requested = {"nlist": None, "nprobe": None, "pq_m": None, "pq_bits": 8}
    filled = filled_params("ivfpq", 384, 20_000, 20_000, requested)
    assert filled == {"nlist": 512, "nprobe": 210, "pq_m": 96, "pq_bits": 8}
    assert filled_params("ivfpq", 384, 300, 300, requested) == {**dict.fromkeys(requested), "fallback": "flat"}
    assert filled_params("ivf", 32, 300, 300, {"nlist": 4, "nprobe": None}) == {"nlist": 4, "nprobe": 4}
    hnsw = {"hnsw_m": 32, "ef_construction": 200, "ef_search": 256}
    assert filled_params("hnsw", 32, 300, 300, hnsw) == hnsw
    assert requested == {"nlist": None, "nprobe": None, "pq_m": None, "pq_bits": 8}  # the request is not changed


@pytest.mark.parametrize("index_type", ["ivf", "ivfpq"])
def test_small_corpus_falls_back_to_exact_search_and_says_so(
    small: tuple[np.ndarray, np.ndarray], index_type: str, caplog: pytest.LogCaptureFixture
) -> None:
    docs, queries = small
    flat = build_index(docs, use_gpu=False, show_progress=False)
    with caplog.at_level(logging.WARNING, logger="sbmoe.retrieval.index"):
        index = build_index(docs, None, index_type, use_gpu=False, show_progress=False)
    assert caplog.messages == [FALLBACK_WARNING.format(type=index_type)]
    assert (index.index_type, index.structure, index.params["fallback"]) == (index_type, "flat", "flat")
    assert {v for k, v in index.params.items() if k != "fallback"} == {None}
    for got, expected in zip(index.search(queries, 10), flat.search(queries, 10), strict=True):
        np.testing.assert_array_equal(got, expected)


def test_fallback_is_saved_reloaded_and_shown_in_the_result_table(
    small: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    docs, queries = small
    index = build_index(docs, None, "ivf", use_gpu=False, show_progress=False)
    index.save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert (manifest["type"], manifest["params"]) == ("ivf", {"nlist": None, "nprobe": None, "fallback": "flat"})
    loaded = DenseIndex.load(tmp_path / "idx", use_gpu=False)
    assert (loaded.index_type, loaded.structure, loaded.params) == ("ivf", "flat", index.params)
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], index.search(queries, 10)[1])
    result = {
        "dataset": "d",
        "split": "test",
        "num_queries": 40,
        "num_docs": 300,
        "metrics": {"nDCG@10": 0.5},
        "index": {"type": loaded.index_type, "params": loaded.params},
    }
    assert "| ivf fallback=flat | 40 | 300 | 0.5000 |" in markdown_table("m", [result])


def test_a_larger_corpus_keeps_ivf_with_the_scaled_nprobe() -> None:
    """20,000 vectors: 512 lists, 210 probed (41%, was 64); the same object first fell back on 300 vectors."""
    docs, queries = clustered(20_000), clustered(50, seed=1)
    index = build_index(docs[:300], None, "ivf", use_gpu=False, show_progress=False)
    assert index.structure == "flat"
    index = build_index(docs, None, "ivf", use_gpu=False, show_progress=False)  # decided again, from the size
    assert (index.structure, index.params) == ("ivf", {"nlist": 512, "nprobe": 210})
    _, found = index.search(queries, 100)
    _, truth = build_index(docs, use_gpu=False, show_progress=False).search(queries, 100)
    recall = np.mean([len(set(f) & set(t)) / 100 for f, t in zip(found, truth, strict=True)])
    assert recall >= 0.98


def test_explicit_nlist_forces_ivf_on_a_small_corpus(small: tuple[np.ndarray, np.ndarray]) -> None:
    docs, _ = small
    index = build_index(docs, None, "ivf", {"nlist": 4}, use_gpu=False, show_progress=False)
    assert (index.structure, index.params) == ("ivf", {"nlist": 4, "nprobe": 4})  # 8,192 vectors' worth: all
    assert index.faiss_index.nlist == 4


@pytest.mark.parametrize(
    ("index_type", "params", "message"),
    [
        (
            "ivf",
            {"nlist": 400},
            "nlist=400: 400 lists need at least 400 training vectors, got 300; lower nlist "
            "(faiss advises 39 vectors per list: nlist=7) or leave it out to get a default",
        ),
        ("ivfpq", {"nlist": 4, "pq_m": 5}, "pq_m=5 does not divide the dimension 32; divisors: 1, 2, 4, 8, 16, 32"),
        ("ivf", {"nlist": 4, "nprobe": 5}, "nprobe=5 > nlist=4: a search cannot probe more lists than there are"),
        (
            "ivfpq",
            {"nlist": 4, "pq_bits": 9},
            "pq_bits=9: 512 centroids per sub-quantizer need at least 512 "
            "training vectors, got 300; lower pq_bits (at most 8 here)",
        ),
    ],
)
def test_settings_the_corpus_cannot_satisfy_name_the_numbers(
    small: tuple[np.ndarray, np.ndarray], index_type: str, params: dict, message: str
) -> None:
    with pytest.raises(DataError, match=f"^{re.escape(message)}"):
        build_index(small[0], None, index_type, params, use_gpu=False, show_progress=False)


def test_nprobe_above_the_default_nlist_is_refused_at_training() -> None:
    with pytest.raises(DataError) as info:
        build_index(clustered(20_000), None, "ivf", {"nprobe": 600}, use_gpu=False, show_progress=False)
    message = "nprobe=600 > nlist=512 (the default for 20000 vectors): a search cannot probe more lists than there are"
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"nprobe": 0}, "index parameter nprobe=0: expected a positive integer"),
        ({"hnsw_m": 0}, "index parameter hnsw_m=0: expected a positive integer"),  # faiss would abort the process
        ({"nlist": 2.5}, "index parameter nlist=2.5: expected a positive integer"),
        ({"rescore": True}, "index parameter rescore=True: expected a positive integer"),
    ],
)
def test_impossible_settings_are_refused_at_once(params: dict, message: str) -> None:
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        DenseIndex(DIM, "ivfpq", use_gpu=False, **params)


def test_cli_reports_an_impossible_nlist_in_one_line(
    tiny_bert: str, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = write_beir_slice(tmp_path / "scifact300", shared_data, 40, 300)
    argv = [
        "evaluate",
        "--model",
        tiny_bert,
        "--datasets",
        str(data),
        "--index",
        "ivf",
        "--index-param",
        "nlist=400",
        "--output",
        str(tmp_path / "out.json"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--quiet",
    ]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("sbmoe evaluate: error: nlist=400: 400 lists need at least 400 training vectors, got 300;")
