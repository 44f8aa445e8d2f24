"""Expert quantization: round-to-nearest error bounds, bit packing, packed sizes, bit allocation, save and reload."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

import sbmoe
from sbmoe.commands.quantize import main as quantize_main
from sbmoe.data import DataError
from sbmoe.heads import HeadConfig, SBMoEHead
from sbmoe.model import build_model, find_head
from sbmoe.quant import (
    LinearStats,
    PackedLinear,
    QuantizedSBMoEHead,
    calibrate_head,
    choose_plan,
    dequantize,
    make_plan,
    outlier_score,
    pack,
    quantize,
    quantize_experts,
    quantize_head,
    unpack,
)
from sbmoe.quant.allocate import allocate

TEXTS = ["the protein increases cancer risk", "mice blood cells", "a study of brain disease", "dna virus genes"]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 16])
def test_round_to_nearest_error_is_at_most_half_a_step(bits: int, group_size: int | None) -> None:
    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(bits))
    codes, scale, offset = quantize(weight, bits, group_size)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    error = (weight - dequantize(codes, scale, offset, group_size)).abs()
    groups = 1 if group_size is None else math.ceil(40 / group_size)
    assert scale.shape == offset.shape == (24, groups)
    step = scale.float().repeat_interleave(group_size or 40, dim=1)[:, :40]
    assert bool((error <= 0.5 * step * 1.01 + 1e-3 * step).all())
    rows = weight.reshape(24, -1).abs().amax(dim=1, keepdim=True)
    assert float((error / rows).max()) <= 1.01 / (2**bits - 1)  # half a step of a range of at most 2 max|w|


def test_error_shrinks_with_bits_and_groups() -> None:
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))

    def mse(bits: int, group: int | None) -> float:
        return float((weight - dequantize(*quantize(weight, bits, group), group)).square().mean())

    errors = [mse(b, None) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    assert errors[3] < errors[2] / 100  # 4 more bits: the error falls ~256x
    assert mse(4, 16) < mse(4, None)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip_and_size(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (7, 13), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed = pack(codes, bits)
    assert packed.numel() == math.ceil(7 * 13 * bits / 8)
    assert torch.equal(unpack(packed, bits, (7, 13)), codes)


def test_packed_linear_matches_dequantized_weight() -> None:
    linear = nn.Linear(20, 12)
    packed = PackedLinear.from_linear(linear, 4, 8)
    x = torch.randn(5, 20)
    expected = x @ dequantize(*quantize(linear.weight, 4, 8), 8).T + linear.bias
    assert torch.allclose(packed(x), expected, atol=1e-5)
    assert packed.packed.numel() == 20 * 12 * 4 // 8


def stats_for(frequency: list[float], error_scale: list[float], outlier: list[float] | None = None) -> list:
    widths = (2, 3, 4, 8)
    return [
        LinearStats(
            f"experts.{i}.up", 1000, f, (outlier or [3.0] * len(frequency))[i], {b: s * 4.0**-b for b in widths}
        )
        for i, (f, s) in enumerate(zip(frequency, error_scale, strict=True))
    ]


def test_allocation_respects_the_budget_and_favours_sensitive_and_frequent_experts() -> None:
    # linear 1 is the most sensitive, linear 2 the most used, linear 3 the least used
    stats = stats_for([0.1, 0.1, 0.79, 0.01], [1.0, 50.0, 1.0, 1.0])
    for budget in (3.0, 4.0):
        bits = allocate(stats, budget, (2, 3, 4, 8))
        assert sum(bits.values()) / 4 <= budget
        assert bits["experts.1.up"] > bits["experts.0.up"] and bits["experts.2.up"] > bits["experts.0.up"]
        assert bits["experts.3.up"] == min(bits.values())
    plan = make_plan(allocate(stats, 4.0, (2, 3, 4, 8)), stats, 128, "sensitivity")
    assert plan["average_bits"] <= 4.0
    cost = {name: p["error"] * stats[int(name.split(".")[1])].frequency for name, p in plan["linears"].items()}
    uniform = sum(s.frequency * s.error[4] for s in stats)
    assert sum(cost.values()) < uniform  # mixed beats uniform 4 bits at the same average


def test_outlier_criterion_favours_the_outlier_linear() -> None:
    stats = stats_for([0.25] * 4, [1.0] * 4, outlier=[3.0, 3.0, 40.0, 3.0])
    bits = allocate(stats, 3.0, (2, 3, 4, 8), "outlier")
    assert bits["experts.2.up"] == max(bits.values()) > min(bits.values())
    weight = torch.ones(3, 10)
    weight[1, 4] = 21.0
    assert outlier_score(weight) == pytest.approx(21.0 / 3.0)  # row 1: max 21, mean (9 + 21) / 10
    with pytest.raises(DataError, match="below the smallest"):
        allocate(stats, 1.5, (2, 3, 4, 8))


def test_only_expert_linears_are_quantized_and_routers_stay_float() -> None:
    layer = nn.ModuleDict(
        {"experts": nn.ModuleList(nn.Sequential(nn.Linear(8, 8)) for _ in range(2)), "router": nn.Linear(8, 2)}
    )
    moe = nn.ModuleDict({"layer": layer, "router": nn.ModuleDict({"experts": nn.ModuleList([nn.Linear(8, 8)])})})
    names = {"layer.experts.0.0": 4, "layer.experts.1.0": 8, "router.experts.0": 4}
    quantize_experts(moe, names, dict.fromkeys(names))
    assert isinstance(moe.get_submodule("layer.experts.0.0"), PackedLinear)
    assert moe.get_submodule("layer.experts.1.0").bits == 8
    assert type(moe.get_submodule("layer.router")) is nn.Linear
    assert type(moe.get_submodule("router.experts.0")) is nn.Linear  # anything named router keeps full precision


@pytest.fixture(scope="module")
def tiny_model(tiny_bert: str):
    torch.manual_seed(0)
    return build_model(tiny_bert, HeadConfig(num_experts=4, inference="top1"), max_seq_length=32, device="cpu")


def mixed_plan(head: SBMoEHead) -> dict:
    bits = {0: 8, 1: 4, 2: 3, 3: 2}
    linears = {
        f"experts.{e}.{part}": {"bits": b, "group_size": None if b == 8 else 8}
        for e, b in bits.items()
        for part in ("up", "down")
    }
    return {"criterion": "by hand", "linears": linears}


def test_saved_size_matches_the_bit_plan(tiny_model, tmp_path) -> None:
    head = find_head(tiny_model)
    plan = mixed_plan(head)
    quantized = QuantizedSBMoEHead.from_head(head, plan)
    (tmp_path / "q").mkdir()
    (tmp_path / "fp32").mkdir()
    quantized.save(str(tmp_path / "q"))
    head.save(str(tmp_path / "fp32"))
    expected = {}
    for name, spec in plan["linears"].items():
        linear = head.get_submodule(name)
        groups = 1 if spec["group_size"] is None else math.ceil(linear.in_features / spec["group_size"])
        expected[f"{name}.packed"] = math.ceil(linear.weight.numel() * spec["bits"] / 8)
        expected[f"{name}.scale"] = expected[f"{name}.offset"] = 2 * linear.out_features * groups
        expected[f"{name}.bias"] = 4 * linear.out_features
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        sizes = {key: f.get_tensor(key).nbytes for key in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert {k: v for k, v in sizes.items() if k.startswith("experts.")} == expected
    float_rest = sum(p.numel() * 4 for n, p in head.state_dict().items() if not n.startswith("experts."))
    assert sum(sizes.values()) == sum(expected.values()) + float_rest  # the router and the rest stay float32
    config = json.loads((tmp_path / "q" / "sbmoe_config.json").read_text())
    assert config["quant_plan"]["linears"]["experts.3.up"]["bits"] == 2


def test_quantized_model_round_trips_through_save_and_load(tiny_model, tiny_bert, tmp_path) -> None:
    original = tiny_model.encode(TEXTS, task="query", convert_to_tensor=True)
    model = build_model(tiny_bert, HeadConfig(num_experts=4, inference="top1"), max_seq_length=32, device="cpu")
    model.load_state_dict(tiny_model.state_dict())
    quantize_head(model, mixed_plan(find_head(model)))
    quantized = model.encode(TEXTS, task="query", convert_to_tensor=True)
    model.save(str(tmp_path / "model"))
    loaded = sbmoe.load_model(str(tmp_path / "model"), device="cpu")
    assert isinstance(loaded.head, QuantizedSBMoEHead)
    assert isinstance(loaded.head.experts[3].up, PackedLinear) and loaded.head.experts[3].up.bits == 2
    router = list(loaded.head.router.modules())
    assert any(type(m) is nn.Linear for m in router) and not any(isinstance(m, PackedLinear) for m in router)
    assert torch.allclose(loaded.encode(TEXTS, task="query", convert_to_tensor=True), quantized, atol=1e-6)
    assert not torch.allclose(quantized, original, atol=1e-6)
    assert float(torch.nn.functional.cosine_similarity(quantized, original).min()) > 0.9


def test_calibration_plans_more_bits_for_the_expert_in_use(tiny_model) -> None:
    head = find_head(tiny_model)
    pooled = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    stats = calibrate_head(tiny_model, pooled, group_size=8)
    used = {s.name.split(".")[1]: s.frequency for s in stats}
    assert sum(used.values()) == pytest.approx(1.0)  # each expert's share of the routing
    assert all(s.error[2] > s.error[4] > s.error[8] for s in stats)
    plan = choose_plan(stats, budget=3.0, group_size=8)
    assert plan["average_bits"] <= 3.0
    top = max(used, key=used.get)
    idle = [e for e, f in used.items() if f == 0]
    if idle:
        assert plan["linears"][f"experts.{top}.up"]["bits"] >= plan["linears"][f"experts.{idle[0]}.up"]["bits"]
    with pytest.raises(ValueError, match="exactly one"):
        choose_plan(stats, budget=3.0, bits=4)
    assert head.training is False


def write_beir(folder) -> str:
    (folder / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": "", "text": t} for i, t in enumerate(TEXTS)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    queries = [{"_id": "q0", "text": "cancer protein"}, {"_id": "q1", "text": "brain disease"}]
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td2\t1\n")
    return str(folder)


def test_quantize_command_writes_a_packed_model_and_its_plan(tiny_model, tmp_path, capsys) -> None:
    tiny_model.save(str(tmp_path / "fp32"))
    data = write_beir(tmp_path / "beir")
    out = tmp_path / "q3"
    argv = [
        "--model",
        str(tmp_path / "fp32"),
        "--output",
        str(out),
        "--budget",
        "3",
        "--calibration",
        data,
        "--group-size",
        "8",
    ]
    assert quantize_main(argv) == 0
    printed = capsys.readouterr().out
    assert "average bits per expert weight" in printed and "experts.0.up" in printed
    plan = json.loads((out / "plan.json").read_text())
    assert plan["average_bits"] <= 3.0 and len(plan["linears"]) == 8
    head_bytes = (out / "2_QuantizedSBMoEHead" / "model.safetensors").stat().st_size
    assert head_bytes < (tmp_path / "fp32" / "2_SBMoEHead" / "model.safetensors").stat().st_size
    again = tmp_path / "again"
    assert (
        quantize_main(["--model", str(tmp_path / "fp32"), "--output", str(again), "--plan", str(out / "plan.json")])
        == 0
    )
    head_file = "2_QuantizedSBMoEHead/model.safetensors"
    assert (again / head_file).read_bytes() == (out / head_file).read_bytes()
    assert (
        quantize_main(["--model", str(tmp_path / "fp32"), "--output", str(again), "--bits", "4", "--budget", "3"]) == 2
    )
    np.testing.assert_array_equal(np.array(plan["arguments"]["budget"]), 3.0)


@pytest.mark.parametrize("encoder", ["torch-int8", "onnx-fp32", "onnx-int8"])
def test_int8_encoders_keep_the_head_and_the_embeddings(encoder, tiny_bert, tmp_path) -> None:
    if encoder.startswith("onnx"):
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")
    from sbmoe.quant.encoder import with_encoder

    torch.manual_seed(0)
    model = build_model(tiny_bert, HeadConfig(num_experts=4), max_seq_length=32, device="cpu")
    reference = model.encode(TEXTS, task="query", convert_to_tensor=True)
    head = find_head(model)
    with_encoder(model, encoder, tmp_path / "onnx", threads=1)
    assert find_head(model) is head
    assert not any(isinstance(m, nn.Linear) for m in model[0].model.modules())  # the float linears are gone
    encoded = model.encode(TEXTS, task="query", convert_to_tensor=True)
    cosine = torch.nn.functional.cosine_similarity(encoded, reference)
    assert float(cosine.min()) > (0.99999 if encoder == "onnx-fp32" else 0.95)
    assert torch.equal(encoded, reference) is False or encoder == "onnx-fp32"  # int8 really changes the numbers
