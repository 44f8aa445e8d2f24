"""Fine-tuning on two training sources at once: per-source data, homogeneous batches, domain-supervised routing."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from sbmoe.data import DataError
from sbmoe.data.trainset import cap_positives, load_train_set, load_train_sets
from sbmoe.training.arguments import FinetuneArguments
from sbmoe.training.losses import domain_experts, domain_routing_loss
from sbmoe.training.runner import run

DOMAINS = {
    "bio": ["cancer cell protein gene", "brain blood disease risk", "virus dna rna human", "drug treatment patients"],
    "ir": ["query document retrieval index", "expert router dense vector", "search results study", "index vector"],
}


def write_domain(folder: Path, topics: list[str], seed: int) -> Path:
    """A BEIR folder of 24 documents over ``topics``, 20 train queries (two positives each) and 4 test queries."""
    rng = random.Random(seed)
    words = [topics[i % 4].split() for i in range(24)]
    docs = [{"_id": f"d{i}", "title": w[0], "text": " ".join(rng.choices(w, k=10))} for i, w in enumerate(words)]
    queries, train, test = [], [], []
    for j in range(24):
        queries.append({"_id": f"q{j}", "text": " ".join(rng.sample(topics[j % 4].split(), 2))})
        rows = [f"q{j}\td{j}\t1", f"q{j}\td{(j + 4) % 24}\t1"]
        (train if j < 20 else test).extend(rows)
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    for split, rows in (("train", train), ("test", test)):
        (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def domains(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("domains")
    return [write_domain(root / name, topics, seed) for seed, (name, topics) in enumerate(DOMAINS.items())]


def args_for(backbone: str, domains: list[Path], out: Path, **overrides) -> FinetuneArguments:
    options = {
        "backbone": backbone,
        "train_data": ",".join(f"{d}:train" for d in domains),
        "eval_data": ",".join(f"{d}:test" for d in domains),
        "output_dir": str(out),
        "num_experts": 4,
        "hard_negatives": 1,
        "batch_size": 8,
        "epochs": 3,
        "learning_rate": 1e-2,
        "max_seq_length": 32,
        "save_model": False,
        "threads": 1,
    }
    return FinetuneArguments.from_flat({**options, **overrides})


def test_sources_load_separately_and_positives_are_capped(domains: list[Path]) -> None:
    sets = load_train_sets(",".join(f"{d}:train" for d in domains), max_positives_per_query=1)
    assert [name for name, _ in sets] == [f"{d}:train" for d in domains]
    for _, data in sets:
        assert len(data.examples) == 20 and all(len(rels) == 2 for rels in data.qrels.values())  # judged kept
    full = load_train_set(f"{domains[0]}:train")
    assert len(full.examples) == 40 and cap_positives(full, 1).examples == sets[0][1].examples
    with pytest.raises(DataError, match="names a source twice"):
        load_train_sets(f"{domains[0]}:train,{domains[0]}:train")


def test_two_sources_in_head_mode_record_the_mix(tiny_bert: str, domains: list[Path], tmp_path: Path) -> None:
    record = run(args_for(tiny_bert, domains, tmp_path / "out", train_weights="1,3"))
    assert [s["name"] for s in record["sources"]] == [f"{d}:train" for d in domains]
    assert [s["examples"] for s in record["sources"]] == [40, 40] and record["train_examples"] == 80
    assert record["arguments"]["train_weights"] == "1,3"
    assert set(record["eval"]) == {f"{d}:test" for d in domains}


def test_two_sources_in_full_mode(tiny_bert: str, domains: list[Path], tmp_path: Path) -> None:
    record = run(args_for(tiny_bert, domains, tmp_path / "out", train="full", epochs=1, train_weights="1,1"))
    assert record["history"]["global_step"] == 10  # 5 + 5 batches of 8: equal weights, each source's 40 rows
    assert [s["examples"] for s in record["sources"]] == [40, 40]


def test_domain_experts_split_evenly_and_need_enough_experts() -> None:
    assert domain_experts(6, 2).tolist() == [[1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 0, 1]]
    with pytest.raises(ValueError, match="at least one expert per source: 2 < 3"):
        domain_experts(2, 3)
    uniform = torch.full((4, 6), 1 / 6)
    loss = domain_routing_loss(uniform, torch.tensor([0, 1, 0, 1]), 2).item()
    assert abs(loss - torch.log(torch.tensor(2.0)).item()) < 1e-6  # half the probability on each domain's experts


def test_domain_loss_falls_and_sends_each_domain_to_its_experts(
    tiny_bert: str, domains: list[Path], tmp_path: Path
) -> None:
    record = run(args_for(tiny_bert, domains, tmp_path / "out", domain_loss_weight=1.0, epochs=8))
    losses = record["history"]["domain_losses"]
    assert len(losses) == 8 and losses[-1] < 0.5 * losses[0], losses
    for index, spec in enumerate(f"{d}:test" for d in domains):
        shares = record["eval"][spec]["experts"]["shares"]
        own = sum(share for expert, share in enumerate(shares) if expert % 2 == index)
        assert own > 0.9, (spec, shares)
