"""A token-routed Mixture-of-Experts feed-forward block, the unit of the MoE encoder layers and the stacked head.

Each block owns ``num_experts`` experts (N) and a router holding one routing key per own expert. Blocks are linked in
ReXMoE groups of ``r``; a block in a group computes ``own(x) + reuse_scale * foreign(x)``: ``own`` is the mixture
of its top-k own experts, ``foreign`` the mixture of the top-k of the group's other ``(r - 1) * N`` experts, both
chosen by this block's router (foreign expert e of any member is scored with this block's key e, plus a learned
per-owner bias when r > 2), and ``reuse_scale`` is a per-block scalar that starts at 0. So a reuse model starts
exactly as the model without reuse and training opens reuse only as far as it helps. Load balancing runs per owner
group (own experts, foreign slots), so it never pushes tokens off a block's own experts. Parameters grow with r only
by those scalars. Progressive scaling routing (PSR) masks the foreign candidates while training, opening them
to the whole group as ``progress`` goes from 0 to ``psr_until`` (at inference the whole group is open). With
pre-gating, block l applies block l+1's router to its own input, so block l+1's experts are known one block ahead
(the first block keeps a conventional gate).

Two routing styles: ``slices == 1`` keeps the ``top_k`` best candidates, gates renormalised over them (upcycled
copies); ``slices == s`` picks the best candidate of each of the ``s`` slice classes (candidate ``c`` belongs to class
``c % s``) with gate exactly 1 in value and the router's gradient passed straight through (fine-grained experts that
split one feed-forward layer into ``s`` slices, so the chosen slices add up to the dense layer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from sbmoe.heads.experts import ExpertBank, FeedForwardExpert, combine_experts
from sbmoe.heads.routing import Router, load_balancing_loss, psr_open_count, router_z_loss, top_k_gates


class Routing(NamedTuple):
    """One batch's routing: T x m candidate indices (own experts first, then foreign ones), their T x m weights,
    the T x N own-expert probabilities, the losses."""

    indices: Tensor
    weights: Tensor
    probs: Tensor
    aux_loss: Tensor
    z_loss: Tensor


@dataclass(eq=False)
class BlockLinks:
    """A block's place among the other blocks, held outside ``nn.Module`` registration (as module attributes the
    other blocks would register under this one too, so their parameters would count and save twice).

    Attributes:
        group: The blocks of its ReXMoE group (itself included), in candidate order.
        position: Its index in ``group``.
        next: The block after it in depth order (whose routing it plans with pre-gating), None for the last.
    """

    group: tuple[MoEBlock, ...]
    position: int = 0
    next: MoEBlock | None = None


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
        self.last_routing: Routing | None = None
        self.last_decided_by: int = 0
        self.index = 0
        self.links = BlockLinks(group=(self,))
        self.plan: Routing | None = None  # this batch's routing, planned by the previous block (pre-gating)
        self.on_plan: Callable[[MoEBlock, Routing], None] | None = None  # told of each plan made for the next block

    @property
    def reuse_scale(self) -> nn.Parameter | None:
        """The weight of the foreign experts' mixture (0 at the start; None outside a group), held by the router."""
        return self.router.reuse_scale

    @property
    def owner_bias(self) -> nn.Parameter | None:
        """The routing logit added per foreign group member (r > 2), held by the router."""
        return self.router.owner_bias

    @property
    def group(self) -> tuple[MoEBlock, ...]:
        """The blocks of this block's ReXMoE group (itself included), in candidate order."""
        return self.links.group

    @property
    def candidates(self) -> int:
        """How many experts the router scores: N times the group size."""
        return len(self.group) * self.num_experts

    def candidate_ranks(self) -> Tensor:
        """Each candidate's PSR rank: own experts 0..N-1, then the next block's in cyclic order, and so on."""
        position, size = self.links.position, len(self.group)
        owner = torch.arange(self.candidates) // self.num_experts
        return ((owner - position) % size) * self.num_experts + torch.arange(self.candidates) % self.num_experts

    def open_mask(self) -> Tensor | None:
        """The candidates the router may choose now (None: all): PSR while training, the whole group at inference."""
        if not self.training or self.psr == "none" or len(self.group) == 1:
            return None
        count = psr_open_count(self.psr, self.progress, self.num_experts, self.candidates, self.psr_until)
        return self.candidate_ranks() < count

    def foreign_candidates(self) -> Tensor:
        """The candidate index of each foreign slot: slot ``(d - 1) * N + e`` is expert e of the group member d
        places after this block (cyclic), so slots come in PSR rank order."""
        position, size, n = self.links.position, len(self.group), self.num_experts
        slots = torch.arange((size - 1) * n)
        return ((position + 1 + slots // n) % size) * n + slots % n

    def route(self, x: Tensor) -> Routing:
        """Route T x H inputs (whatever block's input it reads) with this block's routing parameters: its own
        experts' choice, then, in a group, the foreign candidates' choice with gates times ``reuse_scale``."""
        logits = self.router(x)
        own = self._choose(logits, self.top_k)
        indices = own.indices + self.links.position * self.num_experts
        weights, aux_loss = own.weights, own.aux_loss
        foreign = self._route_foreign(logits)
        if foreign is not None:
            slots = self.foreign_candidates().to(x.device)
            indices = torch.cat([indices, slots[foreign.indices]], dim=-1)
            weights = torch.cat([weights, foreign.weights * self.reuse_scale], dim=-1)
            aux_loss = (aux_loss + foreign.aux_loss) / 2  # balanced per owner group: own experts keep their tokens
        return Routing(indices, weights, own.probs, aux_loss, router_z_loss(logits))

    def _route_foreign(self, logits: Tensor) -> Routing | None:
        """The foreign slots' choice (indices into :meth:`foreign_candidates`), or None when no slot may be chosen
        (no group, PSR has opened none yet, or a zero scale at inference, where it adds nothing)."""
        if len(self.group) == 1 or (not self.training and not self.reuse_scale.detach().any()):
            return None
        size, n = len(self.group), self.num_experts
        slot_logits = logits.repeat(1, size - 1)
        if self.owner_bias is not None:
            slot_logits = slot_logits + self.owner_bias.repeat_interleave(n)
        mask = self.open_mask()
        if mask is not None:
            is_open = mask[self.foreign_candidates()].to(logits.device)
            if not is_open.any():
                return None
            slot_logits = slot_logits.masked_fill(~is_open, float("-inf"))
            return self._choose(slot_logits, min(self.top_k, int(is_open.sum())))
        return self._choose(slot_logits, self.top_k)

    def _choose(self, logits: Tensor, top_k: int) -> Routing:
        """Top-k (gates renormalised) or best-per-slice choice among ``logits``' candidates (z-loss left at 0)."""
        probs = logits.softmax(dim=-1)
        if self.slices == 1:
            gates, dispatch = top_k_gates(probs, top_k, renormalize=True)
            indices = probs.topk(top_k, dim=-1).indices
            weights = gates.gather(-1, indices)
        else:
            best = probs.view(len(probs), -1, self.slices).argmax(dim=1)
            indices = best * self.slices + torch.arange(self.slices, device=logits.device)
            chosen = probs.gather(-1, indices)
            weights = chosen / chosen.detach().clamp(min=1e-30)  # 1 in value (0 for a slice class PSR keeps shut)
            dispatch = torch.zeros_like(probs).scatter_(-1, indices, 1.0)
        return Routing(indices, weights, probs, load_balancing_loss(probs, dispatch), torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        planned, self.plan = self.plan, None
        if planned is not None and planned.indices.shape[0] == flat.shape[0]:
            routing = planned
        else:
            routing, self.last_decided_by = self.route(flat), self.index
        nxt = self.links.next
        if self.pregate and nxt is not None:
            plan = nxt.route(flat)
            nxt.plan, nxt.last_decided_by = plan, self.index
            if self.on_plan is not None:
                self.on_plan(nxt, plan)
        self.aux_loss, self.z_loss, self.last_routing = routing.aux_loss, routing.z_loss, routing
        banks = [block.experts for block in self.group]
        return combine_experts(banks, flat, routing.indices, routing.weights).view_as(x)


def link_blocks(blocks: Sequence[MoEBlock], reuse_group: int = 1, pregate: bool = False) -> None:
    """Group ``blocks`` (in depth order) r per ReXMoE group (the last group holds the rest when r does not divide
    their number), give each block of a group its reuse scale (0: no reuse yet), and chain them for pre-gating.

    Raises:
        ValueError: ``reuse_group`` < 1.
    """
    if reuse_group < 1:
        raise ValueError(f"reuse_group must be >= 1, got {reuse_group}")
    for start in range(0, len(blocks), reuse_group):
        group = tuple(blocks[start : start + reuse_group])
        for position, block in enumerate(group):
            block.links.group, block.links.position = group, position
            block.router.enable_reuse(len(group) - 1)
    for index, block in enumerate(blocks):
        block.index, block.pregate = index, pregate
        block.links.next = blocks[index + 1] if index + 1 < len(blocks) else None


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


def active_parameters(module: nn.Module) -> int:
    """Parameters one input runs through: all of them, less the N experts of each MoE block, plus the experts a token
    runs there (k own, and k foreign ones in a reuse group: a reused expert counts once per block that runs it, so
    with N < 2k this can exceed the total)."""
    total = sum(p.numel() for p in module.parameters())
    for block in moe_blocks(module):
        per_expert = sum(p.numel() for p in block.experts[0].parameters())
        used = (block.top_k if block.slices == 1 else block.slices) * (2 if len(block.group) > 1 else 1)
        total -= (block.num_experts - used) * per_expert
    return total
