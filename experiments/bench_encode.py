"""How much encode time does the SB-MoE head add to all-MiniLM-L6-v2?

Encodes the first N SciFact documents with the plain backbone and with backbone + head, in interleaved
repeats within one run (whole-encode times drift by +-8% on two cores, so the two are compared by the
ratio within each round), then times the head alone on the pooled vectors, which is the sharper figure.

    .venv/bin/python experiments/bench_encode.py            # writes experiments/results/bench_encode.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from itertools import islice
from pathlib import Path

import torch

import sbmoe
from sbmoe.data import load_dataset
from sbmoe.files import write_atomic
from sbmoe.heads import HeadConfig

RESULTS = Path(__file__).parent / "results"


def first_documents(n: int, data_dir: str | None) -> list[str]:
    """The first ``n`` SciFact documents as BEIR texts (title + text)."""
    dataset = load_dataset("scifact", split="test", data_dir=data_dir)
    return [doc.full_text for doc in islice(dataset.iter_docs(), n)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def head_alone_seconds(head: sbmoe.SBMoEHead, pooled: torch.Tensor, batch_size: int, repeats: int) -> list[float]:
    """Time the head's forward over all pooled vectors, in encode-sized batches."""

    def run() -> None:
        with torch.inference_mode():
            for start in range(0, len(pooled), batch_size):
                head({"sentence_embedding": pooled[start : start + batch_size]})

    run()  # warm-up
    return [timed(run) for _ in range(repeats)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--output", default=str(RESULTS / "bench_encode.json"))
    args = parser.parse_args()

    texts = first_documents(args.docs, args.data_dir)
    plain = sbmoe.build_model("minilm").eval()
    headed = sbmoe.build_model("minilm", HeadConfig(num_experts=6)).eval()
    encode = {
        "plain": lambda: plain.encode(texts, batch_size=args.batch_size),
        "head": lambda: headed.encode(texts, batch_size=args.batch_size),
    }
    plain.encode(texts[:64]), headed.encode(texts[:64])  # warm-up both
    rounds = []
    for r in range(args.rounds):
        order = ["plain", "head"] if r % 2 == 0 else ["head", "plain"]
        seconds = {name: timed(encode[name]) for name in order}
        rounds.append({**seconds, "ratio": seconds["head"] / seconds["plain"]})
        print(f"round {r}: plain {seconds['plain']:.1f}s head {seconds['head']:.1f}s ratio {rounds[-1]['ratio']:.3f}")

    pooled_model = sbmoe.build_model("minilm", normalize=False).eval()
    pooled = torch.as_tensor(pooled_model.encode(texts, batch_size=args.batch_size))
    head_seconds = head_alone_seconds(headed.head, pooled, args.batch_size, repeats=20)
    head_median = statistics.median(head_seconds)
    plain_median = statistics.median(r["plain"] for r in rounds)
    result = {
        "docs": len(texts),
        "batch_size": args.batch_size,
        "rounds": rounds,
        "median_ratio_head_over_plain": statistics.median(r["ratio"] for r in rounds),
        "plain_encode_median_s": plain_median,
        "head_alone_median_s": head_median,
        "head_alone_share_of_encode": head_median / plain_median,
        "head_params": sum(p.numel() for p in headed.head.parameters()),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "load_average_at_end": os.getloadavg(),
    }
    write_atomic(args.output, json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))


if __name__ == "__main__":
    main()
