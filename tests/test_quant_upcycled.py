"""Quantizing the experts of upcycled encoder layers: routed-token calibration, one plan over head and layers,
packed saving and identical reloading."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import sbmoe
from sbmoe.commands.quantize import main as quantize_main
from sbmoe.heads import HeadConfig, MoELayersConfig
from sbmoe.heads.moe_block import MoEBlock
from sbmoe.model import build_model
from sbmoe.quant import PackedLinear, choose_plan
from sbmoe.quant.calibrate import capture_inputs, routed_frequencies
from sbmoe.quant.linear import expert_linears
from sbmoe.quant.recipe import calibrate_layers, quantize_model
from sbmoe.quant.transformer import QuantizedMoETransformer

TEXTS = ["the protein increases cancer risk", "mice blood cells", "a study of brain disease", "dna virus genes"] * 3
LAYER0 = "0.model.encoder.layer.0.intermediate"


@pytest.fixture
def upcycled(tiny_bert: str):
    torch.manual_seed(0)
    model = build_model(
        tiny_bert, moe=MoELayersConfig(moe_layers="all", num_experts=4, top_k=2), max_seq_length=32, device="cpu"
    )
    for block in model.modules():  # distinct experts, so that routing and quantization matter
        if isinstance(block, MoEBlock):
            for p in block.experts.parameters():
                p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_calibration_sees_the_tokens_routed_to_each_expert(upcycled) -> None:
    names = [name for name, _ in expert_linears(upcycled)]
    assert len(names) == 2 * 2 * 4 and not any("router" in n for n in names)  # 2 layers x 4 experts x (up, down)
    block = upcycled.get_submodule(LAYER0)
    tokens = []
    handle = block.register_forward_pre_hook(lambda _m, args: tokens.append(args[0].shape[0] * args[0].shape[1]))
    counts: dict[str, int] = {}
    try:
        inputs = capture_inputs(upcycled, lambda: upcycled.encode(TEXTS, batch_size=4), names, counts)
    finally:
        handle.remove()
    ups = [counts[f"{LAYER0}.experts.{e}.up"] for e in range(4)]
    assert sum(ups) == 2 * sum(tokens)  # top-2: every token reaches two experts
    assert all(counts[f"{LAYER0}.experts.{e}.down"] == ups[e] for e in range(4))
    assert inputs[f"{LAYER0}.experts.0.down"].shape == (ups[0], 64)  # the hidden activations of its own tokens
    shares = routed_frequencies(counts)[LAYER0]
    torch.testing.assert_close(shares, torch.tensor(ups, dtype=torch.float) / sum(ups))


def test_upcycled_experts_save_packed_and_reload_with_identical_embeddings(upcycled, tmp_path) -> None:
    reference = upcycled.encode(TEXTS, convert_to_tensor=True)
    upcycled.save(str(tmp_path / "fp32"))
    stats = calibrate_layers(upcycled, TEXTS[:4], TEXTS, group_size=8)
    assert {s.name for s in stats} == {name for name, _ in expert_linears(upcycled)}
    assert sum(s.frequency for s in stats if s.name.startswith(LAYER0) and s.name.endswith(".up")) == pytest.approx(1)
    plan = choose_plan(stats, budget=3.0, group_size=8)
    assert 2.5 <= plan["average_bits"] <= 3.0 and len({p["bits"] for p in plan["linears"].values()}) > 1
    quantize_model(upcycled, plan)
    assert isinstance(upcycled[0], QuantizedMoETransformer)
    for name, spec in plan["linears"].items():
        assert upcycled.get_submodule(name).bits == spec["bits"]
    assert all(isinstance(m, nn.Linear) for n, m in upcycled.named_modules() if n.endswith("router.net.0"))
    quantized = upcycled.encode(TEXTS, convert_to_tensor=True)
    upcycled.save(str(tmp_path / "q"))
    size = {name: (tmp_path / name / "model.safetensors").stat().st_size for name in ("fp32", "q")}
    assert size["q"] < size["fp32"]
    loaded = sbmoe.load_model(str(tmp_path / "q"), device="cpu")
    assert isinstance(loaded[0], QuantizedMoETransformer)
    assert all(isinstance(m, PackedLinear) for _, m in expert_linears(loaded))
    assert torch.equal(loaded.encode(TEXTS, convert_to_tensor=True), quantized)
    cosine = torch.nn.functional.cosine_similarity(quantized, reference)
    assert float(cosine.min()) > 0.98 and not torch.equal(quantized, reference)


def test_quantize_command_plans_the_head_and_the_upcycled_layers_together(tiny_bert, tmp_path, capsys) -> None:
    from tests.test_quant import write_beir

    torch.manual_seed(0)
    model = build_model(
        tiny_bert, HeadConfig(), moe=MoELayersConfig(moe_layers="all", num_experts=4), max_seq_length=32, device="cpu"
    )
    model.save(str(tmp_path / "fp32"))
    data = write_beir(tmp_path / "beir")
    out = tmp_path / "q4"
    argv = [
        "--model",
        str(tmp_path / "fp32"),
        "--output",
        str(out),
        "--bits",
        "4",
        "--calibration",
        data,
        "--group-size",
        "8",
    ]
    assert quantize_main(argv) == 0
    plan = json.loads((out / "plan.json").read_text())
    names = set(plan["linears"])
    assert {f"{LAYER0}.experts.3.down", "2.experts.0.up"} <= names and len(names) == 16 + 2 * 6
    assert {p["bits"] for p in plan["linears"].values()} == {4}
    loaded = sbmoe.load_model(str(out), device="cpu")
    again = quantize_model(sbmoe.load_model(str(tmp_path / "fp32"), device="cpu"), plan)
    expected = again.encode(TEXTS, task="query", convert_to_tensor=True)
    assert torch.equal(loaded.encode(TEXTS, task="query", convert_to_tensor=True), expected)
    assert "0.model.encoder.layer.1.intermediate.experts.0.up" in capsys.readouterr().out
