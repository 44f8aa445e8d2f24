"""The SB-MoE head on its own: shapes, gradients, auxiliary loss, configuration errors."""

from __future__ import annotations

import math

import pytest
import torch

from sbmoe.heads import HeadConfig
from sbmoe.heads.sbmoe_head import SBMoEHead, load_balancing_loss
from sbmoe.heads.usage import RoutingStats

DIM = 32


def run_head(head: SBMoEHead, x: torch.Tensor) -> torch.Tensor:
    return head({"sentence_embedding": x})["sentence_embedding"]


def router_grad_norm(routing: str, top_k: int = 2) -> float:
    """Norm of the router's gradient for a random linear loss, in float64 so rounding noise is ~1e-15."""
    torch.manual_seed(0)
    head = SBMoEHead(DIM, HeadConfig(num_experts=6, routing=routing, top_k=top_k)).double().train()
    x = torch.randn(16, DIM, dtype=torch.float64)
    target = torch.randn(16, DIM, dtype=torch.float64)
    (run_head(head, x) * target).sum().backward()
    return sum(p.grad.norm().item() ** 2 for p in head.router.parameters() if p.grad is not None) ** 0.5


def test_output_shapes_and_features() -> None:
    head = SBMoEHead(DIM, HeadConfig(num_experts=4)).eval()
    features = head({"sentence_embedding": torch.randn(5, DIM)})
    assert features["sentence_embedding"].shape == (5, DIM)
    assert features["expert_index"].shape == (5,)
    assert features["router_probs"].shape == (5, 4)
    torch.testing.assert_close(features["router_probs"].sum(-1), torch.ones(5))
    assert head.get_embedding_dimension() == DIM


def test_learned_router_gets_gradient() -> None:
    assert router_grad_norm("learned") > 1e-3
    assert router_grad_norm("learned", top_k=1) > 1e-3


def test_faithful_top1_router_gets_no_gradient() -> None:
    """The paper's flaw: normalize(g * E(x)) cancels the gate, so the router learns nothing."""
    learned = router_grad_norm("learned")
    faithful = router_grad_norm("faithful")
    assert learned > 0.1
    assert faithful < 1e-10


def test_training_selection_masks_experts() -> None:
    torch.manual_seed(0)
    head = SBMoEHead(DIM, HeadConfig(num_experts=6, top_k=2)).train()
    gates, probs, dispatch = head.gates(torch.randn(8, DIM))
    assert torch.equal((gates > 0).sum(-1), torch.full((8,), 2))
    torch.testing.assert_close(gates.sum(-1), torch.ones(8))
    faithful = SBMoEHead(DIM, HeadConfig(num_experts=6, routing="faithful")).train()
    gates, probs, dispatch = faithful.gates(torch.randn(8, DIM))
    assert torch.equal((gates > 0).sum(-1), torch.ones(8, dtype=torch.long))
    assert torch.all(gates.sum(-1) < 1.0)  # not renormalised, as in the paper


def test_aux_loss_minimal_when_uniform_larger_when_collapsed() -> None:
    n, e = 60, 6
    uniform_probs = torch.full((n, e), 1 / e)
    balanced = torch.nn.functional.one_hot(torch.arange(n) % e, e).float()
    collapsed_probs = torch.zeros(n, e).index_fill_(1, torch.tensor([0]), 1.0)
    collapsed = torch.nn.functional.one_hot(torch.zeros(n, dtype=torch.long), e).float()
    assert load_balancing_loss(uniform_probs, balanced).item() == pytest.approx(1.0)
    assert load_balancing_loss(collapsed_probs, collapsed).item() == pytest.approx(float(e))
    half = torch.nn.functional.one_hot(torch.arange(n) % 2, e).float()
    assert 1.0 < load_balancing_loss(half * 0.9 + 0.1 / e, half).item() < e


def test_aux_loss_exposed_after_forward() -> None:
    head = SBMoEHead(DIM, HeadConfig(num_experts=6)).train()
    run_head(head, torch.randn(32, DIM))
    assert head.aux_loss.requires_grad
    assert 1.0 <= head.aux_loss.item() <= 6.0


def test_routing_stats_count_the_expert_index_of_each_input() -> None:
    head = SBMoEHead(DIM, HeadConfig(num_experts=3)).eval()
    state = {k: v.clone() for k, v in head.state_dict().items()}
    with torch.no_grad():
        index = torch.cat([head({"sentence_embedding": torch.randn(n, DIM)})["expert_index"] for n in (10, 5)])
    stats = RoutingStats.of(index.numpy(), 3).as_dict()
    counts = [int((index == e).sum()) for e in range(3)]
    shares = [c / 15 for c in counts]
    assert stats["counts"] == counts and stats["total"] == 15
    assert stats["shares"] == pytest.approx(shares, abs=1e-12)
    assert stats["entropy"] == pytest.approx(-sum(s * math.log(s) for s in shares if s > 0), abs=1e-12)
    assert RoutingStats.of(index[:0].numpy(), 3).as_dict() == {
        "counts": [0] * 3,
        "shares": [0.0] * 3,
        "entropy": 0,
        "total": 0,
    }
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in state.items())  # forward changed no buffer


def test_residual_and_normalisation_options() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, DIM)
    normed = SBMoEHead(DIM, normalize_output=True).eval()
    assert torch.allclose(run_head(normed, x).norm(dim=-1), torch.ones(4), atol=1e-5)
    no_residual = SBMoEHead(DIM, HeadConfig(residual=False, routing="faithful", inference="top1")).eval()
    assert torch.allclose(run_head(no_residual, x).norm(dim=-1), torch.ones(4), atol=1e-5)


def test_strength_interpolates_between_backbone_and_head() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, DIM)
    head = SBMoEHead(DIM).eval()
    full = run_head(head, x)
    head.strength = 0.0
    torch.testing.assert_close(run_head(head, x), x)
    head.strength = 0.3
    torch.testing.assert_close(run_head(head, x), x + 0.3 * (full - x))


def test_expert_dropout_hides_experts_while_training_only() -> None:
    torch.manual_seed(0)
    x = torch.randn(2000, DIM)
    head = SBMoEHead(DIM, HeadConfig(num_experts=4, top_k=1, expert_dropout=0.5)).train()
    probs = head({"sentence_embedding": x})["router_probs"]
    hidden = (probs == 0).float()
    # each expert hidden with p = 0.5, except that the 1/16 of rows with all four hidden keep them all
    assert hidden.mean().item() == pytest.approx(0.5 - 0.5**4, abs=0.02)
    assert (hidden.sum(dim=-1) < 4).all()
    assert (head.eval()({"sentence_embedding": x})["router_probs"] > 0).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_experts": 0}, "num_experts must be >= 1"),
        ({"num_experts": 3, "top_k": 4}, "top_k must be between 1 and num_experts=3"),
        ({"routing": "magic"}, "unknown routing mode 'magic'"),
        ({"inference": "all"}, "unknown inference mode 'all'"),
        ({"strength": -0.5}, "strength must be >= 0"),
        ({"expert_dropout": 1.0}, "expert_dropout must be in \\[0, 1\\)"),
    ],
)
def test_bad_config_raises_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SBMoEHead(DIM, HeadConfig(**kwargs))


@pytest.mark.parametrize(("dim", "params"), [(312, 638_520), (512, 1_713_420), (768, 3_848_076)])
def test_head_size_matches_the_paper(dim: int, params: int) -> None:
    """6 experts on TinyBERT / BERT-small / BERT-base: the paper's 638K, 1.71M and 3.85M parameters."""
    assert sum(p.numel() for p in SBMoEHead(dim).parameters()) == params
