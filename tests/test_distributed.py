"""``sbmoe finetune --train full`` under torchrun: two CPU processes (gloo) train one model data-parallel."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

from sbmoe.training.arguments import FinetuneArguments
from sbmoe.training.runner import run
from tests.conftest import write_beir_slice, write_tiny_bert


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> tuple[Path, Path]:
    """A tiny BERT without dropout (so that randomness cannot tell the runs apart) and a 32-query SciFact slice."""
    root = tmp_path_factory.mktemp("dist")
    bert = write_tiny_bert(root / "bert")
    config = json.loads((bert / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (bert / "config.json").write_text(json.dumps(config))
    return bert, write_beir_slice(root / "beir", shared_data, num_queries=32, num_docs=70)


def arguments(bert: Path, beir: Path, out: Path) -> FinetuneArguments:
    return FinetuneArguments.from_flat(
        dict(
            backbone=str(bert),
            train="full",
            train_data=f"{beir}:test",
            eval_data=f"{beir}:test",
            output_dir=str(out),
            cache_dir=str(out.parent / "cache"),
            num_experts=2,
            noise=False,
            hard_negatives=1,
            max_positives_per_query=1,
            batch_size=4,
            max_steps=3,
            learning_rate=1e-2,
            backbone_learning_rate=1e-3,
            max_seq_length=32,
            logging_steps=1,
            save_steps=1000,
            threads=1,
        )
    )


def test_two_processes_train_one_model_like_one_process_accumulating_two_batches(
    setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bert, beir = setup
    args = arguments(bert, beir, tmp_path / "ddp")
    config = tmp_path / "args.json"
    config.write_text(json.dumps(args.flat()))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "sbmoe.cli",
        "finetune",
        str(config),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).parents[1]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert record["world_size"] == 2
    assert record["history"]["global_step"] == 3
    assert "nDCG@10" in record["eval"][f"{beir}:test"]["metrics"]
    assert list(tmp_path.rglob("run.json")) == [tmp_path / "ddp" / "run.json"]
    saved = [path.parent for path in tmp_path.rglob("config_sentence_transformers.json")]
    assert sorted(saved) == [tmp_path / "ddp", tmp_path / "ddp" / "checkpoints" / "checkpoint-3"]  # one of each

    # One process, batches of 4 accumulated two at a time, sees the batches the two ranks saw (accelerate gives
    # batch i to rank i % 2) and averages the same two gradients: the same weights up to float summation order.
    accumulate = functools.partial(
        sentence_transformers.SentenceTransformerTrainingArguments, gradient_accumulation_steps=2
    )
    monkeypatch.setattr(sentence_transformers, "SentenceTransformerTrainingArguments", accumulate)
    single = run(arguments(bert, beir, tmp_path / "single"))
    assert single["world_size"] == 1
    trained = SentenceTransformer(str(tmp_path / "ddp"), trust_remote_code=True).state_dict()
    expected = SentenceTransformer(str(tmp_path / "single"), trust_remote_code=True).state_dict()
    initial = SentenceTransformer(str(bert)).state_dict()
    moved = [k for k, v in initial.items() if not torch.allclose(v, expected[k], atol=1e-4)]
    assert len(moved) > len(initial) // 2  # training moved the weights well beyond the tolerance below
    for name, tensor in expected.items():
        torch.testing.assert_close(trained[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
