"""The token-state cache of frozen bottom layers: the states it serves are the frozen layers' real output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import test_finetune
import torch
from conftest import write_tiny_bert
from safetensors.torch import load_file
from test_finetune import make_args

from sbmoe.heads import MoELayersConfig
from sbmoe.model import build_model
from sbmoe.training.frozen_bottom import FrozenBottom, StateStore, frozen_fingerprint, open_store
from sbmoe.training.runner import run

toy_beir = test_finetune.toy_beir  # the same toy BEIR folder fixture

TEXTS = [
    "the protein increase in cells",
    "brain",
    "a study of blood risk in patients with disease and treatment effects on the human virus",
    "mice dna rna",
    "gene genes cancer drug",
]


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_bert(tmp_path_factory.mktemp("bert4"), layers=4, seed=3))


def encode(model, texts: list[str], batch_size: int) -> np.ndarray:
    return model.encode(texts, batch_size=batch_size, convert_to_numpy=True)


def test_cached_states_equal_the_frozen_layers_output(four_layers: str) -> None:
    model = build_model(four_layers, device="cpu")
    model.eval()
    reference = encode(model, TEXTS, batch_size=5)
    hf = model[0].auto_model
    with FrozenBottom(hf, 2, StateStore(hf.config.hidden_size)) as bottom:
        first = encode(model, TEXTS, batch_size=5)  # every row computed, then stored
        assert bottom.stats() == {"frozen_layers": 2, "hits": 0, "misses": 5}
        again = encode(model, TEXTS[::-1], batch_size=2)[::-1]  # other batches, other padding: all looked up
        assert bottom.hits == 5 and bottom.misses == 5
    np.testing.assert_allclose(first, reference, atol=1e-5)
    np.testing.assert_allclose(again, reference, atol=1e-5)
    np.testing.assert_allclose(encode(model, TEXTS, batch_size=5), reference, atol=1e-6)  # restored on exit


def test_only_the_layers_above_are_trained_and_everything_is_restored(four_layers: str) -> None:
    model = build_model(four_layers, moe=MoELayersConfig(moe_layers="2,3", num_experts=2), device="cpu")
    hf = model[0].auto_model
    keys = list(model.state_dict())
    model.train()
    with FrozenBottom(hf, 2, StateStore(hf.config.hidden_size)) as bottom:
        assert list(model.state_dict()) == keys  # nothing replaced: saving and checkpoints see the same model
        features = model.preprocess(TEXTS)
        out = model(features)["sentence_embedding"]
        out.pow(2).sum().backward()
        frozen = {id(p) for p in bottom.frozen_parameters()}
    assert all(p.grad is None for p in hf.parameters() if id(p) in frozen)
    assert all(p.grad is not None for layer in hf.encoder.layer[2:] for p in layer.parameters())
    assert all(p.requires_grad for p in hf.parameters())


def test_a_sqlite_store_serves_a_later_run_and_is_named_by_the_frozen_weights(four_layers: str, tmp_path: Path):
    model = build_model(four_layers, device="cpu")
    model.eval()
    hf = model[0].auto_model
    reference = encode(model, TEXTS, batch_size=5)
    for expected_hits in (0, 5):
        store = open_store(hf, 2, tmp_path)
        with FrozenBottom(hf, 2, store) as bottom:
            np.testing.assert_allclose(encode(model, TEXTS, batch_size=3), reference, atol=1e-5)
        assert bottom.hits == expected_hits
    assert [p.name for p in tmp_path.iterdir()] == [f"{frozen_fingerprint(hf, 2)}.sqlite"]
    assert frozen_fingerprint(hf, 1) != frozen_fingerprint(hf, 2)
    with torch.no_grad():
        hf.encoder.layer[1].output.dense.bias.add_(1.0)  # other frozen weights, another store
    assert frozen_fingerprint(hf, 2) != Path(store.path).stem


def test_the_memory_store_stops_at_its_byte_budget() -> None:
    store = StateStore(hidden=4, memory_bytes=3 * 4 * 4)
    two, one = np.ones((2, 4), np.float32), np.ones((1, 4), np.float32)
    store.put_many({b"a": two, b"b": two, b"c": one})  # b would pass the 48-byte budget; c still fits
    assert sorted(store.get_many([b"a", b"b", b"c"])) == [b"a", b"c"]


def test_impossible_frozen_bottoms_are_refused(four_layers: str) -> None:
    model = build_model(four_layers, moe=MoELayersConfig(moe_layers="1,3", num_experts=2), device="cpu")
    hf = model[0].auto_model
    with pytest.raises(ValueError, match="hold MoE layers"):
        FrozenBottom(hf, 2, StateStore(8))
    with pytest.raises(ValueError, match="must be 1..3"):
        FrozenBottom(hf, 4, StateStore(8))


def test_finetune_trains_only_the_layers_above_and_reuses_states_across_runs(
    four_layers: str, toy_beir: Path, tmp_path: Path
) -> None:
    options = {"train": "full", "head": "none", "moe_layers": "2,3", "num_experts": 2, "frozen_layers": 2}
    options.update(max_steps=3, save_steps=100, token_cache_dir=str(tmp_path / "states"))
    first = run(make_args(four_layers, toy_beir, tmp_path, **options))
    before = load_file(str(Path(four_layers) / "model.safetensors"))
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    frozen = [k for k in before if k.startswith(("embeddings.", "encoder.layer.0.", "encoder.layer.1."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    moved = ("encoder.layer.2.attention.self.query.weight", "encoder.layer.3.attention.output.dense.weight")
    assert all(not torch.equal(before[k], after[k]) for k in moved)
    assert first["frozen_bottom"]["frozen_layers"] == 2 and first["frozen_bottom"]["misses"] > 0
    second = run(make_args(four_layers, toy_beir, tmp_path, overwrite=True, **options))
    assert second["frozen_bottom"]["misses"] == 0  # every text's states came from the first run's store
    assert second["eval"][f"{toy_beir}:test"]["metrics"] == first["eval"][f"{toy_beir}:test"]["metrics"]
    with pytest.raises(ValueError, match="--train full"):
        make_args(four_layers, toy_beir, tmp_path, frozen_layers=2)


def test_loss_and_gradients_with_cached_states_equal_running_the_frozen_layers(four_layers: str) -> None:
    model = build_model(four_layers, device="cpu")
    model.eval()  # dropout off: the frozen layers run in eval mode under the cache, so compare in eval mode
    hf = model[0].auto_model

    def loss_and_grads() -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        queries = model(model.preprocess(TEXTS[:3]))["sentence_embedding"]
        docs = model(model.preprocess(TEXTS[2:]))["sentence_embedding"]
        loss = torch.nn.functional.cross_entropy(queries @ docs.T / 0.05, torch.arange(3))
        loss.backward()
        return loss.item(), [p.grad.clone() for layer in hf.encoder.layer[2:] for p in layer.parameters()]

    plain_loss, plain_grads = loss_and_grads()
    with FrozenBottom(hf, 2, StateStore(hf.config.hidden_size)) as bottom:
        loss_and_grads()  # fills the store
        cached_loss, cached_grads = loss_and_grads()
        assert bottom.hits == 1 + 6  # TEXTS[2] is a query and a document: found on its second use already
    assert cached_loss == pytest.approx(plain_loss, abs=1e-5)
    for cached, plain in zip(cached_grads, plain_grads, strict=True):
        torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-4)
