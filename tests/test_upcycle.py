"""MoE layers inside the encoder: exact upcycling, ReXMoE reuse, PSR, pre-gating, expert plans, save/reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sbmoe.heads.moe_block import moe_blocks, set_psr
from sbmoe.heads.upcycle import moe_layer_indices, upcycle_encoder
from sbmoe.model import build_model, load_model

TEXTS = ["the protein of the cell", "dense vector search with an expert router", "blood risk", "a study of mice"]


def embeddings(model: torch.nn.Module, texts: list[str] = TEXTS) -> torch.Tensor:
    """Forward pass with gradients (whatever train/eval mode the modules are in)."""
    return model(model.tokenize(texts))["sentence_embedding"]


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("init", ["copies", "fine"])
@pytest.mark.parametrize("layers", ["all", "every-2"])
def test_upcycled_model_encodes_as_the_backbone_at_init(tiny_bert: str, init: str, layers: str) -> None:
    reference = build_model(tiny_bert, head=False).encode(TEXTS, convert_to_tensor=True)
    model = build_model(tiny_bert, moe_layers=layers, num_experts=4, top_k=2, init=init, pregate=True)
    assert len(moe_blocks(model)) == (2 if layers == "all" else 1)
    torch.testing.assert_close(model.encode(TEXTS, convert_to_tensor=True), reference, atol=1e-5, rtol=0)


def test_parameters_do_not_depend_on_the_reuse_group(tiny_bert: str) -> None:
    counts = {r: count(build_model(tiny_bert, moe_layers="all", num_experts=4, reuse_group=r)) for r in (1, 2)}
    assert counts[1] == counts[2]
    dense = count(build_model(tiny_bert, head=False))
    ffn = 32 * 64 * 2 + 64 + 32  # one dense feed-forward block of the tiny BERT
    assert counts[1] - dense == 2 * (3 * ffn + 4 * 33)  # per layer: 3 more expert copies, a 32 -> 4 router


def test_reuse_group_at_psr_start_equals_layer_local_experts(tiny_bert: str) -> None:
    local = build_model(tiny_bert, moe_layers="all", num_experts=4, reuse_group=1)
    reused = build_model(tiny_bert, moe_layers="all", num_experts=4, reuse_group=2, psr="linear")
    torch.manual_seed(1)
    with torch.no_grad():  # experts that differ, as after training
        for p in local.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reused.load_state_dict(local.state_dict())  # same parameters whatever r
    for block in moe_blocks(reused):
        block.train()  # PSR masks while training; the rest stays in eval mode (no dropout)
    set_psr(reused, progress=0.0)
    # 4 vs 8 candidates (half masked) is another computation: equal up to summation order, not bit for bit
    torch.testing.assert_close(embeddings(reused), embeddings(local), atol=1e-6, rtol=0)
    assert all(block.last_routing.indices.lt(4).all() for block in moe_blocks(local))  # r = 1: own experts only
    set_psr(reused, progress=1.0)  # whole group open: other layers' experts get chosen and the output changes
    assert not torch.equal(embeddings(reused), embeddings(local))
    assert any(block.last_routing.indices.ge(4).any() for block in moe_blocks(reused))


@pytest.mark.parametrize(("init", "pregate"), [("copies", True), ("fine", False)])
def test_gradients_reach_every_router(tiny_bert: str, init: str, pregate: bool) -> None:
    model = build_model(tiny_bert, moe_layers="all", num_experts=4, init=init, reuse_group=2, pregate=pregate)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.add_(0.05 * torch.randn_like(p))
    (embeddings(model) * torch.randn(len(TEXTS), 32)).sum().backward()
    for block in moe_blocks(model):
        assert block.router.net[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("pregate", [True, False])
def test_pregate_choice_ignores_the_layers_own_input(tiny_bert: str, pregate: bool) -> None:
    model = build_model(tiny_bert, moe_layers="all", num_experts=4, pregate=pregate)
    second = moe_blocks(model)[1]
    with torch.no_grad():
        embeddings(model)
        clean = second.last_routing.indices.clone()
        torch.manual_seed(0)
        hook = second.register_forward_pre_hook(lambda _m, args: (args[0] + 3 * torch.randn_like(args[0]),))
        embeddings(model)
        hook.remove()
    assert torch.equal(second.last_routing.indices, clean) == pregate


def test_expert_plan_names_each_batchs_experts_one_layer_ahead(tiny_bert: str) -> None:
    for pregate in (True, False):
        model = build_model(tiny_bert, moe_layers="all", num_experts=4, pregate=pregate)
        plans = model.expert_plan(TEXTS, batch_size=2)
        assert [p["decided_by"] for p in plans] == ([0, 0] if pregate else [0, 1])
        assert [len(p["batches"]) for p in plans] == [2, 2]
        assert all(set(batch) <= set(range(4)) and len(batch) >= 2 for p in plans for batch in p["batches"])


def test_save_and_reload_identical(tiny_bert: str, tmp_path: Path) -> None:
    model = build_model(tiny_bert, moe_layers=[1], num_experts=4, init="fine", psr="step", pregate=True)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save(str(tmp_path))
    loaded = load_model(str(tmp_path))
    assert loaded[0].moe == model[0].moe
    assert [(b.slices, b.psr, b.pregate) for b in moe_blocks(loaded)] == [(2, "step", True)]
    saved, reloaded = model.state_dict(), loaded.state_dict()
    assert saved.keys() == reloaded.keys() and all(torch.equal(saved[k], reloaded[k]) for k in saved)
    torch.testing.assert_close(loaded.encode(TEXTS), model.encode(TEXTS), atol=0, rtol=0)


def test_architecture_without_feed_forward_block_is_refused() -> None:
    from transformers import DistilBertConfig, DistilBertModel

    model = DistilBertModel(DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32))
    with pytest.raises(ValueError, match="the DistilBertModel architecture has none"):
        upcycle_encoder(model)


def test_layer_specs() -> None:
    assert moe_layer_indices("all", 3) == [0, 1, 2]
    assert moe_layer_indices("every-2", 6) == [1, 3, 5]
    assert moe_layer_indices("0,2", 6) == moe_layer_indices([2, 0], 6) == [0, 2]
    assert moe_layer_indices([-1], 6) == [5]
    with pytest.raises(ValueError, match="names no layer"):
        moe_layer_indices([7], 6)
    with pytest.raises(ValueError, match="'all', 'every-K'"):
        moe_layer_indices("odd", 6)
