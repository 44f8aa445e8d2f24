"""finetune with MoE layers: the flags, PSR progress in both modes, per-layer expert use and parameters in run.json."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import test_finetune
from test_finetune import make_args

from sbmoe.heads import MoELayersConfig
from sbmoe.heads.moe_block import moe_blocks
from sbmoe.model import build_model
from sbmoe.training.full_trainer import PSRProgress
from sbmoe.training.runner import run

toy_beir = test_finetune.toy_beir  # the same toy BEIR folder fixture


def test_stacked_head_run_records_layers_and_parameters(tiny_bert: str, toy_beir: Path, tmp_path: Path) -> None:
    args = make_args(tiny_bert, toy_beir, tmp_path, head_layers=2, reuse_group=2, psr="step", epochs=3)
    record = run(args)
    layers = record["moe_utilization"]
    assert len(layers) == 2 and all(len(layer["shares"]) == 6 for layer in layers)  # r * N candidates per layer
    assert all(layer["total"] == 48 and sum(layer["shares"]) == pytest.approx(1.0) for layer in layers)
    per_expert = 32 * 16 + 16 + 16 * 32 + 32  # ReLU experts of H/2 = 16 hidden units
    runs = 2 + 2  # per layer and token: 2 own experts and 2 of the other layer's (reuse)
    assert record["parameters"]["total"] - record["parameters"]["active"] == 2 * (3 - runs) * per_expert
    assert record["arguments"]["psr"] == "step" and record["arguments"]["head_layers"] == 2
    assert record["history"]["losses"][-1] < record["history"]["losses"][0]


def test_full_run_with_moe_layers_trains_routers_and_records_layers(
    tiny_bert: str, toy_beir: Path, tmp_path: Path
) -> None:
    args = make_args(
        tiny_bert,
        toy_beir,
        tmp_path,
        train="full",
        head="none",
        moe_layers="all",
        num_experts=4,
        top_k=2,
        reuse_group=2,
        psr="linear",
        pregate=True,
        max_steps=3,
        save_steps=100,
    )
    record = run(args)
    assert [layer["layer"] for layer in record["moe_utilization"]] == [0, 1]
    assert all(len(layer["shares"]) == 8 for layer in record["moe_utilization"])
    assert any("aux" in entry for entry in record["history"]["log_history"])  # the MoE layers' balancing loss
    assert record["parameters"]["active"] == record["parameters"]["total"]  # N = 4 = 2 own + 2 foreign run per token


def test_psr_progress_follows_the_trainer_steps(tiny_bert: str) -> None:
    model = build_model(tiny_bert, moe=MoELayersConfig(moe_layers="all", num_experts=2, reuse_group=2, psr="step"))
    PSRProgress(model).on_step_begin(None, SimpleNamespace(global_step=3, max_steps=12), None)
    assert [block.progress for block in moe_blocks(model)] == [0.25, 0.25]


def test_moe_flags_that_cannot_work_are_refused(tiny_bert: str, toy_beir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs --train full"):
        make_args(tiny_bert, toy_beir, tmp_path, moe_layers="all")
    with pytest.raises(ValueError, match="need --moe-layers or --head-layers"):
        make_args(tiny_bert, toy_beir, tmp_path, psr="linear")
    with pytest.raises(ValueError, match="exclude each other"):
        make_args(tiny_bert, toy_beir, tmp_path, train="full", moe_layers="all", head_layers=2)
