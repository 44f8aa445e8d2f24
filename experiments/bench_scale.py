"""Streaming encode + index of 1M synthetic short passages in bounded memory, Ray with 1 vs 2 workers, projections.

    .venv/bin/python experiments/bench_scale.py            # writes experiments/results/bench_scale.json and .md
    .venv/bin/python experiments/bench_scale.py --docs 200000 --ray-docs 20000   # a quicker, smaller run

Model: a random 2-layer BERT, hidden 64 (``tests/conftest.py``'s ``write_tiny_bert``), mean pooling, normalised,
on one torch thread per process. Corpus: 12-24 random words per passage (``conftest.WORDS``), as jsonl.

* Stream: ``encode_to_shards`` then ``build_index`` of the shards (flat index) and ``Retriever.save``, each size in a
  fresh child process; peak RSS is the child's ``ru_maxrss`` after each phase. Run at N/10 and N: the difference in
  peak RSS against the difference in index bytes shows what grows with the corpus.
* Ray: ``ray_batches`` over a ``--ray-docs`` corpus read in 10,000-row blocks, with 1 and 2 actors, interleaved
  (1, 2, 2, 1, ...); steady throughput counts from the first batch out (actor start-up excluded, reported apart).
  Local Ray, 3 CPU slots (2 actors + the read task), on this 2-core machine shared with other jobs.
* Projection: MS MARCO (8.8M) and 100M passages from the measured rates; assumptions are in the JSON and table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import numpy as np  # noqa: E402

from sbmoe.files import write_atomic  # noqa: E402

OUTPUT = REPO / "experiments" / "results" / "bench_scale.json"
TABLE = OUTPUT.with_suffix(".md")
HIDDEN, SHARD = 64, 100_000
GB = 10**9


def rss_mb() -> float:
    """This process's peak resident set so far, MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_corpus(path: Path, count: int) -> None:
    """``count`` passages of 12-24 random words, ids p0, p1, ..."""
    from conftest import WORDS

    rng = np.random.default_rng(0)
    words = np.array(WORDS)
    with path.open("w") as f:
        for start in range(0, count, 100_000):
            n = min(100_000, count - start)
            lengths = rng.integers(12, 25, n)
            picks = rng.integers(0, len(words), (n, 24))
            f.writelines(
                json.dumps({"_id": f"p{start + i}", "title": "", "text": " ".join(words[picks[i, : lengths[i]]])})
                + "\n"
                for i in range(n)
            )


def child_stream(model_dir: str, corpus: str, work: str) -> dict[str, Any]:
    """One streaming run (in its own process): encode to shards, index, save; times and peak RSS per phase."""
    import faiss
    import torch

    from sbmoe.data import load_corpus
    from sbmoe.model import load_any_model
    from sbmoe.retrieval.build import build_index
    from sbmoe.retrieval.retriever import Retriever
    from sbmoe.retrieval.stream import encode_to_shards, store_from_shards

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    record: dict[str, Any] = {"rss_start_mb": rss_mb()}
    model = load_any_model(model_dir, device="cpu")
    record["rss_model_mb"] = rss_mb()
    start = time.perf_counter()
    shards = encode_to_shards(model, load_corpus(corpus), Path(work) / "shards", SHARD, 256, show_progress=False)
    record.update(docs=len(shards), encode_s=time.perf_counter() - start, rss_encode_mb=rss_mb())
    start = time.perf_counter()
    index = build_index(shards, show_progress=False)
    retriever = Retriever(model, index, store_from_shards(model, shards), model_dir)
    record.update(index_s=time.perf_counter() - start, rss_index_mb=rss_mb())
    start = time.perf_counter()
    retriever.save(Path(work) / "index")
    record.update(save_s=time.perf_counter() - start, rss_peak_mb=rss_mb())
    record["index_bytes"] = (Path(work) / "index" / "index" / "index.faiss").stat().st_size
    record["ids_bytes"] = (Path(work) / "index" / "index" / "doc_ids.json").stat().st_size
    record["store_bytes"] = (Path(work) / "index" / "docs.sqlite").stat().st_size
    record["shard_bytes"] = sum(f.stat().st_size for f in (Path(work) / "shards").iterdir())
    record["docs_per_s"] = record["docs"] / record["encode_s"]
    return record


def stream_run(model_dir: Path, corpus: Path, work: Path) -> dict[str, Any]:
    """:func:`child_stream` in a fresh process (so its peak RSS is its own); a clean work folder each time."""
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, __file__, "--child", str(model_dir), str(corpus), str(work)]
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def ray_runs(model_dir: Path, corpus: Path, repeats: int, blocks: int) -> list[dict[str, Any]]:
    """Interleaved Ray encodes of ``corpus`` with 1 and 2 actors: start-up seconds and steady docs/s."""
    import ray

    from sbmoe.retrieval.ray_encode import ray_batches

    runs = []
    ray.init(num_cpus=3, object_store_memory=300 * 2**20, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        for repeat in range(repeats):
            for workers in (1, 2) if repeat % 2 == 0 else (2, 1):
                start, first, rows, first_rows = time.perf_counter(), None, 0, 0
                for docs, _, _ in ray_batches(str(model_dir), str(corpus), 256, workers, blocks=blocks):
                    rows += len(docs)
                    if first is None:
                        first, first_rows = time.perf_counter(), rows
                end = time.perf_counter()
                runs.append(
                    {
                        "workers": workers,
                        "docs": rows,
                        "startup_s": first - start,
                        "total_s": end - start,
                        "steady_docs_per_s": (rows - first_rows) / (end - first),
                        "docs_per_s": rows / (end - start),
                    }
                )
                print(runs[-1], flush=True)
    finally:
        ray.shutdown()
    return runs


def projection(stream: dict[str, Any], small: dict[str, Any], ray_ratio: float) -> list[dict[str, Any]]:
    """Hours, disk and memory for MS MARCO and 100M passages from the measured rates and sizes (linear in N)."""
    from sbmoe.retrieval.index_settings import choose_index

    n1, n0 = stream["docs"], small["docs"]
    grow_mb_per_doc = (stream["rss_peak_mb"] - small["rss_peak_mb"]) / (n1 - n0)
    fixed_mb = stream["rss_peak_mb"] - grow_mb_per_doc * n1
    rows = []
    for name, n in (("MS MARCO passages", 8_841_823), ("100M passages", 100_000_000)):
        bench_index = choose_index(n, HIDDEN, 8 * GB)
        minilm_index = choose_index(n, 384, 16 * GB)
        rows.append(
            {
                "corpus": name,
                "docs": n,
                "encode_h_1_process": n / stream["docs_per_s"] / 3600,
                "encode_h_2_ray_workers": n / (stream["docs_per_s"] * ray_ratio) / 3600,
                "workers_for_24h": int(np.ceil(n / stream["docs_per_s"] / 86400)),
                "shard_disk_gb": stream["shard_bytes"] / n1 * n / GB,
                "flat_index_gb": stream["index_bytes"] / n1 * n / GB,
                "peak_rss_gb_flat": (fixed_mb + grow_mb_per_doc * n) * 2**20 / GB,
                "index_8gb_budget_64d": f"{bench_index.index_type} {bench_index.params}",
                "index_8gb_budget_64d_gb": bench_index.bytes / GB,
                "index_16gb_budget_384d": f"{minilm_index.index_type} {minilm_index.params}",
                "index_16gb_budget_384d_gb": minilm_index.bytes / GB,
            }
        )
    return rows


def markdown(record: dict[str, Any]) -> str:
    big, small = record["stream"], record["stream_small"]
    lines = [
        "# Streaming encode and index: measured, then projected",
        "",
        f"Command: `{record['command']}`. Machine: {record['machine']}, 2 cores shared with other jobs.",
        "",
        "| run | docs | encode docs/s | encode s | index s | save s | peak RSS MB | index MB | shards MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, run in (("stream N/10", small), ("stream N", big)):
        lines.append(
            f"| {label} | {run['docs']:,} | {run['docs_per_s']:,.0f} | {run['encode_s']:.0f} | {run['index_s']:.1f} | "
            f"{run['save_s']:.1f} | {run['rss_peak_mb']:,.0f} | {run['index_bytes'] / 2**20:,.0f} | "
            f"{run['shard_bytes'] / 2**20:,.0f} |"
        )
    ray = record["ray"]
    lines += [
        "",
        f"Ray, {ray['docs']:,} docs, interleaved repeats: steady docs/s with 1 worker "
        f"{ray['median_docs_per_s'][1]:,.0f}, with 2 workers {ray['median_docs_per_s'][2]:,.0f}: ratio "
        f"**{ray['ratio_2_over_1']:.2f}** "
        f"(actor start-up and first block {ray['median_startup_s']:.1f} s, not counted; end to end, start-up "
        f"included: {ray['ratio_2_over_1_end_to_end']:.2f}).",
        "",
        "## Projection",
        "",
        "| corpus | docs | encode h, 1 process | encode h, 2 Ray workers | processes for 24 h | shards GB | flat "
        "index GB | peak RSS GB (flat) | index in 8 GB, 64-d | GB | index in 16 GB, 384-d | GB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|",
    ]
    for row in record["projection"]:
        lines.append(
            f"| {row['corpus']} | {row['docs']:,} | {row['encode_h_1_process']:.1f} | "
            f"{row['encode_h_2_ray_workers']:.1f} | {row['workers_for_24h']} | {row['shard_disk_gb']:.1f} | "
            f"{row['flat_index_gb']:.1f} | {row['peak_rss_gb_flat']:.1f} | `{row['index_8gb_budget_64d']}` | "
            f"{row['index_8gb_budget_64d_gb']:.1f} | `{row['index_16gb_budget_384d']}` | "
            f"{row['index_16gb_budget_384d_gb']:.1f} |"
        )
    lines += ["", "Assumptions:", *[f"- {a}" for a in record["assumptions"]], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--ray-docs", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=2, help="Ray runs per worker count (interleaved)")
    parser.add_argument("--work", default="/tmp/sbmoe-bench-scale")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_stream(*args.child)))
        return
    from conftest import write_tiny_bert

    work = Path(args.work)
    model_dir = write_tiny_bert(work / "bert", hidden=HIDDEN)
    corpora = {n: work / f"corpus-{n}.jsonl" for n in (args.docs // 10, args.docs, args.ray_docs)}
    for n, path in corpora.items():
        if not path.is_file():
            write_corpus(path, n)
    small = stream_run(model_dir, corpora[args.docs // 10], work / "run-small")
    print("stream N/10", small, flush=True)
    big = stream_run(model_dir, corpora[args.docs], work / "run")
    print("stream N", big, flush=True)
    runs = ray_runs(model_dir, corpora[args.ray_docs], args.repeats, max(4, args.ray_docs // 10_000))
    medians = {w: statistics.median(r["steady_docs_per_s"] for r in runs if r["workers"] == w) for w in (1, 2)}
    ray = {
        "docs": args.ray_docs,
        "runs": runs,
        "median_docs_per_s": medians,
        "ratio_2_over_1": medians[2] / medians[1],
        "median_startup_s": statistics.median(r["startup_s"] for r in runs),
        "ratio_2_over_1_end_to_end": statistics.median(r["docs_per_s"] for r in runs if r["workers"] == 2)
        / statistics.median(r["docs_per_s"] for r in runs if r["workers"] == 1),
    }
    command = "python experiments/bench_scale.py" + ("" if args.docs == 1_000_000 else f" --docs {args.docs}")
    record = {
        "command": command + ("" if args.ray_docs == 200_000 else f" --ray-docs {args.ray_docs}"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average at start {os.getloadavg()}",
        "model": f"random BERT, 2 layers, hidden {HIDDEN}, mean pooling, normalised; 1 torch thread per process",
        "corpus": "12-24 random words per passage, jsonl; shards of 100,000; flat index",
        "stream_small": small,
        "stream": big,
        "peak_rss_goal_met": big["rss_peak_mb"] * 2**20 <= 2 * 2**30 + big["index_bytes"],
        "ray": ray,
        "projection": projection(big, small, ray["ratio_2_over_1"]),
        "assumptions": [
            "encode time is linear in N at the measured single-process rate of this tiny model on one CPU thread; "
            "a real encoder is slower per worker (MiniLM-L6 on this CPU: about 24 SciFact docs/s, "
            "bench_encode.json), so scale hours by (measured rate / your model's rate per worker)",
            "Ray workers beyond 2 scale like the measured 2-over-1 ratio per doubling at best; the 2-worker column "
            "uses the measured ratio (here on 2 shared cores, so below a cluster's)",
            "shard disk, flat index bytes and peak RSS are linear in N from the two measured sizes (N/10 and N); "
            "peak RSS includes the in-RAM index and its ids, nothing else grows with N",
            "index choice: sbmoe.retrieval.index_settings.choose_index with the stated RAM budget (IVF defaults "
            "nlist = min(4 sqrt(N), N/39)); 384-d is MiniLM's dimension",
        ],
    }
    write_atomic(OUTPUT, json.dumps(record, indent=1))
    write_atomic(TABLE, markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
