"""Routing statistics as values: counted from what a forward returns, never kept in a module.

:class:`RoutingStats` holds a head's top-1 expert counts over some encoded inputs (from the ``expert_index`` its
forward returns; per layer for a stacked head). :class:`RoutingRecorder` collects the top-1 candidates of MoE
blocks inside an encoder through forward hooks it owns, so encoding changes no module state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sbmoe.heads.moe_block import MoEBlock, Routing


def top_candidate(routing: Routing) -> Tensor:
    """Each token's top-1 candidate: the one of largest weight (foreign gates times the reuse scale)."""
    return routing.indices.gather(-1, routing.weights.abs().argmax(dim=-1, keepdim=True))[:, 0]


def block_utilization(block: MoEBlock, counts: Sequence[int]) -> dict[str, Any]:
    """Top-1 shares of a block's candidates from their ``counts`` (candidate ``g * N + e``: expert e of group
    member g), the candidates that are the block's own experts (``own_candidates``: first and past-the-last), the
    share that went to them, and the reuse scale (None outside a group)."""
    total = int(sum(counts))
    shares = [c / total for c in counts] if total else [0.0] * len(counts)
    own = block.links.position * block.num_experts
    scale = None if block.reuse_scale is None else block.reuse_scale.item()
    return {
        "shares": shares,
        "own_candidates": [own, own + block.num_experts],
        "own_share": sum(shares[own : own + block.num_experts]),
        "total": total,
        "reuse_scale": scale,
    }


@dataclass(frozen=True)
class RoutingStats:
    """Inputs routed to each expert by top-1 choice; for a stacked head also each layer's
    :func:`block_utilization`."""

    counts: tuple[int, ...]
    layers: tuple[dict[str, Any], ...] = ()

    @classmethod
    def of(cls, expert_index: np.ndarray, num_experts: int, layers: Sequence[dict[str, Any]] = ()) -> RoutingStats:
        """The counts of ``expert_index`` (one top-1 expert per input), with a stacked head's ``layers``."""
        return cls(tuple(np.bincount(expert_index, minlength=num_experts).tolist()), tuple(layers))

    @property
    def total(self) -> int:
        """Inputs counted."""
        return sum(self.counts)

    def as_dict(self) -> dict[str, Any]:
        """``{"counts", "shares", "entropy" (nats), "total"}``; for a stacked head ``{"layers": [...]}`` instead."""
        if self.layers:
            return {"layers": list(self.layers)}
        total = self.total
        shares = [c / total if total else 0.0 for c in self.counts]
        entropy = -sum(s * math.log(s) for s in shares if s > 0)
        return {"counts": list(self.counts), "shares": shares, "entropy": entropy, "total": total}


class RoutingRecorder:
    """Top-1 candidate counts of each of ``blocks`` over the forwards run without gradient while it is open.

    Use as a context manager: its forward hooks are registered on entry and removed on exit; the counts live in
    the recorder, owned by its caller. While open it counts every forward of the blocks, from any caller.
    """

    def __init__(self, blocks: Sequence[MoEBlock]):
        self.blocks = list(blocks)
        self.counts = [torch.zeros(b.candidates, dtype=torch.long) for b in self.blocks]
        self._hooks: list[Any] = []

    def __enter__(self) -> RoutingRecorder:
        for i, block in enumerate(self.blocks):
            self._hooks.append(block.register_forward_hook(lambda b, _in, _out, i=i: self._record(i, b)))
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _record(self, i: int, block: MoEBlock) -> None:
        if not torch.is_grad_enabled() and block.last_routing is not None:
            top = top_candidate(block.last_routing).cpu()
            self.counts[i] += torch.bincount(top, minlength=block.candidates)

    def utilization(self) -> list[dict[str, Any]]:
        """:func:`block_utilization` of each block, in order."""
        return [block_utilization(b, c.tolist()) for b, c in zip(self.blocks, self.counts, strict=True)]
