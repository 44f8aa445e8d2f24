"""MoE layers inside the encoder: exact upcycling, ReXMoE reuse, PSR, pre-gating, expert plans, save/reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sbmoe.heads import MoELayersConfig
from sbmoe.heads.moe_block import moe_blocks, set_psr
from sbmoe.heads.upcycle import moe_layer_indices, upcycle_encoder
from sbmoe.model import build_model, load_model
from tests.conftest import write_tiny_bert

TEXTS = ["the protein of the cell", "dense vector search with an expert router", "blood risk", "a study of mice"]


def embeddings(model: torch.nn.Module, texts: list[str] = TEXTS) -> torch.Tensor:
    """Forward pass with gradients (whatever train/eval mode the modules are in)."""
    return model(model.tokenize(texts))["sentence_embedding"]


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("init", ["copies", "fine"])
@pytest.mark.parametrize("layers", ["all", "every-2"])
def test_upcycled_model_encodes_as_the_backbone_at_init(tiny_bert: str, init: str, layers: str) -> None:
    reference = build_model(tiny_bert).encode(TEXTS, convert_to_tensor=True)
    model = build_model(
        tiny_bert, moe=MoELayersConfig(moe_layers=layers, num_experts=4, top_k=2, init=init, pregate=True)
    )
    assert len(moe_blocks(model)) == (2 if layers == "all" else 1)
    torch.testing.assert_close(model.encode(TEXTS, convert_to_tensor=True), reference, atol=1e-5, rtol=0)


def test_parameters_do_not_depend_on_the_reuse_group_but_for_its_scalars(tiny_bert: str) -> None:
    counts = {
        r: count(build_model(tiny_bert, moe=MoELayersConfig(moe_layers="all", num_experts=4, reuse_group=r)))
        for r in (1, 2)
    }
    assert counts[2] - counts[1] == 2  # per MoE layer: its reuse scale
    names = [
        n
        for n, _ in build_model(tiny_bert, moe=MoELayersConfig(moe_layers="all", reuse_group=2)).named_parameters()
        if "reuse" in n
    ]
    assert len(names) == 2 and all(".intermediate.router.reuse_scale" in n for n in names)  # the routers' rate
    dense = count(build_model(tiny_bert))
    ffn = 32 * 64 * 2 + 64 + 32  # one dense feed-forward block of the tiny BERT
    assert counts[1] - dense == 2 * (3 * ffn + 4 * 33)  # per layer: 3 more expert copies, a 32 -> 4 router


@pytest.fixture(scope="module")
def tiny_bert4(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random BERT of 4 layers: room for a reuse group of 4 MoE layers."""
    return str(write_tiny_bert(tmp_path_factory.mktemp("tiny-bert4"), layers=4))


def perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """``model`` with every parameter moved a little (experts that differ, as after training)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("init", ["copies", "fine"])
@pytest.mark.parametrize("reuse_group", [2, 4])
def test_reuse_at_init_with_the_group_open_encodes_as_no_reuse(tiny_bert4: str, init: str, reuse_group: int) -> None:
    local = perturbed(build_model(tiny_bert4, moe=MoELayersConfig(num_experts=4, init=init)))
    reused = build_model(tiny_bert4, moe=MoELayersConfig(num_experts=4, init=init, reuse_group=reuse_group))
    missing, unexpected = reused.load_state_dict(local.state_dict(), strict=False)
    assert not unexpected and {k.rsplit(".", 1)[-1] for k in missing} <= {"reuse_scale", "owner_bias"}
    blocks = moe_blocks(reused)
    for block in blocks:
        block.train()  # the foreign mixture is computed (times a scale of 0); the rest stays in eval mode
    assert all(len(block.group) == reuse_group and block.open_mask() is None for block in blocks)  # group open
    y, expected = embeddings(reused), embeddings(local)
    assert (y - expected).abs().max() <= 1e-6
    assert all(block.last_routing.indices.ge(block.num_experts).any() for block in blocks[:1])  # foreign chosen
    y.square().sum().backward()
    assert all(block.reuse_scale.grad.abs() > 0 for block in blocks)  # the gradient can open reuse
    reused.eval()
    with reused[0].recorder() as recorder:
        encoded = [m.encode(TEXTS, convert_to_tensor=True) for m in (reused, local)]
    assert (encoded[0] - encoded[1]).abs().max() <= 1e-6  # and at inference (scale 0: no foreign experts run)
    usage = reused[0].expert_utilization(recorder)
    assert [u["reuse_scale"] for u in usage] == [0.0] * 4 and usage[0]["total"] > 0
    assert [u["own_share"] for u in usage] == pytest.approx([1.0] * 4)  # every token's top-1 on its own experts


def test_opened_reuse_routes_foreign_experts_with_the_layers_own_router(tiny_bert: str) -> None:
    model = perturbed(
        build_model(tiny_bert, moe=MoELayersConfig(moe_layers="all", num_experts=4, reuse_group=2, psr="linear"))
    )
    blocks = moe_blocks(model)
    for block in blocks:
        block.train()
    set_psr(model, progress=0.0)  # PSR shut: own experts only
    embeddings(model)
    assert all(block.last_routing.indices.shape[1] == 2 for block in blocks)
    set_psr(model, progress=1.0)
    with torch.no_grad():
        for block in blocks:
            block.reuse_scale.fill_(0.5)
    inputs: list[torch.Tensor] = []
    hook = blocks[1].register_forward_pre_hook(lambda _m, args: inputs.append(args[0].reshape(-1, 32)))
    embeddings(model)
    hook.remove()
    routing = blocks[1].last_routing
    assert routing.indices[:, :2].ge(4).all() and routing.indices[:, 2:].lt(4).all()  # own (member 1), then member 0
    own_choice = blocks[1].router(inputs[0]).topk(2).indices  # this layer's keys choose the foreign experts too
    assert torch.equal(routing.indices[:, 2:], own_choice) and torch.equal(routing.indices[:, :2] - 4, own_choice)
    torch.testing.assert_close(routing.weights[:, 2:], 0.5 * routing.weights[:, :2])


@pytest.mark.parametrize(("init", "pregate"), [("copies", True), ("fine", False)])
def test_gradients_reach_every_router(tiny_bert: str, init: str, pregate: bool) -> None:
    model = build_model(
        tiny_bert, moe=MoELayersConfig(moe_layers="all", num_experts=4, init=init, reuse_group=2, pregate=pregate)
    )
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
    model = build_model(tiny_bert, moe=MoELayersConfig(moe_layers="all", num_experts=4, pregate=pregate))
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
        model = build_model(tiny_bert, moe=MoELayersConfig(moe_layers="all", num_experts=4, pregate=pregate))
        plans = model.expert_plan(TEXTS, batch_size=2)
        assert [p["decided_by"] for p in plans] == ([0, 0] if pregate else [0, 1])
        assert [len(p["batches"]) for p in plans] == [2, 2]
        assert all(set(batch) <= set(range(4)) and len(batch) >= 2 for p in plans for batch in p["batches"])


def test_save_and_reload_identical(tiny_bert: str, tmp_path: Path) -> None:
    model = build_model(
        tiny_bert, moe=MoELayersConfig(moe_layers=[1], num_experts=4, init="fine", psr="step", pregate=True)
    )
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
        upcycle_encoder(model, MoELayersConfig())


def test_layer_specs() -> None:
    assert moe_layer_indices("all", 3) == [0, 1, 2]
    assert moe_layer_indices("every-2", 6) == [1, 3, 5]
    assert moe_layer_indices("0,2", 6) == moe_layer_indices([2, 0], 6) == [0, 2]
    assert moe_layer_indices([-1], 6) == [5]
    with pytest.raises(ValueError, match="names no layer"):
        moe_layer_indices([7], 6)
    with pytest.raises(ValueError, match="'all', 'every-K'"):
        moe_layer_indices("odd", 6)
