"""Does the router learn? Gradient norm reaching the router in `learned` vs `faithful` top-1 routing.

    .venv/bin/python experiments/router_gradient.py     # writes experiments/results/router_gradient.json

Float64, so rounding noise is ~1e-15: the paper's `faithful` top-1 mode passes the gate through
``normalize(g * v) = normalize(v)``, which cancels it, so its router gradient is zero up to rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sbmoe.files import write_atomic
from sbmoe.heads import HeadConfig
from sbmoe.heads.sbmoe_head import SBMoEHead

OUTPUT = Path(__file__).parent / "results" / "router_gradient.json"


def router_grad_norm(routing: str, dim: int = 384, seed: int = 0) -> float:
    """Norm of the router's gradient for a random linear loss on a random batch, in training mode."""
    torch.manual_seed(seed)
    head = SBMoEHead(dim, HeadConfig(num_experts=6, routing=routing)).double().train()
    x = torch.randn(64, dim, dtype=torch.float64)
    (head({"sentence_embedding": x})["sentence_embedding"] * torch.randn_like(x)).sum().backward()
    return sum(p.grad.norm().item() ** 2 for p in head.router.parameters() if p.grad is not None) ** 0.5


def main() -> None:
    result = {
        routing: [router_grad_norm(routing, seed=seed) for seed in range(3)] for routing in ("learned", "faithful")
    }
    write_atomic(OUTPUT, json.dumps({"router_grad_norm_float64": result, "dim": 384, "experts": 6}, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
