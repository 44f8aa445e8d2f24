"""sbmoe finetune on a tiny random BERT: loss falls, resume, frozen backbone, NaN guard, bad data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from transformers import TrainerCallback

from sbmoe.commands.finetune import main
from sbmoe.data import DataError, load_dataset
from sbmoe.data.splits import unseen_dev_split
from sbmoe.data.trainset import cropped_span
from sbmoe.heads import HeadConfig
from sbmoe.heads.build import build_head, count_parameters, dense_hidden
from sbmoe.heads.sbmoe_head import SBMoEHead
from sbmoe.model import find_head
from sbmoe.retrieval.encoder import pooled_model
from sbmoe.training import evaluation_pass
from sbmoe.training.arguments import FinetuneArguments
from sbmoe.training.head_trainer import kmeans_router_init
from sbmoe.training.losses import TrainingDivergedError
from sbmoe.training.runner import STRENGTHS, finetune_model, run

TOPICS = [
    "cancer cell protein gene",
    "brain blood disease risk",
    "virus dna rna human",
    "drug treatment patients effect",
    "mice study results increase",
    "query document retrieval index",
    "expert router dense vector",
    "search decrease the a",
]


@pytest.fixture(scope="module")
def toy_beir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BEIR folder: 48 documents over 8 topics, 32 train queries, 8 test queries."""
    folder = tmp_path_factory.mktemp("toy")
    rng = random.Random(0)
    docs, queries, train, test = [], [], [], []
    for i in range(48):
        words = TOPICS[i % 8].split()
        docs.append({"_id": f"d{i}", "title": f"{words[0]} {i}", "text": " ".join(rng.choices(words, k=12))})
    for j in range(40):
        doc = j % 48
        queries.append({"_id": f"q{j}", "text": " ".join(rng.sample(TOPICS[doc % 8].split(), 3)) + f" {doc}"})
        (train if j < 32 else test).append(f"q{j}\td{doc}\t1")
    (folder / "qrels").mkdir()
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    header = "query-id\tcorpus-id\tscore\n"
    (folder / "qrels" / "train.tsv").write_text(header + "\n".join(train) + "\n")
    (folder / "qrels" / "test.tsv").write_text(header + "\n".join(test) + "\n")
    return folder


def make_args(backbone: str, toy_beir: Path, tmp_path: Path, **overrides) -> FinetuneArguments:
    options = {
        "backbone": backbone,
        "train_data": f"{toy_beir}:train",
        "eval_data": f"{toy_beir}:test",
        "output_dir": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "cache"),
        "num_experts": 3,
        "hard_negatives": 2,
        "batch_size": 8,
        "epochs": 15,
        "learning_rate": 1e-2,
        "max_seq_length": 32,
        "logging_steps": 1,
    }
    return FinetuneArguments.from_flat({**options, **overrides})


def backbone_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The transformer weights stored in a model folder (or a plain HF encoder folder)."""
    weights = load_file(str(folder / "model.safetensors"))
    return {k.removeprefix("bert."): v for k, v in weights.items()}


def test_head_mode_loss_falls_and_backbone_is_untouched(tiny_bert: str, toy_beir: Path, tmp_path: Path) -> None:
    args = make_args(tiny_bert, toy_beir, tmp_path)
    record = run(args)
    losses = record["history"]["losses"]
    assert len(losses) == 15 and losses[-1] < 0.8 * losses[0]
    before, after = backbone_weights(Path(tiny_bert)), backbone_weights(Path(args.training.output_dir))
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    saved = json.loads((Path(args.training.output_dir) / "run.json").read_text())
    metrics = saved["eval"][args.data.eval_data]["metrics"]
    assert set(metrics) == {"nDCG@10", "MAP@100", "Recall@100", "MRR@10"} and 0 <= metrics["nDCG@10"] <= 1
    assert sum(saved["eval"][args.data.eval_data]["experts"]["shares"]) == pytest.approx(1.0)


def test_saved_model_reloads_with_plain_sentence_transformer(tiny_bert: str, toy_beir: Path, tmp_path: Path) -> None:
    args = make_args(tiny_bert, toy_beir, tmp_path, epochs=2)
    run(args)
    model = finetune_model(args)
    model.load_state_dict(SentenceTransformer(args.training.output_dir, trust_remote_code=True).state_dict())
    reloaded = SentenceTransformer(args.training.output_dir, trust_remote_code=True)
    text = ["cancer cell protein"]
    assert torch.allclose(torch.tensor(model.encode(text)), torch.tensor(reloaded.encode(text)), atol=1e-6)


def test_full_mode_loss_falls_and_aux_loss_is_logged(tiny_bert: str, toy_beir: Path, tmp_path: Path) -> None:
    args = make_args(tiny_bert, toy_beir, tmp_path, train="full", epochs=6, learning_rate=3e-3)
    args.training.backbone_learning_rate = 1e-3
    logs = [entry for entry in run(args)["history"]["log_history"] if "loss" in entry]
    assert all("aux" in entry for entry in logs)
    assert sum(e["contrastive"] for e in logs[-4:]) < 0.8 * sum(e["contrastive"] for e in logs[:4])


def test_full_mode_selects_on_dev_with_the_untrained_model_as_a_candidate(
    tiny_bert: str, toy_beir: Path, tmp_path: Path
) -> None:
    args = make_args(tiny_bert, toy_beir, tmp_path, train="full", max_steps=4, eval_steps=2, dev_queries=6)
    args.training.backbone_learning_rate = 1e-3
    record = run(args)
    history = record["history"]
    assert list(history["dev_scores"]) == ["0", "2", "4"] and history["batch_shares"] == [1.0]
    best = max(history["dev_scores"], key=lambda step: (history["dev_scores"][step], -int(step)))
    assert history["best_step"] == int(best) and record["kept_zero_shot"] == (best == "0")
    assert record["dev_nDCG@10"] == pytest.approx(history["dev_scores"][best], abs=1e-6)  # the kept weights
    assert history["kept"].startswith(f"kept step {best}")
    assert record["sources"][0]["dev_split"]["method"] in ("unseen-positives", "random")


class StopAt(TrainerCallback):
    """Stop training after ``step`` steps, like a kill right after that step's checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def test_resume_after_interruption_matches_uninterrupted_run(tiny_bert: str, toy_beir: Path, tmp_path: Path) -> None:
    common = {"train": "full", "max_steps": 4, "save_steps": 2, "eval_data": ""}
    whole = make_args(tiny_bert, toy_beir, tmp_path / "whole", **common)
    run(whole)
    parts = make_args(tiny_bert, toy_beir, tmp_path / "parts", **common)
    run(parts, callbacks=[StopAt(2)])
    assert (Path(parts.training.output_dir) / "checkpoints" / "checkpoint-2").is_dir()
    parts.training.resume = True
    run(parts)
    expected = SentenceTransformer(whole.training.output_dir, trust_remote_code=True).state_dict()
    resumed = SentenceTransformer(parts.training.output_dir, trust_remote_code=True).state_dict()
    interrupted = SentenceTransformer(
        str(Path(parts.training.output_dir) / "checkpoints" / "checkpoint-2"), trust_remote_code=True
    )
    assert any(not torch.allclose(v, interrupted.state_dict()[k]) for k, v in expected.items())
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("mode", ["head", "full"])
def test_nan_loss_stops_with_a_clear_message(tiny_bert: str, toy_beir: Path, tmp_path: Path, mode: str) -> None:
    args = make_args(tiny_bert, toy_beir, tmp_path, train=mode, max_steps=3, epochs=3, learning_rate=1e30)
    args.training.backbone_learning_rate = 1e30
    with pytest.raises(TrainingDivergedError, match=r"training loss is (nan|inf) at .*step \d+: training stopped"):
        run(args)


def test_malformed_training_data_names_file_and_line(tiny_bert: str, toy_beir: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"query": "cancer", "positive": "cell protein"}\n\n{"query": "brain", "positive": 3}\n')
    with pytest.raises(DataError, match=rf"{bad}:3: 'positive' must be a non-empty string"):
        run(make_args(tiny_bert, toy_beir, tmp_path, train_data=str(bad)))
    bad.write_text('{"query": "cancer", "positive": "cell protein"}\n{"query": "brain",\n')
    argv = ["--backbone", tiny_bert, "--train-data", str(bad), "--cache-dir", str(tmp_path / "c")]
    assert main([*argv, "--output-dir", str(tmp_path / "o")]) == 1
    assert f"{bad}:2: invalid JSON" in capsys.readouterr().err


def test_jsonl_with_negatives_trains(tiny_bert: str, toy_beir: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    lines = [{"query": t, "positive": t + " study", "negatives": [TOPICS[(i + 1) % 8]]} for i, t in enumerate(TOPICS)]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    record = run(make_args(tiny_bert, toy_beir, tmp_path, train_data=str(data), hard_negatives=1, eval_data=""))
    assert record["train_examples"] == 8 and record["history"]["losses"][-1] < record["history"]["losses"][0]


def test_unseen_dev_split_shares_no_positive_with_train() -> None:
    qrels = {"a": {"d1": 1}, "b": {"d1": 1, "d2": 1}, "c": {"d3": 1}, "d": {"d4": 1}, "e": {"d2": 1}, "f": {"d5": 1}}
    train, dev = unseen_dev_split(qrels, dev_size=2, seed=1)
    assert len(dev) == 2 and set(train) | set(dev) == set(qrels) and not set(train) & set(dev)
    assert not {d for q in dev for d in qrels[q]} & {d for q in train for d in qrels[q]}
    assert set(dev) <= {"c", "d", "f"}  # a, b, e are linked through d1/d2: they only move together


def test_dense_head_of_equal_total_parameters() -> None:
    hidden = dense_hidden(384, HeadConfig(num_experts=6))
    moe, dense = (
        SBMoEHead(384, HeadConfig(num_experts=6)),
        build_head(384, HeadConfig("dense", dense_size="total"), False),
    )
    assert dense.expert_hidden == hidden and (dense.num_experts, dense.top_k) == (1, 1)
    assert abs(count_parameters(dense) - count_parameters(moe)) <= 2 * 384 + 1


def test_query_only_head_passes_documents_through(tiny_bert: str, toy_beir: Path, tmp_path: Path) -> None:
    model = finetune_model(make_args(tiny_bert, toy_beir, tmp_path, query_only=True, identity_init=False))
    texts = ["cancer cell protein", "brain blood risk"]
    pooled = torch.nn.functional.normalize(torch.tensor(pooled_model(model).encode(texts)), dim=-1)
    torch.testing.assert_close(torch.tensor(model.encode_document(texts)), pooled)
    assert not torch.allclose(torch.tensor(model.encode_query(texts)), pooled, atol=1e-3)


def test_kmeans_router_init_routes_documents_by_cluster() -> None:
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1) * 5
    docs = torch.cat([c + 0.3 * torch.randn(40, 16) for c in centres])
    head = SBMoEHead(16, HeadConfig(num_experts=3))
    shares = kmeans_router_init(head, docs, seed=0)
    assert shares == pytest.approx([1 / 3] * 3, abs=0.05)
    chosen = head.eval()({"sentence_embedding": docs})["expert_index"]
    assert sorted(torch.bincount(chosen, minlength=3).tolist()) == [40, 40, 40]
    for group in chosen.view(3, 40):
        assert (group == group[0]).all()


def test_full_mode_tells_the_head_which_columns_are_documents(
    tiny_bert: str, toy_beir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str | None] = []
    forward = SBMoEHead.forward

    def recording_forward(self, features, **kwargs):
        seen.append(kwargs.get("task", features.get("task")))
        return forward(self, features, **kwargs)

    monkeypatch.setattr(SBMoEHead, "forward", recording_forward)
    args = make_args(tiny_bert, toy_beir, tmp_path, train="full", max_steps=1, query_only=True, eval_data="")
    run(args)
    assert seen[-2:] == ["query", "document"]  # one query pass, one merged pass over positives and negatives


def test_tune_strength_keeps_the_best_dev_strength_in_the_saved_model(
    tiny_bert: str, toy_beir: Path, tmp_path: Path
) -> None:
    args = make_args(tiny_bert, toy_beir, tmp_path, epochs=3, dev_queries=8, tune_strength=True)
    record = run(args)
    scores = record["strength"]["dev_nDCG@10"]
    assert set(scores) == {str(s) for s in STRENGTHS}
    chosen = record["strength"]["chosen"]
    assert scores[str(chosen)] == max(scores.values()) == record["dev_nDCG@10"]
    head = find_head(SentenceTransformer(args.training.output_dir, trust_remote_code=True))
    assert head.strength == chosen


def test_tune_strength_without_dev_split_is_refused(capsys) -> None:
    assert main(["--tune-strength", "--dev-queries", "0"]) == 2
    assert "--tune-strength needs a head and a dev split" in capsys.readouterr().err


def test_cropped_span_is_a_stable_slice_of_the_document() -> None:
    text = " ".join(f"w{i}" for i in range(100))
    span = cropped_span("d1", text)
    assert span == cropped_span("d1", text) and span in text
    assert 10 <= len(span.split()) <= 50
    assert cropped_span("d1", "too short") == "too short"


def test_crop_self_supervision_adds_one_pair_per_document(tiny_bert: str, toy_beir: Path, tmp_path: Path) -> None:
    record = run(make_args(tiny_bert, toy_beir, tmp_path, epochs=1, self_supervised="crop", eval_data=""))
    assert record["train_examples"] == 32 + 48


def test_each_eval_set_is_loaded_once_per_run(
    tiny_bert: str, toy_beir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Zero-shot, initial routing, final and MoE-utilization passes share one load of each eval set."""
    loads: list[str] = []

    def counted(spec: str, *args, **kwargs):
        loads.append(spec)
        return load_dataset(spec, *args, **kwargs)

    monkeypatch.setattr(evaluation_pass, "load_dataset", counted)
    args = make_args(tiny_bert, toy_beir, tmp_path, epochs=2, dev_queries=4)
    record = run(args)
    assert loads == [args.data.eval_data]
    result = record["eval"][args.data.eval_data]
    assert set(result["per_query"]) == set(result["metrics"]) and record["zero_shot"][args.data.eval_data]["per_query"]
    assert result["num_queries"] == len(result["per_query"]["nDCG@10"]) == 8


def test_dead_expert_warnings_judge_a_reuse_layer_on_its_own_experts() -> None:
    balanced = [0.25] * 4 + [0.0] * 4  # own experts 0-3 used, foreign candidates 4-7 unused (reuse scale near 0)
    second = {"layer": 5, "shares": [0.0] * 4 + [0.5, 0.5, 0.0, 0.0], "own_candidates": [4, 8]}  # own expert 6, 7 dead
    lines = evaluation_pass.dead_expert_warnings(
        {}, [{"layer": 4, "shares": balanced, "own_candidates": [0, 4]}, second]
    )
    assert lines == [
        "MoE layer 5: expert(s) 6 (0.0%), 7 (0.0%) get under 1% of the inputs; the router has collapsed onto the "
        "others (raise --aux-loss-weight, or use fewer experts)"
    ]
    assert "expert(s) 4 (0.0%)" in evaluation_pass.dead_expert_warnings({}, [{"layer": 4, "shares": balanced}])[0]
