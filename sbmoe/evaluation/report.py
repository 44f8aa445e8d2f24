"""Result reporting: the tables that show evaluation results (the :mod:`sbmoe.evaluation.evaluator` schema)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

TABLE_METRICS = ("nDCG@10", "MAP@100", "MRR@10", "Recall@100", "Recall@1000", "P@1", "Success@1", "Success@5")


def markdown_table(source: str, results: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the main metrics, one row per dataset, with the index type and its parameters."""
    names = [m for m in TABLE_METRICS if all(m in r["metrics"] for r in results)]
    lines = [
        f"| model | dataset | index | queries | docs | {' | '.join(names)} | encode s | search s |",
        "|---|---|---|---:|---:|" + "---:|" * len(names) + "---:|---:|",
    ]
    for r in results:
        values = " | ".join(f"{r['metrics'][m]:.4f}" for m in names)
        index = r.get("index") or {"type": "run file", "params": {}}
        params = ",".join(f"{k}={v}" for k, v in index["params"].items() if v is not None)
        timings = r.get("timings", {})
        encode = f"{timings['encode_corpus_s']:.1f}" if "encode_corpus_s" in timings else "–"
        encode += " (cached)" if r.get("corpus_from_cache") else ""
        search = f"{timings['search_s']:.2f}" if "search_s" in timings else "–"
        judged = r.get("judged_queries", r["num_queries"])
        queries = f"{r['num_queries']}" + (f" of {judged}" if r["num_queries"] != judged else "")
        lines.append(
            f"| {source} | {r['dataset']} ({r['split']}) | {index['type']}{f' {params}' if params else ''} | "
            f"{queries} | {r['num_docs'] if r['num_docs'] is not None else '–'} | {values} | {encode} | "
            f"{search} |"
        )
    return "\n".join(lines) + "\n"


def finetune_table(record: dict[str, Any]) -> str:
    """Each eval set's metrics in a fine-tuning run record: zero-shot backbone, fine-tuned model, difference."""
    lines = []
    for spec, result in record["eval"].items():
        base = record.get("zero_shot", {}).get(spec, {}).get("metrics", {})
        lines.append(f"{spec} ({result['num_queries']} queries)")
        for name, value in result["metrics"].items():
            line = f"  {name:<11} fine-tuned {value:.4f}"
            if name in base:
                line = f"  {name:<11} zero-shot {base[name]:.4f}  fine-tuned {value:.4f}  {value - base[name]:+.4f}"
            lines.append(line)
    return "\n".join(lines) + ("\n" if lines else "")
