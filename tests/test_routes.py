"""A query-only model saves as a sentence-transformers Router: stock loading and sbmoe agree on every route."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sbmoe
from sbmoe.heads import HeadConfig

QUERIES = ["what drives cancer risk", "virus rna in blood"]
DOCS = ["the gene increase in patients", "a drug study of mice and human cells"]
STOCK = """
import json, sys
import numpy as np
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(sys.argv[1], trust_remote_code=True)
queries, docs = json.loads(sys.argv[2]), json.loads(sys.argv[3])
vectors = {"query": model.encode_query(queries), "document": model.encode_document(docs), "plain": model.encode(docs)}
np.savez(sys.argv[4], **vectors, modules=np.array([type(m).__name__ for m in model]))
"""


@pytest.fixture(scope="module")
def query_only(tiny_bert: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[sbmoe.SBMoEModel, Path]:
    model = sbmoe.build_model(tiny_bert, HeadConfig(num_experts=4, query_only=True, noise=False)).eval()
    path = tmp_path_factory.mktemp("routes") / "query-only"
    model.training_data = "scifact:train"
    model.save(str(path))
    return model, path


def test_saved_folder_is_a_router_with_one_shared_head(query_only: tuple[sbmoe.SBMoEModel, Path]) -> None:
    _, path = query_only
    modules = json.loads((path / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "TaskRouter"]
    router = json.loads((path / "2_TaskRouter" / "router_config.json").read_text())
    assert router["structure"] == {"query": ["query_0_SBMoEHead"], "document": ["query_0_SBMoEHead"]}
    assert router["parameters"]["default_route"] == "document"


def test_stock_loading_in_a_fresh_process_equals_sbmoe(
    query_only: tuple[sbmoe.SBMoEModel, Path], tmp_path: Path
) -> None:
    model, path = query_only
    out = tmp_path / "stock.npz"
    argv = [sys.executable, "-c", STOCK, str(path), json.dumps(QUERIES), json.dumps(DOCS), str(out)]
    subprocess.run(argv, check=True)
    stock = np.load(out)
    assert list(stock["modules"]) == ["Transformer", "Pooling", "TaskRouter"]
    np.testing.assert_allclose(stock["query"], model.encode_query(QUERIES), atol=1e-6)
    np.testing.assert_allclose(stock["document"], model.encode_document(DOCS), atol=1e-6)
    np.testing.assert_allclose(stock["plain"], model.encode_document(DOCS), atol=1e-6)  # the default route
    assert np.abs(model.encode_query(DOCS) - model.encode_document(DOCS)).max() > 1e-3  # the routes do differ


def test_load_model_unwraps_the_router_and_agrees(query_only: tuple[sbmoe.SBMoEModel, Path]) -> None:
    model, path = query_only
    own = sbmoe.load_model(str(path))
    assert isinstance(own[2], sbmoe.SBMoEHead) and own.head.query_only
    np.testing.assert_allclose(own.encode_query(QUERIES), model.encode_query(QUERIES), atol=1e-6)
    np.testing.assert_allclose(own.encode(DOCS), model.encode_document(DOCS), atol=1e-6)
    own.save(str(path.parent / "again"))
    assert (path.parent / "again" / "2_TaskRouter" / "router_config.json").is_file()


def test_model_card_says_how_to_load_and_what_the_head_does(query_only: tuple[sbmoe.SBMoEModel, Path]) -> None:
    _, path = query_only
    card = (path / "README.md").read_text()
    assert "pip install sbmoe" in card and "sbmoe.load_model" in card and "trust_remote_code=True" in card
    assert "4 experts" in card and "routing `learned`" in card and "takes the `document` route" in card
    assert "Training data: scifact:train." in card
    sbmoe.load_model(str(path)).save(str(path.parent / "resaved"))  # a reloaded card gets one section, not two
    assert (path.parent / "resaved" / "README.md").read_text().count("## Loading this sbmoe model") == 1
