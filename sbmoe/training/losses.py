"""Contrastive loss (in-batch + hard negatives) with the routers' auxiliary losses, and a NaN guard."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from sentence_transformers.util import cos_sim, dot_score
from torch import Tensor, nn

from sbmoe.heads import SBMoEHead
from sbmoe.heads.moe_block import MoEBlock
from sbmoe.heads.stacked import StackedMoEHead

SIMILARITIES = {"cos": cos_sim, "dot": dot_score}


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or infinite."""


def check_finite(loss: Tensor, where: str) -> None:
    """Raise :class:`TrainingDivergedError` naming ``where`` when ``loss`` is NaN or infinite."""
    if not torch.isfinite(loss).all():
        raise TrainingDivergedError(
            f"training loss is {loss.detach().float().item()} at {where}: training stopped. "
            "Lower the learning rate, raise the temperature, or check the data for empty texts."
        )


def routed_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that set ``aux_loss`` / ``z_loss`` on each forward: MoE blocks (in the encoder or a
    stacked head) and SB-MoE heads (a stacked head only averages its blocks', so it is not counted twice)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, MoEBlock) or (isinstance(m, SBMoEHead) and not isinstance(m, StackedMoEHead))
    ]


def domain_experts(num_experts: int, num_domains: int) -> Tensor:
    """D x E 0/1 mask: expert ``e`` belongs to domain ``e % D`` (each domain gets ``E / D`` experts).

    Raises:
        ValueError: fewer experts than domains.
    """
    if num_experts < num_domains:
        raise ValueError(f"--domain-loss-weight needs at least one expert per source: {num_experts} < {num_domains}")
    return (torch.arange(num_experts).unsqueeze(0) % num_domains == torch.arange(num_domains).unsqueeze(1)).float()


def domain_routing_loss(probs: Tensor, domains: Tensor, num_domains: int) -> Tensor:
    """DESIRE-ME-style router supervision: ``-log`` of the router probability on the input's domain's experts.

    Args:
        probs: N x E router probabilities.
        domains: N domain (training source) indices.
        num_domains: How many sources there are.
    """
    mask = domain_experts(probs.shape[-1], num_domains).to(probs.device)
    return -(probs * mask[domains]).sum(dim=-1).clamp_min(1e-9).log().mean()


def info_nce(similarity: str, temperature: float) -> MultipleNegativesRankingLoss:
    """sentence-transformers' in-batch + hard-negative InfoNCE with ``similarity`` and ``1 / temperature`` scale.

    Use its ``compute_loss_from_embeddings([queries, positives, negatives_1, ...], None)`` on ready embeddings.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}; expected one of {sorted(SIMILARITIES)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return MultipleNegativesRankingLoss(None, scale=1.0 / temperature, similarity_fct=SIMILARITIES[similarity])


class MoEContrastiveLoss(nn.Module):
    """InfoNCE over (query, positive, negatives...) columns plus the routers' weighted aux and z losses.

    Returns a dict of components, which the SentenceTransformerTrainer sums and logs separately. The aux
    loss is averaged over the routed modules (head, MoE layers) and the forward passes of one step (the query
    column and the merged document columns).
    """

    def __init__(
        self,
        model: nn.Module,
        similarity: str = "cos",
        temperature: float = 0.05,
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
    ):
        super().__init__()
        self.model = model
        self.contrastive = info_nce(similarity, temperature)
        self.aux_loss_weight = aux_loss_weight
        self.z_loss_weight = z_loss_weight
        self.steps = 0

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> dict[str, Tensor]:
        aux: list[Tensor] = []
        z: list[Tensor] = []

        def collect(module: nn.Module, _inputs: Any, _output: Any) -> None:
            aux.append(module.aux_loss)
            z.append(module.z_loss)

        hooks = [module.register_forward_hook(collect) for module in routed_modules(self.model)]
        try:
            embeddings = embed_columns(self.model, sentence_features)
        finally:
            for hook in hooks:
                hook.remove()
        losses = {"contrastive": self.contrastive.compute_loss_from_embeddings(embeddings, labels)}
        if aux and self.aux_loss_weight:
            losses["aux"] = self.aux_loss_weight * torch.stack(aux).mean()
        if z and self.z_loss_weight:
            losses["z"] = self.z_loss_weight * torch.stack(z).mean()
        if self.model.training:
            self.steps += 1
            check_finite(sum(losses.values()), f"training step {self.steps}")
        return losses
