"""Contrastive loss (in-batch + hard negatives) with the routers' auxiliary losses, and a NaN guard."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.util import cos_sim, dot_score
from torch import Tensor, nn

from sbmoe.heads import SBMoEHead
from sbmoe.heads.moe_block import MoEBlock

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
    return [m for m in model.modules() if isinstance(m, MoEBlock | SBMoEHead)]


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


class QrelAwareInfoNCE:
    """In-batch + hard-negative InfoNCE that never pushes an anchor away from a document judged relevant to it.

    The softmax of anchor ``i`` runs over every document of the batch (all positives, then each negative column, as
    sentence-transformers' ``MultipleNegativesRankingLoss`` lays them out); a candidate that is a qrel of the anchor
    (``relevant`` pairs) or the same document as its positive is masked out, bar the anchor's own positive. With
    ``symmetric``, a document -> query term (each positive against the batch's anchors, masked alike) is averaged in.

    Args:
        similarity: ``cos`` or ``dot``.
        temperature: Softmax temperature (the scale is its inverse).
        relevant: K x 2 int64 ``(anchor row, document row)`` pairs of every judged-relevant document per anchor.
        num_docs: Number of document rows (to key the pairs).
        symmetric: Add the document -> query term.
    """

    def __init__(
        self, similarity: str, temperature: float, relevant: Tensor, num_docs: int, symmetric: bool = False
    ) -> None:
        if similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {similarity!r}; expected one of {sorted(SIMILARITIES)}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.similarity = SIMILARITIES[similarity]
        self.scale = 1.0 / temperature
        self.num_docs = num_docs
        self.keys = torch.unique(relevant[:, 0].long() * num_docs + relevant[:, 1].long())
        self.symmetric = symmetric

    def mask(self, anchor_rows: Tensor, doc_rows: Tensor) -> Tensor:
        """B x (B * C) True where the candidate must leave anchor ``i``'s softmax (``doc_rows`` is B x C: the
        positive, then the negatives of each batch row)."""
        candidates = doc_rows.T.reshape(-1)
        keys = anchor_rows.unsqueeze(1) * self.num_docs + candidates.unsqueeze(0)
        masked = torch.isin(keys, self.keys.to(keys.device)) | (candidates.unsqueeze(0) == doc_rows[:, :1])
        own = torch.arange(len(anchor_rows), device=masked.device)
        masked[own, own] = False
        return masked

    def per_anchor(self, columns: list[Tensor], anchor_rows: Tensor, doc_rows: Tensor) -> Tensor:
        """The loss of each batch row (B values): ``columns`` are the anchor embeddings, then one per document
        column (positive, negative_1, ...)."""
        anchors, docs = columns[0], torch.cat(columns[1:])
        masked = self.mask(anchor_rows, doc_rows)
        logits = (self.scale * self.similarity(anchors, docs)).masked_fill(masked, float("-inf"))
        own = torch.arange(len(anchors), device=logits.device)
        loss = torch.logsumexp(logits, dim=1) - logits[own, own]
        if self.symmetric:
            backward = (self.scale * self.similarity(columns[1], anchors)).masked_fill(
                masked[:, : len(anchors)].T, float("-inf")
            )
            loss = (loss + torch.logsumexp(backward, dim=1) - backward[own, own]) / 2
        return loss

    def __call__(self, columns: list[Tensor], anchor_rows: Tensor, doc_rows: Tensor) -> Tensor:
        """The mean loss over the batch (see :meth:`per_anchor`)."""
        return self.per_anchor(columns, anchor_rows, doc_rows).mean()


class MoEContrastiveLoss(nn.Module):
    """:class:`QrelAwareInfoNCE` over (query, positive, negatives...) columns plus the routers' weighted aux and z
    losses, for the SentenceTransformerTrainer.

    Each training row carries its example index as ``label``; ``rows`` (the prepared ``[anchor, positive,
    negatives...]`` rows) turn it into the anchor and document rows the loss masks by. Returns a dict of
    components, which the trainer sums and logs separately. The aux loss is averaged over the routed modules (head,
    MoE layers) and the forward passes of one step (the query column and the merged document columns).
    """

    def __init__(
        self,
        model: nn.Module,
        contrastive: QrelAwareInfoNCE,
        rows: Tensor,
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
    ):
        super().__init__()
        self.model = model
        self.contrastive = contrastive
        self.rows = rows
        self.aux_loss_weight = aux_loss_weight
        self.z_loss_weight = z_loss_weight
        self.steps = 0

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> dict[str, Tensor]:
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
        rows = self.rows[labels.cpu()].to(embeddings[0].device)
        losses = {"contrastive": self.contrastive(embeddings, rows[:, 0], rows[:, 1:])}
        if aux and self.aux_loss_weight:
            losses["aux"] = self.aux_loss_weight * torch.stack(aux).mean()
        if z and self.z_loss_weight:
            losses["z"] = self.z_loss_weight * torch.stack(z).mean()
        if self.model.training:
            self.steps += 1
            check_finite(sum(losses.values()), f"training step {self.steps}")
        return losses
