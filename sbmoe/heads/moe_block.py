"""A token-routed Mixture-of-Experts feed-forward block, the unit of the MoE encoder layers and the stacked head.

Each block owns ``num_experts`` experts and a router holding one routing key per own expert. Blocks are linked in
ReXMoE groups of ``r``: a block scores the ``r * num_experts`` experts of its group with its group's routing keys (its
own first, then its group's other blocks in cyclic order), so parameters stay fixed whatever r while the routing
choices grow r-fold. Progressive scaling routing (PSR) masks the candidates
while training, opening them from the block's own experts to its whole group as ``progress`` goes from 0 to
``psr_until`` (at inference the whole group is open). With pre-gating, block l applies block l+1's router to its own
input, so block l+1's experts are known one block ahead (the first block keeps a conventional gate).

Two routing styles: ``slices == 1`` keeps the ``top_k`` best candidates, gates renormalised over them (upcycled
copies); ``slices == s`` picks the best candidate of each of the ``s`` slice classes (candidate ``c`` belongs to class
``c % s``) with gate exactly 1 in value and the router's gradient passed straight through (fine-grained experts that
split one feed-forward layer into ``s`` slices, so the chosen slices add up to the dense layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from sbmoe.heads.experts import ExpertBank, FeedForwardExpert, combine_experts
from sbmoe.heads.routing import Router, load_balancing_loss, psr_open_count, router_z_loss, top_k_gates


class Routing(NamedTuple):
    """One batch's routing: T x k candidate indices, their T x k weights, the T x C probabilities, the losses."""

    indices: Tensor
    weights: Tensor
    probs: Tensor
    aux_loss: Tensor
    z_loss: Tensor


class MoEBlock(nn.Module):
    """Token-routed experts with ReXMoE group reuse, a PSR candidate mask and optional pre-gating.

    Args:
        dim: Input and output size.
        hidden: Hidden size of each expert.
        num_experts: Experts this block owns (N).
        top_k: Experts each token uses (``slices == 1``).
        activation: The experts' activation (a ``transformers`` ACT2FN name).
        slices: Slice classes for fine-grained routing (1: plain top-k).
        noise: Learned router noise while training.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        top_k: int = 2,
        activation: str = "gelu",
        slices: int = 1,
        noise: bool = False,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts={num_experts}, got {top_k}")
        if num_experts % slices:
            raise ValueError(f"num_experts={num_experts} must be a multiple of the {slices} fine-grained slices")
        self.num_experts, self.top_k, self.slices = num_experts, top_k, slices
        self.experts = ExpertBank(FeedForwardExpert(dim, hidden, activation) for _ in range(num_experts))
        self.router = Router(dim, num_experts, noise)
        self.psr, self.psr_until, self.progress = "none", 0.5, 1.0
        self.pregate = False
        self.aux_loss: Tensor = torch.zeros(())
        self.z_loss: Tensor = torch.zeros(())
        self.expert_counts = torch.zeros(num_experts, dtype=torch.long)
        self.last_routing: Routing | None = None
        self.last_decided_by: int = 0
        self.index = 0
        self._links: dict[str, object] = {"group": (self,), "next": None, "plan": None, "position": 0}

    @property
    def group(self) -> tuple[MoEBlock, ...]:
        """The blocks of this block's ReXMoE group (itself included), in candidate order."""
        return self._links["group"]  # type: ignore[return-value]

    @property
    def candidates(self) -> int:
        """How many experts the router scores: N times the group size."""
        return len(self.group) * self.num_experts

    def candidate_ranks(self) -> Tensor:
        """Each candidate's PSR rank: own experts 0..N-1, then the next block's in cyclic order, and so on."""
        position, size = self._links["position"], len(self.group)
        owner = torch.arange(self.candidates) // self.num_experts
        return ((owner - position) % size) * self.num_experts + torch.arange(self.candidates) % self.num_experts

    def open_mask(self) -> Tensor | None:
        """The candidates the router may choose now (None: all): PSR while training, the whole group at inference."""
        if not self.training or self.psr == "none" or len(self.group) == 1:
            return None
        count = psr_open_count(self.psr, self.progress, self.num_experts, self.candidates, self.psr_until)
        return self.candidate_ranks() < count

    def route(self, x: Tensor) -> Routing:
        """Route T x H inputs among this block's candidates (this block's router, whatever block's input it reads)."""
        logits = torch.cat([block.router(x) for block in self.group], dim=-1)
        z_loss = router_z_loss(logits)
        mask = self.open_mask()
        if mask is not None:
            logits = logits.masked_fill(~mask.to(logits.device), float("-inf"))
        probs = logits.softmax(dim=-1)
        if self.slices == 1:
            gates, dispatch = top_k_gates(probs, self.top_k, renormalize=True)
            indices = probs.topk(self.top_k, dim=-1).indices
            weights = gates.gather(-1, indices)
        else:
            best = probs.view(len(probs), -1, self.slices).argmax(dim=1)
            indices = best * self.slices + torch.arange(self.slices, device=x.device)
            chosen = probs.gather(-1, indices)
            weights = chosen / chosen.detach()  # 1 in value; the router's gradient passes straight through
            dispatch = torch.zeros_like(probs).scatter_(-1, indices, 1.0)
        return Routing(indices, weights, probs, load_balancing_loss(probs, dispatch), z_loss)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        planned: Routing | None = self._links["plan"]  # type: ignore[assignment]
        self._links["plan"] = None
        if planned is not None and planned.indices.shape[0] == flat.shape[0]:
            routing = planned
        else:
            routing, self.last_decided_by = self.route(flat), self.index
        nxt: MoEBlock | None = self._links["next"]  # type: ignore[assignment]
        if self.pregate and nxt is not None:
            nxt._links["plan"], nxt.last_decided_by = nxt.route(flat), self.index
        self.aux_loss, self.z_loss, self.last_routing = routing.aux_loss, routing.z_loss, routing
        if not torch.is_grad_enabled():
            self.expert_counts += torch.bincount(routing.indices[:, 0].cpu(), minlength=self.candidates)
        banks = [block.experts for block in self.group]
        return combine_experts(banks, flat, routing.indices, routing.weights).view_as(x)

    def reset_routing_stats(self) -> None:
        """Zero the top-1 counters that :meth:`forward` fills while encoding."""
        self.expert_counts.zero_()


def link_blocks(blocks: Sequence[MoEBlock], reuse_group: int = 1, pregate: bool = False) -> None:
    """Group ``blocks`` (in depth order) r per ReXMoE group (the last group holds the rest when r does not divide
    their number) and chain them for pre-gating.

    Raises:
        ValueError: ``reuse_group`` < 1.
    """
    if reuse_group < 1:
        raise ValueError(f"reuse_group must be >= 1, got {reuse_group}")
    for start in range(0, len(blocks), reuse_group):
        group = tuple(blocks[start : start + reuse_group])
        for position, block in enumerate(group):
            block._links.update(group=group, position=position)
            block.expert_counts = torch.zeros(block.candidates, dtype=torch.long)
    for index, block in enumerate(blocks):
        block.index, block.pregate = index, pregate
        block._links["next"] = blocks[index + 1] if index + 1 < len(blocks) else None


def moe_blocks(module: nn.Module) -> list[MoEBlock]:
    """The MoE blocks inside ``module``, in depth order."""
    return [m for m in module.modules() if isinstance(m, MoEBlock)]


def set_psr(module: nn.Module, schedule: str | None = None, progress: float | None = None) -> None:
    """Set the PSR schedule and/or the training progress (0 .. 1) of every MoE block inside ``module``."""
    for block in moe_blocks(module):
        if schedule is not None:
            block.psr = schedule
        if progress is not None:
            block.progress = float(progress)


def block_utilization(block: MoEBlock) -> dict[str, object]:
    """Top-1 shares of a block's candidates since the last reset (candidate ``g * N + e``: expert e of group
    member g), and the share that went to the block's own experts."""
    counts = block.expert_counts.float()
    total = counts.sum().item()
    shares = (counts / total).tolist() if total else [0.0] * len(counts)
    own = block._links["position"] * block.num_experts  # type: ignore[operator]
    return {"shares": shares, "own_share": sum(shares[own : own + block.num_experts]), "total": int(total)}


def active_parameters(module: nn.Module) -> int:
    """Parameters of ``module`` that one input uses: all of them, less the experts each MoE block leaves unused
    (N - k per block: each token runs k experts, its own or its group's, of equal size)."""
    total = sum(p.numel() for p in module.parameters())
    for block in moe_blocks(module):
        per_expert = sum(p.numel() for p in block.experts[0].parameters())
        used = block.top_k if block.slices == 1 else block.slices
        total -= (block.num_experts - used) * per_expert
    return total
