"""The arguments of ``sbmoe finetune``, grouped (model, head, data, hard negatives, training) as dataclasses that
``HfArgumentParser`` fills from flags, a JSON file or one flat dict."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from transformers import HfArgumentParser

from sbmoe.heads import HeadConfig, MoELayersConfig
from sbmoe.training.mining import MiningArguments


@dataclass
class ModelArguments:
    """The backbone, and the MoE layers inside it."""

    _argument_group_name = "model and MoE layers inside the encoder"

    backbone: str = field(
        default="minilm",
        metadata={"help": "minilm (MiniLM-L6), minilm-l3 / minilm-l2 (its first layers), a name, Hub id or folder"},
    )
    max_seq_length: int = field(default=256, metadata={"help": "tokens per text (longer texts are cut)"})
    moe_layers: str = field(
        default="",
        metadata={"help": "make these backbone layers MoE layers: all, every-2, 1,3 (--train full)"},
    )
    upcycle_init: Literal["copies", "fine"] = field(
        default="copies", metadata={"help": "MoE layers' experts: copies of the dense block, or fine-grained slices"}
    )
    frozen_layers: int = field(
        default=0,
        metadata={"help": "full mode: freeze the embeddings and first K layers; their token states are computed once"},
    )
    token_cache_dir: str | None = field(
        default=None, metadata={"help": "keep the frozen layers' token states here for later runs (default: memory)"}
    )


@dataclass(frozen=True)
class FinetuneHeadConfig(HeadConfig):
    """:class:`~sbmoe.heads.HeadConfig` with fine-tuning's default: the head starts as the backbone (ReZero) where
    that is sound (learned, query-only and dense heads)."""

    identity_init: bool = field(
        default=True,
        metadata={"help": "learned / query-only heads start as the backbone (ReZero scale 0); faithful: the paper's"},
    )


@dataclass
class DataArguments:
    """What is trained on and evaluated."""

    _argument_group_name = "data"

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
    max_positives_per_query: int = field(
        default=0, metadata={"help": "keep at most N relevant documents per training query (0: all)"}
    )
    eval_data: str = field(default="", metadata={"help": "comma-separated NAME:SPLIT or irds:<id> to evaluate"})
    data_dir: str | None = field(
        default=None, metadata={"help": "folder of BEIR datasets (default $SBMOE_DATA or ../shared/data)"}
    )
    dev_queries: int = field(
        default=0,
        metadata={"help": "train queries held out as a dev split, positives unseen in train (the study: 100)"},
    )
    dev_weighting: Literal["equal", "queries"] = field(
        default="equal", metadata={"help": "several sources: dev score as the mean over sources, or over dev queries"}
    )
    self_supervised: Literal["none", "title", "crop"] = field(
        default="none",
        metadata={"help": "add title -> document or cropped span -> document pairs from the training corpus"},
    )
    keep_identical_ids: bool = field(
        default=False, metadata={"help": "eval: keep documents whose id equals the query id (BEIR drops them)"}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "embedding cache (default $SBMOE_CACHE or ~/.cache/sbmoe)"}
    )


@dataclass
class TrainingArguments:
    """How the head (or everything) trains, and where the run is written; the head trainer reads it as it is."""

    _argument_group_name = "training, output and checkpoints"

    train: Literal["head", "full"] = field(default="head", metadata={"help": "head alone (cached) or everything"})
    epochs: float = field(default=30, metadata={"help": "training epochs (the study: 40 with patience 4)"})
    max_steps: int = field(default=-1, metadata={"help": "full mode: stop after this many steps (overrides epochs)"})
    batch_size: int = field(default=64, metadata={"help": "training batch size (in-batch negatives)"})
    learning_rate: float = field(default=1e-3, metadata={"help": "learning rate of the head"})
    backbone_learning_rate: float = field(default=2e-5, metadata={"help": "learning rate of the backbone (full)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (the study: 0.1)"})
    similarity: Literal["cos", "dot"] = field(default="cos", metadata={"help": "cosine or dot-product scores"})
    temperature: float = field(default=0.05, metadata={"help": "InfoNCE temperature"})
    symmetric_loss: bool = field(default=False, metadata={"help": "add the document -> query InfoNCE term"})
    aux_loss_weight: float = field(default=0.01, metadata={"help": "weight of the load-balancing loss"})
    domain_loss_weight: float = field(
        default=0.0,
        metadata={"help": "head mode, several sources: router loss sending each source to its own experts"},
    )
    z_loss_weight: float = field(default=0.0, metadata={"help": "weight of the router z-loss"})
    anchor_weight: float = field(default=0.0, metadata={"help": "pull toward the input embedding (head mode)"})
    one_positive_per_epoch: bool = field(
        default=False, metadata={"help": "head mode: one random positive per query per epoch (the SB-MoE repository)"}
    )
    router_init: Literal["random", "kmeans"] = field(
        default="random", metadata={"help": "kmeans: router fitted to k-means clusters of the training corpus"}
    )
    tune_strength: bool = field(
        default=False,
        metadata={"help": "after training, pick the head's strength (0 = backbone .. 1 = trained head) on dev"},
    )
    patience: int = field(
        default=0, metadata={"help": "head mode: epochs without dev gain before stopping (0: never; the study: 4)"}
    )
    eval_steps: int = field(
        default=0, metadata={"help": "full mode: score dev every N steps (0: each epoch's end), keep the best"}
    )
    seed: int = field(default=0, metadata={"help": "seed of initialisation, sampling and noise"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: every core)"})
    output_dir: str = field(default="out/finetune", metadata={"help": "model folder + run.json"})
    save_model: bool = field(default=True, metadata={"help": "save the model (--no-save-model: only run.json)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a finished run in --output-dir"})
    resume: bool = field(
        default=False, metadata={"help": "continue from the last checkpoint (head: one per epoch; full: --save-steps)"}
    )
    save_steps: int = field(default=500, metadata={"help": "full mode: checkpoint every N steps"})
    logging_steps: int = field(default=10, metadata={"help": "full mode: log the loss every N steps"})


FINETUNE_GROUPS = (ModelArguments, FinetuneHeadConfig, DataArguments, MiningArguments, TrainingArguments)


@dataclass
class FinetuneArguments:
    """Arguments of ``sbmoe finetune``, one dataclass per group (flags use dashes: ``--train-data``).

    Build it from flags or a JSON file with ``sbmoe.commands.finetune.parse_args``, from one flat dict of argument
    names (a study row, a ``run.json``'s ``arguments``) with :meth:`from_flat`; :meth:`flat` gives that dict back.
    """

    model: ModelArguments = field(default_factory=ModelArguments)
    head: HeadConfig = field(default_factory=FinetuneHeadConfig)
    data: DataArguments = field(default_factory=DataArguments)
    mining: MiningArguments = field(default_factory=MiningArguments)
    training: TrainingArguments = field(default_factory=TrainingArguments)

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> FinetuneArguments:
        """The groups filled from one flat dict of argument names (``HfArgumentParser.parse_dict``).

        Raises:
            ValueError: a name no group has, or contradictory arguments.
        """
        return cls(*HfArgumentParser(FINETUNE_GROUPS).parse_dict(dict(values)))

    def flat(self) -> dict[str, Any]:
        """Every argument by name, as one flat dict (what ``run.json`` records)."""
        groups = (self.model, self.head, self.data, self.mining, self.training)
        return {name: value for group in groups for name, value in asdict(group).items()}

    def moe_layers_config(self) -> MoELayersConfig | None:
        """The MoE layers inside the backbone (``--moe-layers``, with the head's expert flags), or None."""
        if not self.model.moe_layers:
            return None
        model, head = self.model, self.head
        experts = {"num_experts": head.num_experts, "top_k": head.top_k, "init": model.upcycle_init}
        group = {"reuse_group": head.reuse_group, "psr": head.psr, "pregate": head.pregate}
        return MoELayersConfig(model.moe_layers, **experts, **group)

    def __post_init__(self) -> None:
        data, training, head = self.data, self.training, self.head
        if training.domain_loss_weight and (training.train == "full" or "," not in data.train_data):
            raise ValueError("--domain-loss-weight needs --train head and several --train-data sources")
        if training.tune_strength and (head.head == "none" or not data.dev_queries):
            raise ValueError("--tune-strength needs a head and a dev split (--dev-queries > 0)")
        if training.one_positive_per_epoch and training.train != "head":
            raise ValueError("--one-positive-per-epoch samples the head trainer's rows: it needs --train head")
        if self.model.frozen_layers and training.train != "full":
            raise ValueError("--frozen-layers freezes the bottom of the backbone that --train full trains")
        self._check_moe()

    def _check_moe(self) -> None:
        """Refuse MoE-layer flags that cannot work together."""
        model, head = self.model, self.head
        if model.moe_layers and head.head_layers:
            raise ValueError("--moe-layers (MoE in the backbone) and --head-layers (stacked head) exclude each other")
        if model.moe_layers and self.training.train != "full":
            raise ValueError("--moe-layers trains MoE layers inside the backbone: it needs --train full")
        if head.head_layers and self.training.router_init != "random":
            raise ValueError("--head-layers needs --head sbmoe, --routing learned and --router-init random")
        if head.stack_options and not (model.moe_layers or head.head_layers):
            raise ValueError("--reuse-group, --psr and --pregate need --moe-layers or --head-layers")
