"""Does a progress bar that moves per encoder batch cost encoding throughput?

The embedding cache encodes 512 documents per ``encode`` call; its bar used to move once per call, it now moves
after every batch (a forward hook on the model counts the embeddings of each batch). This times one call per
512-document chunk of the first N SciFact documents with MiniLM, with the bar moved per call and with the hook, the
two back to back on each chunk in alternating order (on two shared cores the load of other processes changes the
speed by up to 2x within minutes, so only the ratio within a pair is compared; process CPU time is less sensitive to
that load than wall time), and checks that both give the same vectors.

    .venv/bin/python experiments/bench_encode_progress.py   # writes experiments/results/bench_encode_progress.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sbmoe.data import load_dataset
from sbmoe.files import write_atomic
from sbmoe.model import build_model
from sbmoe.retrieval.cache import CHUNK, progress_per_batch

RESULTS = Path(__file__).parent / "results"


def timed(model, texts: list[str], batch_size: int, per_batch: bool) -> tuple[float, float, np.ndarray]:
    """Wall and process CPU seconds of one encode call over ``texts``, its bar moved per call or per batch; vectors."""
    wall, cpu = time.perf_counter(), time.process_time()
    with tqdm(total=len(texts), file=io.StringIO()) as bar:
        if per_batch:
            with progress_per_batch(model, bar):
                vectors = model.encode_document(texts, batch_size=batch_size, show_progress_bar=False)
        else:
            vectors = model.encode_document(texts, batch_size=batch_size, show_progress_bar=False)
            bar.update(len(texts))
    return time.perf_counter() - wall, time.process_time() - cpu, vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--output", default=str(RESULTS / "bench_encode_progress.json"))
    args = parser.parse_args()
    texts = [doc.full_text for doc in islice(load_dataset("scifact").iter_docs(), args.docs)]
    chunks = [texts[i : i + CHUNK] for i in range(0, len(texts), CHUNK)]
    model = build_model("minilm").eval()
    model.encode_document(texts[:64], batch_size=args.batch_size)  # warm-up
    pairs, identical = [], True
    for r in range(args.rounds):
        for c, chunk in enumerate(chunks):  # the two ways back to back on each chunk, in alternating order
            pair: dict[str, float] = {}
            vectors = {}
            for way in sorted(("per_call", "per_batch"), reverse=(r + c) % 2 == 1):
                wall, cpu, vectors[way] = timed(model, chunk, args.batch_size, way == "per_batch")
                pair.update({f"{way}_s": wall, f"{way}_cpu_s": cpu})
            pair["wall_ratio"] = pair["per_batch_s"] / pair["per_call_s"]
            pair["cpu_ratio"] = pair["per_batch_cpu_s"] / pair["per_call_cpu_s"]
            pairs.append(pair)
            identical &= bool(np.array_equal(vectors["per_batch"], vectors["per_call"]))
            print(f"round {r} chunk {c}: " + "  ".join(f"{k} {v:.3f}" for k, v in pair.items()), flush=True)
    result = {
        "docs": len(texts),
        "batch_size": args.batch_size,
        "chunk": CHUNK,
        "pairs": pairs,
        "median_wall_ratio_per_batch_over_per_call": statistics.median(p["wall_ratio"] for p in pairs),
        "median_cpu_ratio_per_batch_over_per_call": statistics.median(p["cpu_ratio"] for p in pairs),
        "docs_per_cpu_s": {
            way: args.rounds * len(texts) / sum(p[f"{way}_cpu_s"] for p in pairs) for way in ("per_call", "per_batch")
        },
        "identical_vectors": identical,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": os.getloadavg(),
    }
    write_atomic(args.output, json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "pairs"}, indent=2))


if __name__ == "__main__":
    main()
