"""Routing machinery shared by the SB-MoE head, the stacked head and the MoE layers inside the encoder.

A router turns inputs into logits over candidate experts; :func:`top_k_gates` keeps the k best (gates renormalised
over them), :func:`load_balancing_loss` and :func:`router_z_loss` are Switch Transformer's auxiliary losses, and
:func:`psr_open_count` is ReXMoE's progressive scaling routing schedule (how many candidates are open).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PSR_SCHEDULES = ("none", "linear", "step")


class Router(nn.Module):
    """Logits over ``num_experts`` candidates, with learned Gaussian noise while training (noisy top-k gating).

    ``hidden`` None gives one linear layer (``net.0``); an int gives Linear -> ReLU -> Linear (``net.0``, ``net.2``),
    the SB-MoE head's router. A router in an MoE block of a reuse group also holds that block's reuse parameters
    (:meth:`enable_reuse`), so they train at the routers' learning rate.
    """

    def __init__(self, dim: int, num_experts: int, noise: bool, hidden: int | None = None):
        super().__init__()
        if hidden is None:
            self.net = nn.Sequential(nn.Linear(dim, num_experts))
        else:
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_experts))
        self.noise = nn.Linear(dim, num_experts) if noise else None
        self.register_parameter("reuse_scale", None)
        self.register_parameter("owner_bias", None)

    def enable_reuse(self, foreign_members: int) -> None:
        """Give this router the reuse parameters of a block with ``foreign_members`` other blocks in its group (none:
        remove them): ``reuse_scale`` weighs the foreign experts' mixture and starts at 0; ``owner_bias`` (r > 2)
        adds one routing logit per foreign member, starting at 0."""
        device = self.net[0].weight.device
        self.reuse_scale = nn.Parameter(torch.zeros((), device=device)) if foreign_members else None
        self.owner_bias = nn.Parameter(torch.zeros(foreign_members, device=device)) if foreign_members > 1 else None

    def forward(self, x: Tensor) -> Tensor:
        logits = self.net(x)
        if self.training and self.noise is not None:
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise(x))
        return logits


def top_k_gates(probs: Tensor, k: int, renormalize: bool = True) -> tuple[Tensor, Tensor]:
    """Keep each row's ``k`` most probable experts.

    Args:
        probs: N x E router probabilities.
        k: Experts kept per row; ``k >= E`` keeps them all (soft routing: the gates are ``probs``).
        renormalize: Rescale the kept gates to sum to 1 (only when ``k > 1``: one gate of 1 would block the
            router's gradient).

    Returns:
        ``(gates, dispatch)``: N x E gates (zero for experts not kept) and the N x E 0/1 mask the load-balancing
        loss counts (the kept experts, or each row's top-1 expert under soft routing, as in Switch).
    """
    num_experts = probs.shape[-1]
    top = probs.topk(k if k < num_experts else 1, dim=-1).indices
    dispatch = torch.zeros_like(probs).scatter_(-1, top, 1.0)
    if k >= num_experts:
        return probs, dispatch
    gates = probs * dispatch
    if renormalize and k > 1:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return gates, dispatch


def load_balancing_loss(probs: Tensor, dispatch: Tensor) -> Tensor:
    """Switch/GShard load-balancing loss ``E * sum_i f_i * P_i``.

    ``f_i`` is the share of routing slots given to expert i and ``P_i`` its mean router probability. The loss
    is 1 for perfectly uniform routing and approaches E when every input goes to one expert.

    Args:
        probs: N x E router probabilities.
        dispatch: N x E 0/1 mask of the experts each input was dispatched to.
    """
    num_experts = probs.shape[-1]
    f = dispatch.sum(dim=0) / dispatch.sum().clamp(min=1.0)
    return num_experts * (f * probs.mean(dim=0)).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: the mean squared log-sum-exp of the logits (keeps them small)."""
    return logits.logsumexp(dim=-1).square().mean()


def psr_open_count(schedule: str, progress: float, own: int, total: int, until: float = 0.5) -> int:
    """How many of a router's ``total`` candidates are open at training ``progress`` (0 .. 1), by ReXMoE's PSR.

    The pool opens from the layer's ``own`` experts to all ``total`` by ``progress == until``: ``linear`` adds one
    candidate at a time in equal steps of progress, ``step`` adds one whole layer's ``own`` experts at a time.
    ``none`` is open from the start.
    """
    if schedule not in PSR_SCHEDULES:
        raise ValueError(f"unknown PSR schedule {schedule!r}; expected one of {PSR_SCHEDULES}")
    if schedule == "none" or total <= own or progress >= until:
        return total
    fraction = max(progress, 0.0) / until
    if schedule == "linear":
        return own + math.floor(fraction * (total - own + 1))
    layers = total // own
    return own * (1 + math.floor(fraction * layers))
