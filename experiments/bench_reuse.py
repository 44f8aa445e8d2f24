"""One encoding per corpus: evaluate plain MiniLM and two SB-MoE heads on SciFact through one cache, in one process.

    .venv/bin/python experiments/bench_reuse.py [--cache-dir DIR]   # writes experiments/results/bench_reuse.json

The first evaluation encodes the corpus unless the cache already holds it (the result says which, and the cache
entry keeps the seconds its encoding took); every later one applies its head to the cached pooled vectors. Each
row records the evaluation's own seconds, whether the corpus came from the cache, and nDCG@10.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from sbmoe.evaluation import evaluate_model  # noqa: E402
from sbmoe.files import write_atomic  # noqa: E402
from sbmoe.heads import HeadConfig  # noqa: E402
from sbmoe.model import build_model  # noqa: E402

OUTPUT = REPO / "experiments" / "results" / "bench_reuse.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", help="embedding cache (default $SBMOE_CACHE or ~/.cache/sbmoe)")
    parser.add_argument("--dataset", default="scifact")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {
        "plain MiniLM": build_model("minilm"),
        "MiniLM + SB-MoE head, 6 experts (random init)": build_model("minilm", HeadConfig(num_experts=6)),
        "MiniLM + SB-MoE head, 3 experts top-1 (random init)": build_model(
            "minilm", HeadConfig(num_experts=3, inference="top1")
        ),
    }
    rows = []
    for name, model in models.items():
        start = time.perf_counter()
        result = evaluate_model(model, args.dataset, cache_dir=args.cache_dir, show_progress=False)
        rows.append(
            {
                "model": name,
                "seconds": round(time.perf_counter() - start, 2),
                "corpus_from_cache": result["corpus_from_cache"],
                "encode_corpus_s": result["timings"]["encode_corpus_s"],
                "num_docs": result["num_docs"],
                "nDCG@10": result["metrics"]["nDCG@10"],
            }
        )
        print(json.dumps(rows[-1]))
    report = {
        "command": "python experiments/bench_reuse.py",
        "cpu_count": os.cpu_count(),
        "dataset": args.dataset,
        "rows": rows,
    }
    write_atomic(OUTPUT, json.dumps(report, indent=1) + "\n")
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
