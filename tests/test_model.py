"""build_model and the sentence-transformers contract: encode, save/reload, BEIR protocol, backbones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

import sbmoe
from sbmoe.backbones import BackboneUnavailableError, resolve_backbone
from sbmoe.heads import HeadConfig

TEXTS = ["cells and genes", "the protein increase in blood", "a drug study of mice", "dna"]
DOCS = [{"title": "cancer risk", "text": "patients with the gene"}, {"title": "", "text": "virus rna"}]


@pytest.fixture(scope="module")
def tiny_model(tiny_bert: str) -> sbmoe.SBMoEModel:
    return sbmoe.build_model(tiny_bert, HeadConfig(num_experts=4, top_k=2)).eval()


def test_build_model_shapes_and_head(tiny_model: sbmoe.SBMoEModel) -> None:
    emb = tiny_model.encode(TEXTS)
    assert emb.shape == (4, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert isinstance(tiny_model.head, sbmoe.SBMoEHead)
    assert tiny_model.get_embedding_dimension() == 32


def test_headless_model_has_no_head(tiny_bert: str) -> None:
    plain = sbmoe.build_model(tiny_bert)
    assert plain.head is None
    assert plain.encode(TEXTS).shape == (4, 32)


def test_save_and_reload_give_identical_embeddings(tiny_model: sbmoe.SBMoEModel, tmp_path: Path) -> None:
    expected = tiny_model.encode(TEXTS)
    tiny_model.save(str(tmp_path / "m"))
    reloaded = SentenceTransformer(str(tmp_path / "m"), trust_remote_code=True)
    np.testing.assert_allclose(reloaded.encode(TEXTS), expected, atol=1e-6)
    own = sbmoe.load_model(str(tmp_path / "m"))
    np.testing.assert_allclose(own.encode(TEXTS), expected, atol=1e-6)
    assert own.head.get_config_dict() == tiny_model.head.get_config_dict()


def test_plain_reload_without_trust_names_the_flag(tiny_model: sbmoe.SBMoEModel, tmp_path: Path) -> None:
    """sentence-transformers >= 6 imports no class outside its namespace without trust_remote_code."""
    tiny_model.save(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        SentenceTransformer(str(tmp_path / "m"))


def test_eval_encoding_is_deterministic_and_batch_invariant(tiny_model: sbmoe.SBMoEModel) -> None:
    batch = tiny_model.encode(TEXTS, batch_size=4)
    np.testing.assert_array_equal(tiny_model.encode(TEXTS, batch_size=4), batch)
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(tiny_model.encode([text])[0], batch[i], atol=1e-5)


def test_beir_protocol_matches_encode(tiny_model: sbmoe.SBMoEModel) -> None:
    np.testing.assert_allclose(tiny_model.encode_queries(TEXTS), tiny_model.encode_query(TEXTS), atol=1e-6)
    expected = tiny_model.encode_document(["cancer risk patients with the gene", "virus rna"])
    np.testing.assert_allclose(tiny_model.encode_corpus(DOCS), expected, atol=1e-6)
    columns = {"title": [d["title"] for d in DOCS], "text": [d["text"] for d in DOCS]}
    np.testing.assert_allclose(tiny_model.encode_corpus(columns), expected, atol=1e-6)


def test_expert_index_is_the_most_probable_expert(tiny_model: sbmoe.SBMoEModel) -> None:
    per_text = tiny_model.encode(TEXTS, output_value=None)
    assert [int(row["expert_index"]) for row in per_text] == [
        int(np.argmax(row["router_probs"].numpy())) for row in per_text
    ]


def test_unreachable_hub_fails_at_once_with_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("sbmoe.backbones._is_cached", lambda hub_id: False)
    with pytest.raises(BackboneUnavailableError, match="not reachable.*local-dir"):
        resolve_backbone("no-such-org/no-such-encoder")
    with pytest.raises(BackboneUnavailableError, match="'tinybert' \\(huawei-noah/TinyBERT_General_4L_312D\\)"):
        sbmoe.build_model("tinybert")


def test_local_folder_backbone_resolves_to_itself(tiny_bert: str) -> None:
    assert resolve_backbone(tiny_bert) == tiny_bert


def test_minilm_round_trip_and_plain_backbone(tmp_path: Path) -> None:
    """The real offline default: head on MiniLM saves and reloads exactly; no head is all-MiniLM-L6-v2."""
    model = sbmoe.build_model("minilm", HeadConfig(num_experts=6)).eval()
    expected = model.encode(TEXTS)
    model.save(str(tmp_path / "minilm-sbmoe"))
    reloaded = SentenceTransformer(str(tmp_path / "minilm-sbmoe"), trust_remote_code=True)
    np.testing.assert_allclose(reloaded.encode(TEXTS), expected, atol=1e-6)
    reference = SentenceTransformer(resolve_backbone("minilm"))
    plain = sbmoe.build_model("minilm")
    np.testing.assert_allclose(plain.encode(TEXTS), reference.encode(TEXTS), atol=1e-6)


def test_tiny_backbone_tokenizes_real_words(tiny_bert: str, tiny_model: sbmoe.SBMoEModel) -> None:
    """Guard for the fixture itself: distinct texts give distinct token ids and distinct embeddings."""
    tokens = tiny_model.tokenize(TEXTS[:2])["input_ids"]
    assert 1 not in tokens[0].tolist()  # no [UNK]
    emb = tiny_model.encode(TEXTS)
    assert np.abs(emb[0] - emb[1]).max() > 1e-3
