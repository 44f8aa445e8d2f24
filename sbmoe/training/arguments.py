"""The arguments of ``sbmoe finetune`` (one dataclass, from flags or a JSON file) and the model they describe."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from sbmoe.heads import SBMoEHead
from sbmoe.heads.stacked import StackedMoEHead
from sbmoe.model import SBMoEModel, build_model


@dataclass
class FinetuneArguments:
    """Arguments of ``sbmoe finetune`` (flags use dashes: ``--train-data``)."""

    backbone: str = field(
        default="minilm",
        metadata={"help": "minilm (MiniLM-L6), minilm-l3 / minilm-l2 (its first layers), a name, Hub id or folder"},
    )
    train_data: str = field(
        default="scifact:train",
        metadata={"help": "NAME:SPLIT, irds:<id> or a .jsonl file; several, comma-separated, train together"},
    )
    train_weights: str = field(
        default="equal",
        metadata={
            "help": "batches per source: equal, temperature:T (size ** 1/T), proportional to size, or one weight each"
        },
    )
    one_positive_per_epoch: bool = field(
        default=False, metadata={"help": "head mode: one random positive per query per epoch (the SB-MoE repository)"}
    )
    max_positives_per_query: int = field(
        default=0, metadata={"help": "keep at most N relevant documents per training query (0: all)"}
    )
    eval_data: str = field(default="", metadata={"help": "comma-separated NAME:SPLIT or irds:<id> to evaluate"})
    data_dir: str | None = field(
        default=None, metadata={"help": "folder of BEIR datasets (default $SBMOE_DATA or ../shared/data)"}
    )
    output_dir: str = field(default="out/finetune", metadata={"help": "model folder + run.json"})
    head: Literal["sbmoe", "dense", "none"] = field(default="sbmoe", metadata={"help": "head on the pooled vector"})
    num_experts: int = field(default=6, metadata={"help": "experts in the SB-MoE head"})
    top_k: int = field(default=2, metadata={"help": "experts each input is routed to while training"})
    routing: Literal["learned", "faithful"] = field(
        default="learned",
        metadata={"help": "learned: gates scale normalised experts (the router learns); faithful: the paper's"},
    )
    inference: Literal["soft", "top1", "topk"] = field(
        default="soft", metadata={"help": "at encode time: all experts by gate weight, the top one, or the top k"}
    )
    expert_hidden: int | None = field(default=None, metadata={"help": "expert width (default H/2)"})
    moe_layers: str = field(
        default="", metadata={"help": "make these backbone layers MoE layers: all, every-2, 1,3 (--train full)"}
    )
    upcycle_init: Literal["copies", "fine"] = field(
        default="copies", metadata={"help": "MoE layers' experts: copies of the dense block, or fine-grained slices"}
    )
    head_layers: int = field(default=0, metadata={"help": "L > 0: a stack of L MoE layers after pooling as the head"})
    reuse_group: int = field(
        default=1, metadata={"help": "ReXMoE: MoE layers per group whose experts every layer of it may use"}
    )
    psr: Literal["none", "linear", "step"] = field(
        default="none", metadata={"help": "progressive scaling routing: open the group's experts during training"}
    )
    pregate: bool = field(default=False, metadata={"help": "pre-gated MoE: choose experts one MoE layer ahead"})
    dense_size: Literal["expert", "total"] = field(
        default="expert", metadata={"help": "dense head: one expert's width, or the parameters of --num-experts"}
    )
    identity_init: bool = field(
        default=True,
        metadata={"help": "learned / query-only heads start as the backbone (ReZero scale 0); faithful: the paper's"},
    )
    router_init: Literal["random", "kmeans"] = field(
        default="random", metadata={"help": "kmeans: router fitted to k-means clusters of the training corpus"}
    )
    query_only: bool = field(default=False, metadata={"help": "transform queries only; documents pass through"})
    expert_dropout: float = field(default=0.0, metadata={"help": "share of experts hidden from the router per input"})
    tune_strength: bool = field(
        default=False,
        metadata={"help": "after training, pick the head's strength (0 = backbone .. 1 = trained head) on dev"},
    )
    noise: bool = field(default=True, metadata={"help": "noisy router logits while training"})
    similarity: Literal["cos", "dot"] = field(default="cos", metadata={"help": "cosine or dot-product scores"})
    temperature: float = field(default=0.05, metadata={"help": "InfoNCE temperature"})
    train: Literal["head", "full"] = field(default="head", metadata={"help": "head alone (cached) or everything"})
    learning_rate: float = field(default=1e-3, metadata={"help": "learning rate of the head"})
    backbone_learning_rate: float = field(default=2e-5, metadata={"help": "learning rate of the backbone (full)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (the study: 0.1)"})
    aux_loss_weight: float = field(default=0.01, metadata={"help": "weight of the load-balancing loss"})
    domain_loss_weight: float = field(
        default=0.0,
        metadata={"help": "head mode, several sources: router loss sending each source to its own experts"},
    )
    z_loss_weight: float = field(default=0.0, metadata={"help": "weight of the router z-loss"})
    anchor_weight: float = field(default=0.0, metadata={"help": "pull toward the input embedding (head mode)"})
    hard_negatives: int = field(default=7, metadata={"help": "negatives per query, mined with the backbone alone"})
    negatives_skip: int = field(
        default=10, metadata={"help": "mining: top-ranked non-positives skipped (likely unjudged positives)"}
    )
    negatives_depth: int = field(default=100, metadata={"help": "mining: negatives come from the top DEPTH ranks"})
    negatives_margin: float = field(
        default=0.0, metadata={"help": "mining: a negative scores at most the weakest positive minus this"}
    )
    negatives_relative_margin: float = field(
        default=0.05, metadata={"help": "mining: a negative scores at most (1 - this) x the weakest positive"}
    )
    negatives_sampling: Literal["top", "random"] = field(
        default="top", metadata={"help": "mining: the best eligible negatives, or a random draw of them"}
    )
    symmetric_loss: bool = field(default=False, metadata={"help": "add the document -> query InfoNCE term"})
    self_supervised: Literal["none", "title", "crop"] = field(
        default="none",
        metadata={"help": "add title -> document or cropped span -> document pairs from the training corpus"},
    )
    epochs: float = field(default=30, metadata={"help": "training epochs (the study: 40 with patience 4)"})
    max_steps: int = field(default=-1, metadata={"help": "full mode: stop after this many steps (overrides epochs)"})
    batch_size: int = field(default=64, metadata={"help": "training batch size (in-batch negatives)"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, sampling and noise"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: every core)"})
    dev_queries: int = field(
        default=0,
        metadata={"help": "train queries held out as a dev split, positives unseen in train (the study: 100)"},
    )
    dev_weighting: Literal["equal", "queries"] = field(
        default="equal", metadata={"help": "several sources: dev score as the mean over sources, or over dev queries"}
    )
    eval_steps: int = field(
        default=0, metadata={"help": "full mode: score dev every N steps (0: each epoch's end), keep the best"}
    )
    patience: int = field(
        default=0, metadata={"help": "head mode: epochs without dev gain before stopping (0: never; the study: 4)"}
    )
    frozen_layers: int = field(
        default=0,
        metadata={"help": "full mode: freeze the embeddings and first K layers; their token states are computed once"},
    )
    token_cache_dir: str | None = field(
        default=None, metadata={"help": "keep the frozen layers' token states here for later runs (default: memory)"}
    )
    max_seq_length: int = field(default=256, metadata={"help": "tokens per text (longer texts are cut)"})
    save_steps: int = field(default=500, metadata={"help": "full mode: checkpoint every N steps"})
    logging_steps: int = field(default=10, metadata={"help": "full mode: log the loss every N steps"})
    resume: bool = field(
        default=False, metadata={"help": "continue from the last checkpoint (head: one per epoch; full: --save-steps)"}
    )
    save_model: bool = field(default=True, metadata={"help": "save the model (--no-save-model: only run.json)"})
    keep_identical_ids: bool = field(
        default=False, metadata={"help": "eval: keep documents whose id equals the query id (BEIR drops them)"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace a finished run in --output-dir"})
    cache_dir: str | None = field(
        default=None, metadata={"help": "embedding cache (default $SBMOE_CACHE or ~/.cache/sbmoe)"}
    )

    def __post_init__(self) -> None:
        if self.domain_loss_weight and (self.train == "full" or "," not in self.train_data):
            raise ValueError("--domain-loss-weight needs --train head and several --train-data sources")
        if self.tune_strength and (self.head == "none" or not self.dev_queries):
            raise ValueError("--tune-strength needs a head and a dev split (--dev-queries > 0)")
        if self.one_positive_per_epoch and self.train != "head":
            raise ValueError("--one-positive-per-epoch samples the head trainer's rows: it needs --train head")
        if self.frozen_layers and self.train != "full":
            raise ValueError("--frozen-layers freezes the bottom of the backbone that --train full trains")
        self._check_moe()

    def _check_moe(self) -> None:
        """Refuse MoE-layer flags that cannot work together."""
        if self.moe_layers and self.head_layers:
            raise ValueError("--moe-layers (MoE in the backbone) and --head-layers (stacked head) exclude each other")
        if self.moe_layers and self.train != "full":
            raise ValueError("--moe-layers trains MoE layers inside the backbone: it needs --train full")
        if self.head_layers and (self.head != "sbmoe" or self.routing != "learned" or self.router_init != "random"):
            raise ValueError("--head-layers needs --head sbmoe, --routing learned and --router-init random")
        moe_options = (self.reuse_group, self.psr, self.pregate) != (1, "none", False)
        if moe_options and not (self.moe_layers or self.head_layers):
            raise ValueError("--reuse-group, --psr and --pregate need --moe-layers or --head-layers")


def make_model(args: FinetuneArguments) -> SBMoEModel:
    """The backbone (with MoE layers for ``--moe-layers``) with the head that ``args`` asks for (output normalised
    for cosine similarity)."""
    cos = args.similarity == "cos"
    moe: dict[str, Any] = {}
    if args.moe_layers:
        moe = {"moe_layers": args.moe_layers, "num_experts": args.num_experts, "top_k": args.top_k}
        moe.update(init=args.upcycle_init, reuse_group=args.reuse_group, psr=args.psr, pregate=args.pregate)
    base = build_model(args.backbone, normalize=cos and args.head == "none", max_seq_length=args.max_seq_length, **moe)
    if args.head == "none":
        return base
    dim = base.get_embedding_dimension()
    identity = args.identity_init and (args.routing == "learned" or args.query_only or args.head == "dense")
    options: dict[str, Any] = {"identity_init": identity, "noise": args.noise, "normalize_output": cos}
    options["query_only"] = args.query_only
    if args.head == "sbmoe":
        options.update(num_experts=args.num_experts, top_k=args.top_k, routing=args.routing, inference=args.inference)
        options["expert_dropout"] = args.expert_dropout
        options["expert_hidden"] = args.expert_hidden
    else:
        options.update(num_experts=1, top_k=1, routing="learned", inference="soft")
        options["expert_hidden"] = dense_hidden(dim, args) if args.dense_size == "total" else args.expert_hidden
    if args.head_layers:
        stack = {"reuse_group": args.reuse_group, "psr": args.psr, "pregate": args.pregate}
        options = {k: v for k, v in options.items() if k not in ("routing", "inference")}
        head: SBMoEHead = StackedMoEHead(dim, args.head_layers, **stack, **options)
    else:
        head = SBMoEHead(dim, **options)
    return SBMoEModel(modules=[*base, head], device=str(base.device), similarity_fn_name="cosine" if cos else "dot")


def dense_hidden(dim: int, args: FinetuneArguments) -> int:
    """Hidden width of a one-expert head with as many parameters as the SB-MoE head of ``args``."""
    moe = SBMoEHead(dim, num_experts=args.num_experts, expert_hidden=args.expert_hidden, noise=args.noise)
    one = SBMoEHead(dim, num_experts=1, top_k=1, expert_hidden=1, noise=args.noise)
    per_unit = 2 * dim + 1  # one hidden unit: a row of `up`, its bias, a column of `down`
    fixed = count_parameters(one) - per_unit
    return max(1, round((count_parameters(moe) - fixed) / per_unit))


def count_parameters(module: torch.nn.Module | None) -> int:
    """Number of parameters of ``module`` (0 for None)."""
    return 0 if module is None else sum(p.numel() for p in module.parameters())
