"""The int8 ONNX encoder as a saved model: ``sbmoe quantize --encoder onnx-int8`` writes a folder that reloads with
its backbone running through the int8 file, giving what the in-memory swap gives."""

from __future__ import annotations

import os

import pytest
import torch

import sbmoe
from sbmoe.commands.quantize import main as quantize_main
from sbmoe.heads import HeadConfig, MoELayersConfig
from sbmoe.model import build_model, load_any_model
from sbmoe.retrieval.cache import model_fingerprint

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from sbmoe.quant.encoder import OnnxTransformer, OrtEncoder, with_encoder  # noqa: E402

TEXTS = ["the protein increases cancer risk", "mice blood cells", "a study of brain disease", "dna virus genes"]


def test_saved_int8_encoder_matches_the_in_memory_one(tiny_bert, tmp_path) -> None:
    torch.manual_seed(0)
    build_model(tiny_bert, HeadConfig(num_experts=4), max_seq_length=32, device="cpu").save(str(tmp_path / "fp32"))
    in_memory = with_encoder(sbmoe.load_model(str(tmp_path / "fp32"), device="cpu"), "onnx-int8", tmp_path / "x")
    expected = in_memory.encode(TEXTS, task="query", convert_to_tensor=True)
    out = tmp_path / "int8"
    assert quantize_main(["--model", str(tmp_path / "fp32"), "--output", str(out), "--encoder", "onnx-int8"]) == 0
    assert "model_int8.onnx" in os.listdir(out) and "model.onnx" not in os.listdir(out)
    assert not [name for name in os.listdir(out) if name.endswith((".safetensors", ".bin"))]  # no unused fp32 weights
    for loaded in (sbmoe.load_model(str(out), device="cpu"), load_any_model(str(out), device="cpu")):  # and index
        assert isinstance(loaded[0], OnnxTransformer) and isinstance(loaded[0].model, OrtEncoder)
        assert torch.equal(loaded.encode(TEXTS, task="query", convert_to_tensor=True), expected)
    fp32 = sbmoe.load_model(str(tmp_path / "fp32"), device="cpu")
    assert not torch.equal(fp32.encode(TEXTS, task="query", convert_to_tensor=True), expected)  # really int8
    loaded.save(str(tmp_path / "again"))  # saves the int8 file, config and tokenizer again
    again = sbmoe.load_model(str(tmp_path / "again"), device="cpu")
    assert torch.equal(again.encode(TEXTS, task="query", convert_to_tensor=True), expected)
    assert model_fingerprint(again) == model_fingerprint(loaded) != model_fingerprint(fp32)


def test_onnx_encoders_differ_in_cache_fingerprint_and_moe_backbones_are_refused(tiny_bert, tmp_path, capsys) -> None:
    torch.manual_seed(0)
    build_model(tiny_bert, HeadConfig(num_experts=4), max_seq_length=32, device="cpu").save(str(tmp_path / "a"))
    torch.manual_seed(1)
    build_model(tiny_bert, HeadConfig(num_experts=4), max_seq_length=32, device="cpu").save(str(tmp_path / "b"))
    for name in ("a", "b"):
        assert (
            quantize_main(
                ["--model", str(tmp_path / name), "--output", str(tmp_path / f"{name}8"), "--encoder", "onnx-fp32"]
            )
            == 0
        )
    a, b = (sbmoe.load_model(str(tmp_path / f"{n}8"), device="cpu") for n in ("a", "b"))
    assert model_fingerprint(a) != model_fingerprint(b)  # no parameters in the session: its file's digest counts
    build_model(tiny_bert, moe=MoELayersConfig(moe_layers="all", num_experts=4), max_seq_length=32, device="cpu").save(
        str(tmp_path / "m")
    )
    argv = ["--model", str(tmp_path / "m"), "--output", str(tmp_path / "m8"), "--encoder", "onnx-int8"]
    assert quantize_main(argv) == 2
    assert "only a plain Transformer backbone" in capsys.readouterr().err
