"""Expert banks: each expert runs only on the rows routed to it (index_select / index_add_, a loop over experts).

An :class:`ExpertBank` is an ``nn.ModuleList`` of expert modules, so its parameters keep the names
``experts.<i>.up.weight`` / ``experts.<i>.down.weight`` wherever the bank is attached as ``experts``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from transformers.activations import ACT2FN

Transform = Callable[[Tensor], Tensor]


class FeedForwardExpert(nn.Module):
    """Linear(dim -> hidden) -> activation -> Linear(hidden -> dim); ``relu`` is the SB-MoE head's expert."""

    def __init__(self, dim: int, hidden: int, activation: str = "relu"):
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.activation = activation
        self.act = ACT2FN[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.act(self.up(x)))


class ExpertBank(nn.ModuleList):
    """A list of experts that combines them per row by sparse indices and weights."""

    def combine(self, x: Tensor, indices: Tensor, weights: Tensor, transform: Transform | None = None) -> Tensor:
        """``sum_j weights[n, j] * transform(expert[indices[n, j]](x[n]))`` for every row n.

        Args:
            x: N x H inputs.
            indices: N x k expert indices (into this bank).
            weights: N x k combination weights.
            transform: Applied to each expert's output before weighting (e.g. L2 normalisation).
        """
        return combine_experts([self], x, indices, weights, transform)


def combine_experts(
    banks: Sequence[ExpertBank], x: Tensor, indices: Tensor, weights: Tensor, transform: Transform | None = None
) -> Tensor:
    """:meth:`ExpertBank.combine` over the concatenation of ``banks``: index ``b * len(bank) + e`` is expert e of
    bank b (all banks of the same size). Each expert runs once, on the rows that chose it."""
    size = len(banks[0])
    rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(indices.shape[1])
    flat, flat_weights = indices.reshape(-1), weights.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=size * len(banks)).tolist()
    out = None
    start = 0
    for index, count in enumerate(counts):
        if not count:
            continue
        slots = order[start : start + count]
        start += count
        token = rows.index_select(0, slots)
        y = banks[index // size][index % size](x.index_select(0, token))
        if transform is not None:
            y = transform(y)
        y = y * flat_weights.index_select(0, slots).unsqueeze(-1).to(y.dtype)
        if out is None:
            out = torch.zeros(x.shape[0], y.shape[-1], dtype=y.dtype, device=x.device)
        out.index_add_(0, token, y)
    if out is None:
        return torch.zeros_like(x)
    return out
