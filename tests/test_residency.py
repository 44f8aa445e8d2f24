"""Expert residency: packed or on-disk experts made ready on demand or ahead of use from the pre-gate plan."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sbmoe.heads import MoELayersConfig
from sbmoe.heads.moe_block import moe_blocks
from sbmoe.model import build_model
from sbmoe.quant.linear import expert_linears, quantize_experts
from sbmoe.quant.residency import ExpertResidency
from tests.conftest import write_tiny_bert

TEXTS = ["the protein of the cell", "dense vector search with an expert router", "blood risk", "a study of mice"] * 3


@pytest.fixture(scope="module")
def tiny_bert4(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_bert(tmp_path_factory.mktemp("tiny-bert4"), layers=4))


def upcycled(path: str, pregate: bool = True) -> torch.nn.Module:
    """Every layer upcycled (E = 4, top-2, pre-gated), experts moved apart as after training."""
    model = build_model(path, moe=MoELayersConfig(moe_layers="all", num_experts=4, top_k=2, pregate=pregate))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name or "router" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def encode(model: torch.nn.Module) -> torch.Tensor:
    return model.encode(TEXTS, batch_size=4, convert_to_tensor=True)


@pytest.mark.parametrize("mode", ["ahead", "on-demand"])
def test_experts_read_from_disk_give_the_all_resident_embeddings(tiny_bert4: str, tmp_path: Path, mode: str) -> None:
    model = upcycled(tiny_bert4)
    expected = encode(model)
    residency = ExpertResidency(model, mode=mode, storage="disk", path=tmp_path / "experts.safetensors")
    try:
        assert torch.equal(encode(model), expected)
    finally:
        residency.close()
    stats = residency.stats()
    runs = stats["served_ahead"] + stats["served_on_demand"]
    if mode == "ahead":  # the first layer gates itself (on demand); the 3 others were planned one layer ahead
        assert stats["served_ahead"] > 2 * stats["served_on_demand"] > 0
    else:
        assert stats["served_ahead"] == 0 and runs > 0
    assert not any(isinstance(m, torch.nn.Linear) for _, m in expert_linears(model))  # no float expert resident


def test_packed_experts_ready_ahead_equal_resident_packed_experts(tiny_bert4: str) -> None:
    model, reference = upcycled(tiny_bert4), upcycled(tiny_bert4)
    linears = [name for name, _ in expert_linears(reference)]
    quantize_experts(reference, dict.fromkeys(linears, 4), dict.fromkeys(linears))
    residency = ExpertResidency(model, mode="ahead", storage="packed", bits=4, lookahead=2)
    try:
        assert torch.equal(encode(model), encode(reference))
    finally:
        residency.close()
    stats = residency.stats()
    per_expert = stats["resident_fp32_bytes"] // (4 * 4)  # 4 layers x 4 experts
    packed = 2 * (64 * 32 // 2) + (64 + 32) * 2 * 2 + (64 + 32) * 4  # 4-bit codes, fp16 scale + offset, biases
    assert stats["stored_bytes"] == 4 * 4 * packed and per_expert == (2 * 64 * 32 + 64 + 32) * 4
    assert per_expert <= stats["peak_ready_bytes"] <= (2 + 2) * per_expert  # lookahead 2, one in use, one on demand


def test_ahead_needs_the_pregate_plan(tiny_bert: str, tmp_path: Path) -> None:
    model = upcycled(tiny_bert, pregate=False)
    with pytest.raises(ValueError, match="build the model with pregate=True"):
        ExpertResidency(model, mode="ahead")
    with pytest.raises(ValueError, match="disk storage needs path="):
        ExpertResidency(model, mode="on-demand", storage="disk")
    assert len(moe_blocks(model)) == 2


def test_the_ahead_worker_computes_on_one_thread_and_leaves_the_callers_count(tiny_bert4: str) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        residency = ExpertResidency(upcycled(tiny_bert4), mode="ahead", storage="packed")
        try:
            assert residency._worker.submit(torch.get_num_threads).result() == 1
            assert torch.get_num_threads() == 2
        finally:
            residency.close()
    finally:
        torch.set_num_threads(threads)
