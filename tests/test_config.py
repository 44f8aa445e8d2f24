"""One head configuration: flags and JSON parse into the same grouped arguments, and a model keeps its config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sbmoe.commands import finetune
from sbmoe.heads import HeadConfig, MoELayersConfig
from sbmoe.heads.build import resolve_head
from sbmoe.model import build_model, load_model
from sbmoe.training.arguments import (
    DataArguments,
    FinetuneArguments,
    FinetuneHeadConfig,
    ModelArguments,
    TrainingArguments,
)
from sbmoe.training.mining import MiningArguments

FLAGS = (
    "--backbone minilm-l2 --train-data a:train,b:train --domain-loss-weight 0.1 --num-experts 4 --no-noise "
    "--query-only --negatives-depth 50 --epochs 2.5 --learning-rate 0.003 --no-save-model"
).split()


def test_flags_parse_into_the_grouped_dataclasses() -> None:
    args = finetune.parse_args(FLAGS)
    assert isinstance(args.model, ModelArguments) and args.model.backbone == "minilm-l2"
    assert isinstance(args.head, FinetuneHeadConfig) and (args.head.num_experts, args.head.noise) == (4, False)
    assert args.head.query_only and args.head.identity_init  # fine-tuning's default
    assert isinstance(args.data, DataArguments) and args.data.train_data == "a:train,b:train"
    assert isinstance(args.mining, MiningArguments) and args.mining.negatives_depth == 50
    assert isinstance(args.training, TrainingArguments)
    assert (args.training.epochs, args.training.learning_rate, args.training.save_model) == (2.5, 0.003, False)
    assert args.training.domain_loss_weight == 0.1 and args.training.seed == 0


def test_a_json_config_and_the_flags_give_the_same_arguments(tmp_path: Path) -> None:
    from_flags = finetune.parse_args(FLAGS)
    given = {"backbone": "minilm-l2", "train_data": "a:train,b:train", "domain_loss_weight": 0.1, "num_experts": 4}
    given |= {"noise": False, "query_only": True, "negatives_depth": 50, "epochs": 2.5, "learning_rate": 0.003}
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**given, "save_model": False}))
    assert finetune.parse_args([str(config)]) == from_flags
    run_json = tmp_path / "run.json"  # a run's record gives every argument, flat
    run_json.write_text(json.dumps({"arguments": from_flags.flat(), "eval": {}}))
    assert finetune.parse_args([str(run_json)]) == from_flags
    assert FinetuneArguments.from_flat(from_flags.flat()) == from_flags
    assert set(from_flags.flat()) >= set(given) and len(from_flags.flat()) == 66  # 64 flags + --residual, --strength


def test_contradictory_or_unknown_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="--moe-layers trains MoE layers inside the backbone"):
        FinetuneArguments.from_flat({"moe_layers": "all"})
    with pytest.raises(ValueError, match="not used by the HfArgumentParser: \\['lerning_rate'\\]"):
        FinetuneArguments.from_flat({"lerning_rate": 0.1})


def test_the_moe_layers_take_the_head_flags_expert_counts() -> None:
    args = FinetuneArguments.from_flat({"moe_layers": "every-2", "num_experts": 4, "top_k": 1, "train": "full"})
    assert args.moe_layers_config() == MoELayersConfig("every-2", num_experts=4, top_k=1)
    assert FinetuneArguments().moe_layers_config() is None


@pytest.mark.parametrize(
    "config",
    [
        HeadConfig(num_experts=3, top_k=1, inference="top1", identity_init=True, strength=0.5, residual=False),
        HeadConfig(num_experts=3, routing="faithful", query_only=True, noise=False, expert_dropout=0.1),
        HeadConfig("dense", dense_size="total", identity_init=True),
        HeadConfig(num_experts=3, head_layers=2, reuse_group=2, psr="linear", pregate=True),
    ],
)
def test_a_model_built_from_a_head_config_reloads_with_that_config(
    tiny_bert: str, tmp_path: Path, config: HeadConfig
) -> None:
    model = build_model(tiny_bert, config, max_seq_length=32)
    dim = model.get_sentence_embedding_dimension()
    assert model.head.config == resolve_head(dim, config) == resolve_head(dim, resolve_head(dim, config))
    model.save(str(tmp_path / "m"))
    loaded = load_model(str(tmp_path / "m"))
    assert type(loaded.head) is type(model.head) and loaded.head.config == model.head.config
    saved = json.loads(next((tmp_path / "m").rglob("sbmoe_config.json")).read_text())
    assert saved == model.head.get_config_dict()  # the folder stores the config's fields, by their names


def test_the_identity_init_rule_and_the_dense_width() -> None:
    assert resolve_head(32, HeadConfig(identity_init=True)).identity_init
    assert not resolve_head(32, HeadConfig(identity_init=True, routing="faithful")).identity_init
    assert resolve_head(32, HeadConfig(identity_init=True, routing="faithful", query_only=True)).identity_init
    dense = resolve_head(32, HeadConfig("dense", routing="faithful", identity_init=True, expert_dropout=0.2))
    settings = (dense.num_experts, dense.top_k, dense.routing, dense.expert_dropout, dense.expert_hidden)
    assert settings == (1, 1, "learned", 0.0, 16) and dense.identity_init


def test_moe_layers_config_is_saved_as_the_moe_entry(tiny_bert: str, tmp_path: Path) -> None:
    moe = MoELayersConfig([1], num_experts=2, init="fine", reuse_group=1, psr="step")
    model = build_model(tiny_bert, moe=moe, max_seq_length=32)
    model.save(str(tmp_path / "m"))
    saved = json.loads((tmp_path / "m" / "sentence_bert_config.json").read_text())["moe"]
    expected = {"moe_layers": [1], "num_experts": 2, "top_k": 2, "init": "fine", "reuse_group": 1, "psr": "step"}
    assert saved == {**expected, "pregate": False}
    assert load_model(str(tmp_path / "m"))[0].moe == model[0].moe
