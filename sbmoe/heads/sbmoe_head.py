"""The SB-MoE head: one Mixture-of-Experts block on the pooled embedding, as a sentence-transformers module.

Data flow for a batch of pooled embeddings ``x`` (N x H)::

    logits = router(x) (+ noise while training)   gates = softmax(logits)
    faithful: y = normalize(sum_i g_i * E_i(x)) + x      (Sokli et al.; top-1 while training)
    learned:  y = sum_{i in top-k} g'_i * normalize(E_i(x)) + x   (g' renormalised over the chosen experts)

``strength`` (default 1) scales the experts' term: 0 is the backbone itself, 1 the trained head, and values in
between interpolate the two (WiSE-FT style; ``finetune --tune-strength`` picks it on dev).

In ``faithful`` top-1 mode the gate cancels inside ``normalize`` so the router receives no gradient (the
paper's flaw, kept for reproduction). ``learned`` mode applies the gates after normalising each expert, so
the router learns, and exposes a Switch-style load-balancing loss in :attr:`SBMoEHead.aux_loss`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sbmoe.heads.base import PooledHead
from sbmoe.heads.config import HeadConfig
from sbmoe.heads.experts import ExpertBank, FeedForwardExpert
from sbmoe.heads.routing import Router, load_balancing_loss, router_z_loss, top_k_gates


class Expert(FeedForwardExpert):
    """Linear(H -> hidden) -> ReLU -> Linear(hidden -> H)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(dim, hidden, "relu")


class SBMoEHead(PooledHead):
    """Mixture-of-Experts block applied to ``features["sentence_embedding"]``, built from a :class:`HeadConfig`
    (a resolved one: see :func:`sbmoe.heads.build.resolve_head`; ``build_model`` resolves it).

    The config's options, as this head reads them: ``num_experts`` E; ``top_k`` experts kept per input in
    ``learned`` mode while training (and at inference with ``topk``); ``routing`` ``learned`` (gradient reaches the
    router, load-balancing loss) or ``faithful`` (the paper); ``inference`` ``soft`` (all experts), ``top1`` or
    ``topk``; ``expert_hidden`` (default H // 2); ``noise`` (learned Gaussian noise on the router logits while
    training); ``residual`` (add the input back); ``identity_init`` (scale the experts' combination by a learnable
    scalar that starts at 0, ReZero, so the head starts as the identity; zeroing the last expert layer instead
    would feed ``normalize(0)``, whose gradient is ill-defined); ``query_only`` (DESIRE-ME style: inputs encoded as
    documents, ``task="document"``, pass through unchanged, their routing still recorded; inputs without a task
    are transformed, and :class:`~sbmoe.model.SBMoEModel` gives ``encode()`` without a task the document route);
    ``strength`` (fixed weight of the experts' term: 0 the backbone's embedding, 1 the head as trained);
    ``expert_dropout`` (while training, the probability that an expert is hidden from the router for an input,
    never all of them).

    Args:
        in_features: Embedding size H of the backbone's pooled output.
        config: The head's options (default: :class:`HeadConfig`'s).
        normalize_output: L2-normalise the head's output (for cosine similarity).
    """

    config_keys: list[str] = [
        "in_features",
        "num_experts",
        "top_k",
        "routing",
        "inference",
        "expert_hidden",
        "noise",
        "residual",
        "normalize_output",
        "identity_init",
        "query_only",
        "strength",
        "expert_dropout",
    ]

    def __init__(self, in_features: int, config: HeadConfig | None = None, normalize_output: bool = False):
        super().__init__()
        config = config or HeadConfig()
        if in_features < 2:
            raise ValueError(f"in_features must be >= 2, got {in_features}")
        self.in_features = in_features
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.routing = config.routing
        self.inference = config.inference
        self.expert_hidden = config.expert_hidden or in_features // 2
        self.noise = config.noise
        self.residual = config.residual
        self.normalize_output = normalize_output
        self.identity_init = config.identity_init
        self.expert_scale = nn.Parameter(torch.zeros(())) if config.identity_init else None
        self.query_only = config.query_only
        self.strength = float(config.strength)
        self.expert_dropout = float(config.expert_dropout)
        self.experts = ExpertBank(Expert(in_features, self.expert_hidden) for _ in range(self.num_experts))
        self.router = Router(in_features, self.num_experts, self.noise, hidden=in_features // 2)
        self.aux_loss: Tensor = torch.zeros(())
        self.z_loss: Tensor = torch.zeros(())

    def _selected_k(self) -> int:
        """How many experts each input uses in the current mode (train/eval)."""
        if self.training:
            return 1 if self.routing == "faithful" else self.top_k
        return {"soft": self.num_experts, "top1": 1, "topk": self.top_k}[self.inference]

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Route a batch.

        Returns:
            ``(gates, probs, dispatch)``: the N x E combination weights (zero for unused experts), the
            router's softmax probabilities, and the N x E 0/1 dispatch mask the load-balancing loss counts
            (the chosen experts, or each input's top-1 expert under soft routing, as in Switch).
        """
        logits = self.router(x)
        self.z_loss = router_z_loss(logits)
        if self.training and self.expert_dropout:
            hidden = torch.rand_like(logits) < self.expert_dropout
            hidden &= ~hidden.all(dim=-1, keepdim=True)
            logits = logits.masked_fill(hidden, float("-inf"))
        probs = logits.softmax(dim=-1)
        gates, dispatch = top_k_gates(probs, self._selected_k(), renormalize=self.routing == "learned")
        return gates, probs, dispatch

    def forward(self, features: dict[str, Tensor | Any], **kwargs) -> dict[str, Tensor | Any]:
        x = features["sentence_embedding"]
        gates, probs, dispatch = self.gates(x)
        if self.query_only and kwargs.get("task", features.get("task")) == "document":
            y = x
        else:
            y = self._combine(x, gates)
        if self.normalize_output:
            y = F.normalize(y, dim=-1)
        self.aux_loss = load_balancing_loss(probs, dispatch)
        features["sentence_embedding"] = y
        features["expert_index"] = probs.argmax(dim=-1)
        features["router_probs"] = probs
        return features

    def _combine(self, x: Tensor, gates: Tensor) -> Tensor:
        """The experts' outputs combined by ``gates`` (per routing mode), plus the residual."""
        indices = gates.topk(self._selected_k(), dim=-1).indices
        weights = gates.gather(-1, indices)
        if self.routing == "faithful":
            y = F.normalize(self.experts.combine(x, indices, weights), dim=-1)
        else:
            y = self.experts.combine(x, indices, weights, transform=lambda out: F.normalize(out, dim=-1))
        if self.expert_scale is not None:
            y = self.expert_scale * y
        if self.strength != 1.0:
            y = self.strength * y
        if self.residual:
            y = y + x
        return y
