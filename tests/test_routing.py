"""Routing machinery: top-k gates, the expert bank's sparse dispatch, the PSR schedule, the MoE block's routing."""

from __future__ import annotations

import pytest
import torch

from sbmoe.heads import ExpertBank, FeedForwardExpert, HeadConfig, combine_experts, psr_open_count, top_k_gates
from sbmoe.heads.moe_block import MoEBlock, link_blocks, set_psr


def test_top_k_gates_renormalise_over_the_chosen_experts() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.15, 0.05, 0.8]])
    gates, dispatch = top_k_gates(probs, 2)
    torch.testing.assert_close(gates, torch.tensor([[0.625, 0.375, 0.0], [0.15 / 0.95, 0.0, 0.8 / 0.95]]))
    assert dispatch.sum(-1).tolist() == [2.0, 2.0]
    soft, soft_dispatch = top_k_gates(probs, 3)
    assert soft is probs and soft_dispatch.sum(-1).tolist() == [1.0, 1.0]  # Switch counts the top-1 under soft


def test_combine_runs_each_expert_on_its_rows_only() -> None:
    torch.manual_seed(0)
    banks = [ExpertBank(FeedForwardExpert(8, 5, "gelu") for _ in range(3)) for _ in range(2)]
    x = torch.randn(7, 8)
    indices = torch.randint(0, 6, (7, 2))
    weights = torch.rand(7, 2)
    expected = torch.stack(
        [sum(weights[n, j] * banks[indices[n, j] // 3][indices[n, j] % 3](x[n]) for j in range(2)) for n in range(7)]
    )
    torch.testing.assert_close(combine_experts(banks, x, indices, weights), expected)
    calls: list[int] = []
    for expert in banks[0]:
        expert.register_forward_hook(lambda _m, inputs, _o: calls.append(len(inputs[0])))
    only_first = torch.zeros(7, 1, dtype=torch.long)
    banks[0].combine(x, only_first, torch.ones(7, 1))
    assert calls == [7]  # one call for expert 0 on all rows; experts 1 and 2 never run


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("linear", [4, 4, 5, 6, 7, 8, 8, 8]),  # one candidate per 0.1 of progress until 0.5
        ("step", [4, 4, 4, 4, 8, 8, 8, 8]),  # the other layer's 4 experts at once, at progress 0.25
        ("none", [8] * 8),
    ],
)
def test_psr_opens_on_schedule(schedule: str, expected: list[int]) -> None:
    progress = [0.0, 0.09, 0.1, 0.2, 0.3, 0.4, 0.5, 1.0]
    assert [psr_open_count(schedule, p, own=4, total=8, until=0.5) for p in progress] == expected
    assert [psr_open_count("step", p, own=2, total=8, until=1.0) for p in (0.0, 0.25, 0.5, 0.75)] == [2, 4, 6, 8]


def test_block_mask_opens_own_experts_first_and_everything_at_inference() -> None:
    blocks = [MoEBlock(8, 4, num_experts=3, top_k=1) for _ in range(2)]
    link_blocks(blocks, reuse_group=2)
    set_psr(blocks[1], "linear", progress=0.0)
    blocks[1].train()
    assert blocks[1].open_mask().tolist() == [False, False, False, True, True, True]  # its own: group member 1
    blocks[1].progress = 0.2  # 0.2 / 0.5 * 4 steps = 1 more candidate: the next member's (member 0's) expert 0
    assert blocks[1].open_mask().tolist() == [True, False, False, True, True, True]
    x = torch.randn(64, 8)
    blocks[1].progress = 0.0
    assert set(blocks[1].route(x).indices.flatten().tolist()) <= {3, 4, 5}
    blocks[1].eval()
    assert blocks[1].open_mask() is None and blocks[1].route(x).indices.max() < 6


def test_groups_take_r_consecutive_blocks_and_the_last_the_rest() -> None:
    blocks = [MoEBlock(8, 4, 2, 1) for _ in range(5)]
    link_blocks(blocks, reuse_group=2)
    assert [b.candidates for b in blocks] == [4, 4, 4, 4, 2]
    assert blocks[2].group == (blocks[2], blocks[3])
    with pytest.raises(ValueError, match="reuse_group must be >= 1"):
        link_blocks(blocks, reuse_group=0)


@pytest.mark.parametrize("routing", ["learned", "faithful"])
@pytest.mark.parametrize("inference", ["soft", "top1", "topk"])
def test_sbmoe_head_on_the_expert_bank_computes_the_dense_formula(routing: str, inference: str) -> None:
    """The head's refactor onto the bank keeps its numerics: every expert on every row, weighted by the gates."""
    from torch.nn.functional import normalize

    from sbmoe.heads import SBMoEHead

    torch.manual_seed(0)
    head = SBMoEHead(16, HeadConfig(num_experts=5, routing=routing, inference=inference)).eval()
    x = torch.randn(30, 16)
    gates, _, _ = head.gates(x)
    out = torch.stack([expert(x) for expert in head.experts], dim=1)
    if routing == "faithful":
        expected = normalize((gates.unsqueeze(-1) * out).sum(1), dim=-1) + x
    else:
        expected = (gates.unsqueeze(-1) * normalize(out, dim=-1)).sum(1) + x
    actual = head({"sentence_embedding": x})["sentence_embedding"]
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)
    assert [name for name, _ in head.named_parameters()][:2] == ["experts.0.up.weight", "experts.0.up.bias"]
    assert "router.net.0.weight" in head.state_dict() and "router.net.2.weight" in head.state_dict()
