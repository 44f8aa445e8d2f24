"""The stacked MoE head (head_layers = L after pooling): reuse, PSR during head training, pre-gating, save/reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sbmoe.heads import HeadConfig, psr_open_count, top_k_gates
from sbmoe.heads.stacked import StackedMoEHead
from sbmoe.model import build_model, load_model
from sbmoe.retrieval.encoder import Encoder
from sbmoe.training.arguments import TrainingArguments
from sbmoe.training.head_trainer import train_head

DIM = 16


def head(**kwargs) -> StackedMoEHead:
    torch.manual_seed(0)
    return StackedMoEHead(DIM, HeadConfig(**{"num_experts": 4, "top_k": 2, "noise": False, **kwargs}))


def out(h: StackedMoEHead, x: torch.Tensor) -> torch.Tensor:
    return h({"sentence_embedding": x})["sentence_embedding"]


def test_parameters_do_not_depend_on_the_reuse_group_but_for_its_scalars() -> None:
    counts = {r: sum(p.numel() for p in head(head_layers=4, reuse_group=r).parameters()) for r in (1, 2, 4)}
    assert counts[1] == 4 * (4 * (DIM * 8 + 8 + 8 * DIM + DIM) + DIM * 4 + 4)  # L x (N experts + a DIM -> N router)
    assert counts[2] - counts[1] == 4  # per layer: its reuse scale
    assert counts[4] - counts[1] == 4 * (1 + 3)  # per layer: its reuse scale and a routing bias per foreign member


def test_each_block_registers_only_its_own_experts_and_router() -> None:
    h = head(head_layers=4, reuse_group=4, pregate=True)
    names = [name for name, _ in h.named_parameters(remove_duplicate=False)]
    assert len(names) == len(set(names)) == len(list(h.parameters()))  # no block registers another's
    assert all(name.startswith("layers.") for name in names)  # the stack holds no SB-MoE experts or router
    assert [[name for name, _ in block.named_children()] for block in h.layers] == [["experts", "router"]] * 4
    assert all(block.group == tuple(h.layers) for block in h.layers)
    with pytest.raises(TypeError, match="heads"):
        HeadConfig(heads=2)


@pytest.mark.parametrize("reuse_group", [2, 4])
def test_reuse_at_init_with_the_group_open_equals_no_reuse(reuse_group: int) -> None:
    torch.manual_seed(3)
    local = head(head_layers=4)
    reused = head(head_layers=4, reuse_group=reuse_group)
    missing, unexpected = reused.load_state_dict(local.state_dict(), strict=False)
    assert not unexpected and {k.rsplit(".", 1)[-1] for k in missing} <= {"reuse_scale", "owner_bias"}
    x = torch.randn(16, DIM)
    local.train(), reused.train()  # training mode: the foreign mixture is computed (times a scale of 0)
    y, expected = out(reused, x), out(local, x)
    assert (y - expected).abs().max() <= 1e-6
    assert all(block.last_routing.indices.shape[1] == 4 for block in reused.layers)  # 2 own + 2 foreign chosen
    y.square().sum().backward()
    assert all(block.reuse_scale.grad.abs() > 0 for block in reused.layers)  # the gradient can open reuse


def test_one_layer_groups_use_layer_local_experts() -> None:
    h = head(head_layers=2).eval()
    x = torch.randn(9, DIM)
    expected = x
    for block in h.layers:
        gates, _ = top_k_gates(block.router(expected).softmax(-1), 2)
        expected = expected + sum(gates[:, e : e + 1] * block.experts[e](expected) for e in range(4))
    torch.testing.assert_close(out(h, x), expected)


@pytest.mark.parametrize("schedule", ["linear", "step"])
def test_head_training_opens_the_psr_mask_on_schedule(schedule: str) -> None:
    h = head(head_layers=2, reuse_group=2, psr=schedule)
    opened: list[int] = []
    h.layers[0].register_forward_pre_hook(lambda block, _args: opened.append(int(block.open_mask().sum())))
    anchors, docs = torch.randn(32, DIM), torch.randn(40, DIM)
    examples = torch.stack([torch.arange(32), torch.arange(32), torch.arange(8, 40)], dim=1)
    train_head(h, anchors, docs, examples, TrainingArguments(epochs=4, batch_size=16))
    progress = [(epoch + step / 2) / 4 for epoch in range(4) for step in range(2)]  # 2 batches per epoch
    expected = [psr_open_count(schedule, p, own=4, total=8) for p in progress]
    assert opened[::2] == expected  # the query forward of each step (documents: the odd entries) saw this mask
    assert opened[1::2] == expected
    assert expected[0] == 4 and expected[-1] == 8 and len(set(expected)) > 1
    assert h.layers[0].open_mask() is None  # trained head is in eval mode: the whole group is open


def test_gradients_reach_every_router_and_pregate_ignores_own_input() -> None:
    h = head(head_layers=3, reuse_group=1, pregate=True).train()
    x = torch.randn(12, DIM)
    (out(h, x) * torch.randn(12, DIM)).sum().backward()
    assert all(block.router.net[0].weight.grad.abs().sum() > 0 for block in h.layers)
    h.eval()
    with torch.no_grad():
        out(h, x)
        clean = [block.last_routing.indices.clone() for block in h.layers]
        hook = h.layers[2].register_forward_pre_hook(lambda _m, args: (args[0] + 5 * torch.randn_like(args[0]),))
        out(h, x)
        hook.remove()
    assert torch.equal(h.layers[2].last_routing.indices, clean[2])  # chosen from layer 1's input
    assert [b.last_decided_by for b in h.layers] == [0, 0, 1]


def test_stacked_head_saves_and_reloads(tiny_bert: str, tmp_path: Path) -> None:
    model = build_model(tiny_bert, HeadConfig(head_layers=2, reuse_group=2, psr="linear", pregate=True, num_experts=3))
    assert isinstance(model.head, StackedMoEHead) and model.head.layers[1].candidates == 6
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save(str(tmp_path))
    loaded = load_model(str(tmp_path))
    texts = ["the cell protein", "search index"]
    assert isinstance(loaded.head, StackedMoEHead) and loaded.head.psr == "linear" and loaded.head.pregate
    torch.testing.assert_close(loaded.encode(texts), model.encode(texts), atol=0, rtol=0)
    routing = Encoder(loaded, tmp_path / "cache", show_progress=False).encode(texts, "corpus").routing
    assert [layer["total"] for layer in routing.as_dict()["layers"]] == [2, 2]
