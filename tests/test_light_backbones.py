"""minilm-l3 / minilm-l2: all-MiniLM-L6-v2 cut to its first 3 / 2 layers, the offline stand-ins for TinyBERT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

from sbmoe.backbones import KNOWN_NAMES, resolve_backbone
from sbmoe.commands.finetune import main as finetune_main
from sbmoe.heads import HeadConfig
from sbmoe.model import SBMoEModel, build_model, load_any_model
from sbmoe.retrieval.cache import model_fingerprint

TEXTS = ["cells and genes", "the protein increase in blood of patients", "a drug study of mice"]
MINILM_PARAMETERS = 22_713_216
LAYER_PARAMETERS = 1_774_464  # one MiniLM layer: attention 4 x (384 x 384 + 384), 2 LayerNorms, 384 <-> 1536 MLP


def layers(model: SentenceTransformer) -> int:
    """Transformer layers of a model's encoder, checked against its config."""
    encoder = model[0].auto_model
    assert encoder.config.num_hidden_layers == len(encoder.encoder.layer)
    return len(encoder.encoder.layer)


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def minilm() -> SBMoEModel:
    return build_model("minilm", normalize=False).eval()


@pytest.fixture(scope="module")
def minilm_l3() -> SBMoEModel:
    return build_model("minilm-l3", normalize=False).eval()


@pytest.fixture(scope="module")
def minilm_l2() -> SBMoEModel:
    return build_model("minilm-l2", normalize=False).eval()


def test_light_backbones_are_known_names() -> None:
    assert KNOWN_NAMES[:3] == ("minilm", "minilm-l3", "minilm-l2")
    assert resolve_backbone("minilm-l3") == resolve_backbone("minilm-l2") == resolve_backbone("minilm")


def test_light_backbones_keep_their_first_layers(
    minilm: SBMoEModel, minilm_l3: SBMoEModel, minilm_l2: SBMoEModel
) -> None:
    assert (layers(minilm), layers(minilm_l3), layers(minilm_l2)) == (6, 3, 2)
    assert parameters(minilm) == MINILM_PARAMETERS
    assert parameters(minilm) - parameters(minilm_l3) == parameters(minilm[0].auto_model.encoder.layer[3:])
    assert parameters(minilm_l3) == MINILM_PARAMETERS - 3 * LAYER_PARAMETERS == 17_389_824
    assert parameters(minilm_l2) == MINILM_PARAMETERS - 4 * LAYER_PARAMETERS == 15_615_360
    for name, tensor in minilm_l3.state_dict().items():  # the kept layers are MiniLM's, unchanged
        assert torch.equal(tensor, minilm.state_dict()[name]), name


def test_embeddings_are_minilm_layer_3_mean_pooled(minilm: SBMoEModel, minilm_l3: SBMoEModel) -> None:
    """The reference runs the full MiniLM and mean-pools its third layer's output over the real tokens."""
    path = resolve_backbone("minilm")
    tokenizer, encoder = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch, output_hidden_states=True).hidden_states[3]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    reference = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    np.testing.assert_allclose(minilm_l3.encode(TEXTS), reference, atol=1e-5)
    assert np.abs(minilm_l3.encode(TEXTS) - minilm.encode(TEXTS)).max() > 0.1  # not the 6-layer output


def test_saved_light_backbone_reloads_as_a_3_layer_model(minilm_l3: SBMoEModel, tmp_path: Path) -> None:
    minilm_l3.save(str(tmp_path / "l3"))
    assert json.loads((tmp_path / "l3" / "config.json").read_text())["num_hidden_layers"] == 3
    weights = load_file(str(tmp_path / "l3" / "model.safetensors"))
    saved_layers = {key.split(".")[2] for key in weights if key.startswith("encoder.layer.")}
    assert saved_layers == {"0", "1", "2"}
    expected = minilm_l3.encode(TEXTS)
    for reloaded in (load_any_model(str(tmp_path / "l3")), SentenceTransformer(str(tmp_path / "l3"))):
        assert layers(reloaded) == 3
        np.testing.assert_allclose(reloaded.encode(TEXTS), expected, atol=1e-6)


def test_light_backbone_with_a_head_saves_and_reloads(tmp_path: Path) -> None:
    model = build_model("minilm-l2", HeadConfig(num_experts=3)).eval()
    assert (layers(model), model.head.num_experts, model.get_embedding_dimension()) == (2, 3, 384)
    model.save(str(tmp_path / "l2-sbmoe"))
    reloaded = load_any_model(str(tmp_path / "l2-sbmoe"))
    assert layers(reloaded) == 2 and reloaded.head is not None
    np.testing.assert_allclose(reloaded.encode(TEXTS), model.encode(TEXTS), atol=1e-6)


def test_plain_light_backbone_by_name_is_normalised() -> None:
    model = load_any_model("minilm-l3-plain")
    assert layers(model) == 3
    np.testing.assert_allclose(np.linalg.norm(model.encode(TEXTS), axis=1), 1.0, atol=1e-6)


def test_each_backbone_gets_its_own_embedding_cache_key(
    minilm: SBMoEModel, minilm_l3: SBMoEModel, minilm_l2: SBMoEModel, tmp_path: Path
) -> None:
    keys = [model_fingerprint(m) for m in (minilm, minilm_l3, minilm_l2)]
    assert len(set(keys)) == 3
    assert model_fingerprint(build_model("minilm-l3", normalize=False)) == keys[1]
    minilm_l3.save(str(tmp_path / "l3"))
    assert model_fingerprint(load_any_model(str(tmp_path / "l3"))) == keys[1]  # a saved copy shares the entries


def test_finetune_on_a_light_backbone_saves_a_3_layer_model(tmp_path: Path) -> None:
    data = toy_beir(tmp_path / "toy")
    argv = [
        "--backbone",
        "minilm-l3",
        "--train-data",
        f"{data}:train",
        "--output-dir",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--num-experts",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--max-seq-length",
        "32",
        "--hard-negatives",
        "0",
        "--dev-queries",
        "0",
    ]
    assert finetune_main(argv) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    model = load_any_model(str(tmp_path / "out"))
    assert layers(model) == 3 and model.head.num_experts == 2


def toy_beir(folder: Path) -> Path:
    """A BEIR folder of 16 documents and 16 training queries, one relevant document each."""
    topics = ["cancer cell protein gene", "brain blood disease risk", "virus dna rna human", "drug mice study"]
    (folder / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": "", "text": f"{topics[i % 4]} {i}"} for i in range(16)]
    queries = [{"_id": f"q{i}", "text": topics[i % 4].split()[i % 3]} for i in range(16)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    qrels = "".join(f"q{i}\td{i}\t1\n" for i in range(16))
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)
    return folder
