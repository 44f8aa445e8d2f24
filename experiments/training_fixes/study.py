"""The studies again with the fixed recipe (issue 21): qrel-aware loss, backbone-mined negatives with a skip and a
margin, heads that start as the backbone, the untrained model as a model-selection candidate, dev selection in full
mode, equal source weights, seeds x queries bootstrap intervals and Holm-corrected p.

Resumable row by row: every finished run leaves ``rows/<row>/lr<rate>-seed<s>.json`` (metrics and per-query
nDCG@10 of the run and of the zero-shot backbone), and a run whose file exists is never run again.

    python experiments/training_fixes/study.py --part sanity [--shard I/N]   # MiniLM-L6 full, SciFact, 3 seeds
    python experiments/training_fixes/study.py --part full [--shard I/N]     # MiniLM-L6 full: both domains, + head
    python experiments/training_fixes/study.py --part head [--shard I/N]     # head rows on frozen MiniLM-L6
    python experiments/training_fixes/study.py --part l3 [--shard I/N]       # MiniLM-L3 full: no / SB-MoE / dense
    python experiments/training_fixes/study.py --part report                 # results/training_fixes.{json,md,png}

Jobs go row by row (the learning-rate grid at seed 0, then seeds 1 and 2 at the rate chosen on dev). With
``--shard I/N`` a process runs every N-th job from the I-th (start N side by side); a seed job waits until its row's
grid is done, whichever shard ran it.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from sbmoe.files import write_atomic
from sbmoe.training.runner import FinetuneArguments, run

HERE = Path(__file__).resolve().parent
ROWS = HERE / "rows"
OUT = Path("out/training_fixes")
EVAL = ["scifact:test", "scifact:test-unseen", "nfcorpus:test", "cranfield:test", "msmarco-sample:test"]
SEEDS = [0, 1, 2]
REGIMES = {"scifact": "scifact:train", "nfcorpus": "nfcorpus:train", "both": "scifact:train,nfcorpus:train"}
FIXED = {
    "dev_queries": 100,
    "hard_negatives": 1,
    "negatives_skip": 10,
    "negatives_relative_margin": 0.05,
    "train_weights": "equal",
    "max_positives_per_query": 8,
    "save_model": False,
    "threads": 1,
    "eval_data": ",".join(EVAL),
}
FULL_L6 = {
    **FIXED,
    "backbone": "minilm",
    "train": "full",
    "frozen_layers": 4,
    "token_cache_dir": str(OUT / "token_states"),
    "max_seq_length": 128,
    "batch_size": 32,
    "epochs": 2,
    "eval_steps": 0,  # dev at step 0 and each epoch end: each pass re-encodes the SciFact corpus
    "learning_rate": 1e-3,
    "weight_decay": 0.01,
    "save_steps": 100_000,
}
HEAD = {  # 128 tokens, as the full rows: their cached backbone encodings serve the head rows too
    **FIXED,
    "backbone": "minilm",
    "max_seq_length": 128,
    "epochs": 40,
    "patience": 4,
    "weight_decay": 0.1,
    "hard_negatives": 7,  # cheap on cached vectors
}
SANITY_ROWS = {
    "L6 full fine-tuning (layers 4-5) [scifact]": {**FULL_L6, "head": "none", "train_data": "scifact:train"},
    # the earlier study's +3.8 trained every layer at 256 tokens: the same here, with the fixed recipe
    "L6 full fine-tuning (all layers, 256 tokens) [scifact]": {
        **FULL_L6,
        "head": "none",
        "train_data": "scifact:train",
        "frozen_layers": 0,
        "token_cache_dir": None,
        "max_seq_length": 256,
    },
}
SANITY_GRID = [2e-5, 5e-5]  # backbone learning rates; the steps are chosen on dev by the run itself
FULL_BOTH = {"train_data": REGIMES["both"], "max_steps": 52, "eval_steps": 26}  # 52 steps as the SciFact row ran
DENSE_TOTAL = {"head": "dense", "dense_size": "total"}
FULL_ROWS = {  # at the rate the sanity row chose on dev (2e-5), dev every 26 steps
    "L6 full fine-tuning (layers 4-5) [both]": {**FULL_L6, "head": "none", **FULL_BOTH},
    "L6 full fine-tuning (layers 4-5) + SB-MoE head [scifact]": {
        **FULL_L6,
        "head": "sbmoe",
        "train_data": REGIMES["scifact"],
    },
    "L6 full fine-tuning (layers 4-5) + dense head [scifact]": {
        **FULL_L6,
        **DENSE_TOTAL,
        "train_data": REGIMES["scifact"],
    },
    "L6 full fine-tuning (layers 4-5) + SB-MoE head [both]": {**FULL_L6, "head": "sbmoe", **FULL_BOTH},
    "L6 full fine-tuning (layers 4-5) + dense head [both]": {**FULL_L6, **DENSE_TOTAL, **FULL_BOTH},
}
# MiniLM-L3 (the paper's light-backbone claim): every layer trained, nothing cached below; the grid is chosen on dev.
FULL_L3 = {**FULL_L6, "backbone": "minilm-l3", "frozen_layers": 0, "token_cache_dir": None}
L3_ROWS = {
    f"L3 full fine-tuning{label} [{regime}]": {**FULL_L3, **options, **regime_options}
    for regime, regime_options in (("scifact", {"train_data": REGIMES["scifact"]}), ("both", FULL_BOTH))
    for label, options in (
        ("", {"head": "none"}),
        (" + SB-MoE head", {"head": "sbmoe"}),
        (" + dense head", DENSE_TOTAL),
    )
}
L3_GRID = [2e-5, 5e-5]
FULL_GRID = [2e-5]
HEAD_KINDS = {
    "dense, equal parameters": {"head": "dense", "dense_size": "total"},
    "SB-MoE learned": {"head": "sbmoe"},
    "SB-MoE query-only": {"head": "sbmoe", "query_only": True, "top_k": 1, "inference": "top1"},
    "SB-MoE domain-supervised": {"head": "sbmoe", "domain_loss_weight": 0.1},
}
HEAD_ROWS = {  # both domains before NFCorpus alone: NFCorpus epochs cost ~10x SciFact's on two shared cores
    f"{kind} [{regime}]": {**HEAD, **options, "train_data": REGIMES[regime]}
    for regime in ("scifact", "both", "nfcorpus")
    for kind, options in HEAD_KINDS.items()
    if regime == "both" or "domain_loss_weight" not in options
}
# The ReZero scale starts at 0: the top rate lets it grow within the patience. 3e-4 kept epoch 0 (the backbone) in
# every SciFact row, so the NFCorpus regimes search the two higher rates only.
HEAD_GRIDS = {name: [3e-4, 1e-3, 3e-3] if name.endswith("[scifact]") else [1e-3, 3e-3] for name in HEAD_ROWS}
RATE_KEY = {"full": "backbone_learning_rate", "head": "learning_rate"}


def slug(name: str) -> str:
    """A folder name for a row."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def row_file(name: str, rate: float, seed: int) -> Path:
    return ROWS / slug(name) / f"lr{rate:g}-seed{seed}.json"


def run_job(name: str, options: dict[str, Any], rate: float, seed: int) -> dict[str, Any]:
    """One run, distilled to its row file (reused when the file exists)."""
    file = row_file(name, rate, seed)
    if file.is_file():
        return json.loads(file.read_text())
    key = RATE_KEY[options.get("train", "head")]
    out = OUT / slug(name) / f"lr{rate:g}" / f"seed{seed}"
    args = FinetuneArguments.from_flat({**options, key: rate, "seed": seed, "output_dir": str(out), "overwrite": True})
    record = run(args)
    history = record["history"]
    row = {
        "row": name,
        "learning_rate": rate,
        "seed": seed,
        "arguments": record["arguments"],
        "dev_nDCG@10": record.get("dev_nDCG@10"),
        "kept": history.get("kept"),
        "kept_zero_shot": record.get("kept_zero_shot"),
        "dev_scores": history.get("dev_scores"),
        "initial_dev_score": history.get("initial_dev_score"),
        "batch_shares": history.get("batch_shares"),
        "sources": record["sources"],
        "expert_warnings": record.get("expert_warnings", []),
        "seconds": round(record["seconds"], 1),
        "eval": {spec: _scores(result) for spec, result in record["eval"].items()},
        "zero_shot": {spec: _scores(result) for spec, result in record["zero_shot"].items()},
    }
    write_atomic(file, json.dumps(row, indent=1))
    logging.getLogger("training_fixes").info("%s lr %g seed %d: %s", name, rate, seed, file)
    return row


def _scores(result: dict[str, Any]) -> dict[str, Any]:
    return {"nDCG@10": result["metrics"]["nDCG@10"], "per_query": result["per_query"]["nDCG@10"]}


def chosen_rate(name: str, grid: list[float], wait: bool) -> float | None:
    """The grid rate with the best dev nDCG@10 at seed 0 (None while a grid run is missing and ``wait`` is off)."""
    while True:
        files = [row_file(name, rate, 0) for rate in grid]
        if all(f.is_file() for f in files):
            dev = [json.loads(f.read_text())["dev_nDCG@10"] for f in files]
            return grid[max(range(len(grid)), key=lambda i: dev[i])]
        if not wait:
            return None
        time.sleep(30)


def run_part(rows: dict[str, dict[str, Any]], grids: dict[str, list[float]], shard: tuple[int, int]) -> None:
    """Row by row: the grid (seed 0), then the other seeds at the rate chosen on dev; this shard's share of the
    jobs (a seed job waits until its row's grid is done, whichever shard ran it)."""
    index, count = shard
    jobs = [(name, rate, 0) for name in rows for rate in grids[name]]
    jobs += [(name, None, seed) for name in rows for seed in SEEDS[1:]]
    jobs.sort(key=lambda job: list(rows).index(job[0]))  # stable: row by row, the grid before the seeds
    for name, rate, seed in jobs[index::count]:
        grid = grids[name]
        if rate is None:  # a grid of one rate needs no choice, so its seeds need not wait
            rate = grid[0] if len(grid) == 1 else chosen_rate(name, grid, wait=True)
        run_job(name, rows[name], rate, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["sanity", "full", "head", "l3", "report"], required=True)
    parser.add_argument("--shard", default="0/1", help="I/N: run every N-th job from the I-th")
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    index, count = (int(x) for x in options.shard.split("/"))
    if options.part == "sanity":
        run_part(SANITY_ROWS, dict.fromkeys(SANITY_ROWS, SANITY_GRID), (index, count))
    elif options.part == "full":
        run_part(FULL_ROWS, dict.fromkeys(FULL_ROWS, FULL_GRID), (index, count))
    elif options.part == "head":
        run_part(HEAD_ROWS, HEAD_GRIDS, (index, count))
    elif options.part == "l3":
        run_part(L3_ROWS, dict.fromkeys(L3_ROWS, L3_GRID), (index, count))
    else:
        from report import write_report  # experiments/training_fixes/report.py

        grids = {**dict.fromkeys(SANITY_ROWS, SANITY_GRID), **dict.fromkeys(FULL_ROWS, FULL_GRID)}
        grids.update({**HEAD_GRIDS, **dict.fromkeys(L3_ROWS, L3_GRID)})
        write_report({**SANITY_ROWS, **FULL_ROWS, **HEAD_ROWS, **L3_ROWS}, grids)


if __name__ == "__main__":
    main()
