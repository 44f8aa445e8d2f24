"""Which experts each domain uses, with and without domain-supervised routing (goal c of the multi-domain study).

Head mode on cached MiniLM vectors, both training domains (SciFact + NFCorpus train), the study's settings
(``run.py``'s HEAD_BASE, learning rate 3e-4 as chosen there on dev). The domain-loss weight is chosen on the dev
split (seed 0) from a grid, then run with 3 seeds; unsupervised learned routing (weight 0) is the control.
Reported per row: the experts' shares of the training queries and training documents of each domain, and of the
documents of every eval collection (unseen ones included), with dev and test nDCG@10.

    python experiments/multidomain/domain_routing.py       # about 5 minutes a run on 2 cores

Models are saved under ``out/multidomain/domain/`` (the routing of the training data needs them); an interrupted
run continues. Results: ``experiments/results/multidomain_domain_routing.{json,md}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import EVAL, HEAD_BASE, REGIMES, RESULTS, SEEDS, run_once  # noqa: E402

from sbmoe.data.trainset import load_train_sets  # noqa: E402
from sbmoe.files import write_atomic  # noqa: E402
from sbmoe.model import find_head, load_model  # noqa: E402
from sbmoe.retrieval.encoder import Encoder  # noqa: E402
from sbmoe.training.evaluation_pass import utilization  # noqa: E402

WEIGHTS = [0.1, 1.0, 3.0]  # domain-loss weights tried on dev (seed 0)
LEARNING_RATE = 3e-4
MIN_SHARE = 0.05  # goal (c): every expert takes >= 5% of the training domains' documents


def train(weight: float, seed: int, root: Path) -> tuple[dict[str, Any], Path]:
    """One head run with domain-loss ``weight`` (0: unsupervised learned routing), its model saved."""
    args = {
        **HEAD_BASE,
        "head": "sbmoe",
        "train_data": REGIMES["both"],
        "eval_data": ",".join(EVAL),
        "seed": seed,
        "learning_rate": LEARNING_RATE,
        "domain_loss_weight": weight,
        "save_model": True,
    }
    out = root / f"w{weight}" / f"seed{seed}"
    return run_once(args, out), out


def training_routing(model_dir: Path) -> dict[str, Any]:
    """Expert shares of each training source's queries and documents under the saved model's head."""
    model = load_model(str(model_dir))
    head, encoder = find_head(model), Encoder(model)
    out: dict[str, Any] = {}
    for name, data in load_train_sets(REGIMES["both"], max_positives_per_query=HEAD_BASE["max_positives_per_query"]):
        queries = encoder.encode([data.queries[q] for q in sorted(data.qrels)], "queries")
        docs = encoder.encode(list(data.docs.values()), "corpus")
        out[name] = {
            "queries": utilization(queries.experts, head.num_experts)["shares"],
            "documents": utilization(docs.experts, head.num_experts)["shares"],
            "num_documents": len(docs.vectors),
        }
    return out


def summarize(weight: float, runs: list[tuple[dict[str, Any], Path]]) -> dict[str, Any]:
    """Mean shares over seeds (training and eval collections), nDCG@10 mean +- std, and goal (c)'s checks."""
    routing = [training_routing(path) for _, path in runs]
    train_shares = {
        name: {part: np.mean([r[name][part] for r in routing], axis=0).tolist() for part in ("queries", "documents")}
        for name in routing[0]
    }
    sizes = {name: routing[0][name]["num_documents"] for name in routing[0]}
    eval_shares = {
        spec: np.mean([rec["eval"][spec]["experts"]["shares"] for rec, _ in runs], axis=0).tolist() for spec in EVAL
    }
    ndcg = {spec: [rec["eval"][spec]["metrics"]["nDCG@10"] for rec, _ in runs] for spec in EVAL}
    training_docs = np.sum([np.array(train_shares[n]["documents"]) * sizes[n] for n in sizes], axis=0)
    training_docs = training_docs / sum(sizes.values())
    unseen = {
        spec: sum(share >= MIN_SHARE for share in eval_shares[spec])
        for spec in ("cranfield:test", "msmarco-sample:test")
    }
    return {
        "domain_loss_weight": weight,
        "seeds": [rec["arguments"]["seed"] for rec, _ in runs],
        "dev_nDCG@10": [rec.get("dev_nDCG@10") for rec, _ in runs],
        "nDCG@10": {spec: {"mean": float(np.mean(v)), "std": float(np.std(v))} for spec, v in ndcg.items()},
        "training_shares": train_shares,
        "eval_shares": eval_shares,
        "training_document_shares": training_docs.tolist(),
        "goal_c": {
            "every_expert_5pct_of_training_documents": bool(min(training_docs) >= MIN_SHARE),
            "experts_with_5pct_of_unseen_documents": unseen,
            "reached": bool(min(training_docs) >= MIN_SHARE and min(unseen.values()) > 1),
        },
    }


def markdown(rows: dict[str, Any]) -> str:
    """One line of shares per (row, domain or collection), then nDCG@10 and goal (c) per row."""
    lines = ["| row | inputs | expert shares (top-1) |", "|---|---|---|"]
    for name, row in rows.items():
        for source, parts in row["training_shares"].items():
            for part, shares in parts.items():
                lines.append(f"| {name} | {source} {part} (training) | {' '.join(f'{s:.2f}' for s in shares)} |")
        for spec, shares in row["eval_shares"].items():
            if spec != "scifact:test-unseen":
                lines.append(f"| {name} | {spec.split(':')[0]} documents | {' '.join(f'{s:.2f}' for s in shares)} |")
    lines += ["", "| row | dev nDCG@10 | " + " | ".join(EVAL) + " | goal (c) |"]
    lines.append("|---|---:|" + "---:|" * len(EVAL) + "---|")
    for name, row in rows.items():
        cells = [f"{row['nDCG@10'][s]['mean']:.4f} ± {row['nDCG@10'][s]['std']:.4f}" for s in EVAL]
        goal = row["goal_c"]
        verdict = (
            f"min training-document share {min(row['training_document_shares']):.2f}; experts >= 5% of "
            f"unseen documents {goal['experts_with_5pct_of_unseen_documents']}; "
            f"{'reached' if goal['reached'] else 'not reached'}"
        )
        dev = np.mean([d for d in row["dev_nDCG@10"] if d is not None])
        lines.append(f"| {name} | {dev:.4f} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    root = Path("out/multidomain/domain")
    dev = {w: train(w, 0, root)[0].get("dev_nDCG@10") or 0.0 for w in WEIGHTS}
    chosen = max(WEIGHTS, key=lambda w: dev[w])
    rows = {}
    for label, weight in (("learned, unsupervised", 0.0), (f"domain-supervised, weight {chosen} (dev)", chosen)):
        rows[label] = summarize(weight, [train(weight, s, root) for s in SEEDS])
    result = {"dev_choice": {str(w): d for w, d in dev.items()}, "chosen_weight": chosen, "rows": rows}
    write_atomic(RESULTS / "multidomain_domain_routing.json", json.dumps(result, indent=1))
    write_atomic(RESULTS / "multidomain_domain_routing.md", markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
