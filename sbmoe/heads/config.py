"""The configuration of a head on the pooled vector (:class:`HeadConfig`) and of MoE layers inside the encoder
(:class:`MoELayersConfig`): what :func:`sbmoe.build_model` builds, what ``sbmoe finetune`` parses its head flags
into, and what a model folder stores (the head's ``sbmoe_config.json`` keys are these fields' names)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

from sbmoe.heads.routing import PSR_SCHEDULES

ROUTING_MODES = ("learned", "faithful")
INFERENCE_MODES = ("soft", "top1", "topk")
UPCYCLE_INITS = ("copies", "fine")
MoELayers = str | Sequence[int]


@dataclass(frozen=True)
class HeadConfig:
    """Every option of the head after pooling (``sbmoe finetune`` flags of the same names, dashed).

    ``head`` ``dense`` is a one-expert head (``dense_size`` ``total``: as wide as the SB-MoE head of
    ``num_experts`` has parameters), ``none`` no head; ``head_layers`` L > 0 makes a stack of L MoE layers
    (:class:`~sbmoe.heads.stacked.StackedMoEHead`, ``reuse_group``, ``psr`` and ``pregate`` apply to it).
    ``identity_init`` holds for learned, query-only and dense heads only (a faithful head is the paper's).
    """

    _argument_group_name = "head (on the pooled vector)"

    head: Literal["sbmoe", "dense", "none"] = field(default="sbmoe", metadata={"help": "head on the pooled vector"})
    num_experts: int = field(default=6, metadata={"help": "experts in the SB-MoE head (per MoE layer: N)"})
    top_k: int = field(default=2, metadata={"help": "experts each input is routed to while training"})
    routing: Literal["learned", "faithful"] = field(
        default="learned",
        metadata={"help": "learned: gates scale normalised experts (the router learns); faithful: the paper's"},
    )
    inference: Literal["soft", "top1", "topk"] = field(
        default="soft", metadata={"help": "at encode time: all experts by gate weight, the top one, or the top k"}
    )
    expert_hidden: int | None = field(default=None, metadata={"help": "expert width (default H/2)"})
    dense_size: Literal["expert", "total"] = field(
        default="expert", metadata={"help": "dense head: one expert's width, or the parameters of --num-experts"}
    )
    noise: bool = field(default=True, metadata={"help": "noisy router logits while training"})
    residual: bool = field(default=True, metadata={"help": "add the input back to the experts' combination"})
    identity_init: bool = field(
        default=False,
        metadata={"help": "learned / query-only heads start as the backbone (ReZero scale 0); faithful: the paper's"},
    )
    query_only: bool = field(default=False, metadata={"help": "transform queries only; documents pass through"})
    expert_dropout: float = field(default=0.0, metadata={"help": "share of experts hidden from the router per input"})
    strength: float = field(default=1.0, metadata={"help": "weight of the experts' term (0 = backbone, 1 = head)"})
    head_layers: int = field(default=0, metadata={"help": "L > 0: a stack of L MoE layers after pooling as the head"})
    reuse_group: int = field(
        default=1, metadata={"help": "ReXMoE: MoE layers per group whose experts every layer of it may use"}
    )
    psr: Literal["none", "linear", "step"] = field(
        default="none", metadata={"help": "progressive scaling routing: open the group's experts during training"}
    )
    pregate: bool = field(default=False, metadata={"help": "pre-gated MoE: choose experts one MoE layer ahead"})

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts={self.num_experts}, got {self.top_k}")
        if self.routing not in ROUTING_MODES:
            raise ValueError(f"unknown routing mode {self.routing!r}; expected one of {ROUTING_MODES}")
        if self.inference not in INFERENCE_MODES:
            raise ValueError(f"unknown inference mode {self.inference!r}; expected one of {INFERENCE_MODES}")
        if not 0 <= self.expert_dropout < 1:
            raise ValueError(f"expert_dropout must be in [0, 1), got {self.expert_dropout}")
        if self.strength < 0:
            raise ValueError(f"strength must be >= 0, got {self.strength}")
        if self.psr not in PSR_SCHEDULES:
            raise ValueError(f"unknown PSR schedule {self.psr!r}; expected one of {PSR_SCHEDULES}")
        if self.head_layers and (self.head != "sbmoe" or self.routing != "learned"):
            raise ValueError("head_layers (a stacked head) needs head 'sbmoe' and routing 'learned'")

    @property
    def stack_options(self) -> bool:
        """Whether ``reuse_group``, ``psr`` or ``pregate`` differ from their defaults (they need MoE layers)."""
        return (self.reuse_group, self.psr, self.pregate) != (1, "none", False)


HEAD_FIELDS = tuple(f.name for f in fields(HeadConfig))


@dataclass(frozen=True)
class MoELayersConfig:
    """MoE layers upcycled inside a BERT-style encoder (see :func:`sbmoe.heads.upcycle.upcycle_encoder`).

    Attributes:
        moe_layers: ``"all"``, ``"every-K"``, ``"1,3"`` or a list of layer indices.
        num_experts: Experts per MoE layer (N).
        top_k: Experts per token (``copies``), or slices per layer (``fine``).
        init: ``copies`` (every expert a copy of the dense block) or ``fine`` (fine-grained slices).
        reuse_group: ReXMoE group size r (consecutive MoE layers share their experts' pool).
        psr: Progressive scaling routing while training: ``none``, ``linear`` or ``step``.
        pregate: Each MoE layer's router input is the previous MoE layer's input (Pre-gated MoE).
    """

    moe_layers: MoELayers = "all"
    num_experts: int = 8
    top_k: int = 2
    init: str = "copies"
    reuse_group: int = 1
    psr: str = "none"
    pregate: bool = False

    def __post_init__(self) -> None:
        if self.init not in UPCYCLE_INITS:
            raise ValueError(f"unknown upcycling init {self.init!r}; expected one of {UPCYCLE_INITS}")
        if self.psr not in PSR_SCHEDULES:
            raise ValueError(f"unknown PSR schedule {self.psr!r}; expected one of {PSR_SCHEDULES}")
