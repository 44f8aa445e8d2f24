"""Several training domains at once, and light backbones: does routing help where the paper says it should?

Head rows (frozen MiniLM, cached vectors): three training regimes (SciFact only, NFCorpus only, both), rows
zero-shot, dense head of equal parameters, SB-MoE learned, query-only, and (both domains) domain-supervised
routing. Full rows (MiniLM-L3, both domains): no head, SB-MoE head, dense head of equal size. Each head row picks its
learning rate on the dev split (100 queries per source, seed 0), then runs 3 seeds.

    python experiments/multidomain/run.py --part head     # minutes per row on 2 cores
    python experiments/multidomain/run.py --part full     # a 30-step MiniLM-L3 pilot, about 3 minutes a run
    bash experiments/multidomain/gpu.sh                    # whole epochs, 3 seeds, MiniLM-L3 and L6 (a GPU)

Every run's ``run.json`` is kept under ``out/multidomain/`` and reused, so an interrupted run continues.
Results: ``experiments/results/multidomain.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from sbmoe.evaluation.significance import paired_test
from sbmoe.files import write_atomic
from sbmoe.training.runner import FinetuneArguments, run

RESULTS = Path(__file__).resolve().parents[1] / "results"
EVAL = ["scifact:test", "scifact:test-unseen", "nfcorpus:test", "cranfield:test", "msmarco-sample:test"]
REGIMES = {"scifact": "scifact:train", "nfcorpus": "nfcorpus:train", "both": "scifact:train,nfcorpus:train"}
LEAKY = {"nfcorpus:test": ("nfcorpus", "both")}  # NFCorpus test shares relevant documents with its train split
FULL_EVAL = ["scifact:test", "scifact:test-unseen", "cranfield:test"]  # each run re-encodes them: what 2 cores allow
SEEDS = [0, 1, 2]
FULL_SEEDS = [0]  # two CPU cores allow one seed of the pilot; experiments/multidomain/gpu.sh runs three
FULL_SEEDS_BY_ROW: dict[str, list[int]] = {}  # --row-seeds "full, no head=0,1,2;full, SB-MoE head=0,1,2"
HEAD_BASE = {
    "backbone": "minilm",
    "dev_queries": 100,
    "patience": 4,
    "epochs": 40,
    "weight_decay": 0.1,
    "hard_negatives": 7,
    "max_positives_per_query": 8,
    "save_model": False,
    "threads": 1,
}
FULL_BASE = {
    "backbone": "minilm-l3",
    "train": "full",
    "train_data": REGIMES["both"],
    "epochs": 1,
    "max_steps": 30,  # a pilot: 10-20 s per step on two shared cores; a whole epoch is the GPU script's job
    "batch_size": 32,
    "hard_negatives": 1,
    "max_positives_per_query": 2,
    "max_seq_length": 128,
    "learning_rate": 1e-3,
    "backbone_learning_rate": 5e-5,
    "save_model": False,
    "save_steps": 100_000,
    "eval_data": ",".join(FULL_EVAL),
}
HEAD_ROWS = {
    "dense, equal parameters": {"head": "dense", "dense_size": "total"},
    "SB-MoE learned": {"head": "sbmoe"},
    "SB-MoE query-only": {"head": "sbmoe", "query_only": True, "top_k": 1, "inference": "top1"},
    "SB-MoE domain-supervised": {"head": "sbmoe", "domain_loss_weight": 0.1},
}
FULL_ROWS = {
    "full, no head": {"head": "none"},
    "full, SB-MoE head": {"head": "sbmoe"},
    "full, dense head of equal size": {"head": "dense", "dense_size": "total"},
}
GRID = [3e-4, 1e-3]


def run_once(args: dict[str, Any], out: Path) -> dict[str, Any]:
    """One fine-tuning run, reused from ``out/run.json`` when present."""
    if (out / "run.json").is_file():
        return json.loads((out / "run.json").read_text())
    return run(FinetuneArguments.from_flat({**args, "output_dir": str(out)}))


def run_row(
    args: dict[str, Any], root: Path, grid: list[float] | None, seeds: list[int] = SEEDS
) -> list[dict[str, Any]]:
    """Choose the learning rate on dev (seed 0) when ``grid`` is given, then run every seed."""
    rate = args.get("learning_rate")
    if grid:
        dev = {lr: run_once({**args, "learning_rate": lr, "seed": 0}, root / f"lr{lr}" / "seed0") for lr in grid}
        rate = max(grid, key=lambda lr: dev[lr].get("dev_nDCG@10") or 0.0)
    folder = root / (f"lr{rate}" if grid else "fixed")
    return [run_once({**args, "learning_rate": rate, "seed": s}, folder / f"seed{s}") for s in seeds]


def summarize(records: list[dict[str, Any]], specs: list[str]) -> dict[str, Any]:
    """nDCG@10 mean +- std over seeds, per-query means (for paired tests), expert shares, seconds."""
    summary: dict[str, Any] = {"learning_rate": records[0]["arguments"]["learning_rate"], "eval": {}}
    summary["seconds"] = [round(r["seconds"], 1) for r in records]
    summary["dev_nDCG@10"] = [r.get("dev_nDCG@10") for r in records]
    for spec in specs:
        results = [r["eval"][spec] for r in records]
        values = [res["metrics"]["nDCG@10"] for res in results]
        entry: dict[str, Any] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}
        queries = results[0]["per_query"]["nDCG@10"]
        entry["per_query"] = {q: float(np.mean([res["per_query"]["nDCG@10"][q] for res in results])) for q in queries}
        if "experts" in results[0]:
            entry["expert_shares"] = np.mean([res["experts"]["shares"] for res in results], axis=0).tolist()
        summary["eval"][spec] = entry
    return summary


def zero_shot_minilm(root: Path, specs: list[str] = EVAL) -> dict[str, Any]:
    """The zero-shot all-MiniLM-L6-v2 row on ``specs`` (its run lives under the head part's folder ``root``)."""
    zero = run_once(
        {**HEAD_BASE, "head": "none", "train_data": "scifact:train", "eval_data": ",".join(EVAL), "seed": 0},
        root / "zero-shot",
    )
    return {"regime": "-", **summarize([zero] * len(SEEDS), specs)}


def head_part(root: Path, regimes: list[str]) -> dict[str, Any]:
    """The head rows of ``regimes`` (zero-shot once: it does not depend on the training data)."""
    rows = {"zero-shot MiniLM-L6": zero_shot_minilm(root)}
    for regime in regimes:
        for name, options in HEAD_ROWS.items():
            if "domain_loss_weight" in options and regime != "both":
                continue
            args = {**HEAD_BASE, **options, "train_data": REGIMES[regime], "eval_data": ",".join(EVAL)}
            records = run_row(args, root / regime / name, GRID)
            rows[f"{name} [{regime}]"] = {"regime": regime, **summarize(records, EVAL)}
            write_results(rows, "multidomain_head")
    return rows


def full_part(root: Path, stem: str) -> dict[str, Any]:
    """Full fine-tuning rows on both domains, and the zero-shot reference of the same backbone (128 tokens)."""
    label = {"minilm-l3": "MiniLM-L3", "minilm-l2": "MiniLM-L2", "minilm": "MiniLM-L6"}.get(FULL_BASE["backbone"])
    rows: dict[str, Any] = {}
    args = {**FULL_BASE, "train": "head", "head": "none", "seed": 0}
    args["train_data"] = "scifact:train"  # nothing is trained; its corpus is an eval corpus (one encoding)
    rows[f"zero-shot {label}"] = {"regime": "-", **summarize([run_once(args, root / "zero-shot")] * 3, FULL_EVAL)}
    if label != "MiniLM-L6":
        rows["zero-shot MiniLM-L6 (reference)"] = zero_shot_minilm(root.parent / "head", FULL_EVAL)
    for name, options in FULL_ROWS.items():
        if FULL_SEEDS_BY_ROW.get(name) == []:
            continue
        records = run_row(
            {**FULL_BASE, **options},
            root / "full" / name.replace("full, ", "L3 full, "),
            None,
            FULL_SEEDS_BY_ROW.get(name, FULL_SEEDS),
        )
        rows[f"{label} {name}"] = {"regime": "both", **summarize(records, FULL_EVAL)}
        write_results(rows, stem)
    return rows


def rivals(name: str, rows: dict[str, Any]) -> list[str]:
    """The dense rivals of an SB-MoE row: the dense head of the same regime, or plain fine-tuning and the dense
    head of equal size for a full fine-tuning row."""
    if "full, SB-MoE" in name:
        names = (name.replace("SB-MoE head", "no head"), name.replace("SB-MoE head", "dense head of equal size"))
        return [n for n in names if n in rows]
    if name.startswith("SB-MoE"):
        regime = name.rsplit("[", 1)[1]
        return [n for n in rows if n.startswith("dense") and n.endswith(f"[{regime}")]
    return []


def write_results(rows: dict[str, Any], stem: str) -> None:
    """Paired tests, then JSON, markdown and a plot under ``experiments/results``."""
    zero = next(name for name in rows if name.startswith("zero-shot"))
    for name, row in rows.items():
        for spec, entry in row["eval"].items():
            entry["vs_zero_shot"] = paired_test(entry["per_query"], rows[zero]["eval"][spec]["per_query"])
            entry["vs_rivals"] = [
                {"rival": other, **paired_test(entry["per_query"], rows[other]["eval"][spec]["per_query"])}
                for other in rivals(name, rows)
            ]
    write_atomic(RESULTS / f"{stem}.json", json.dumps(rows, indent=1))
    write_atomic(RESULTS / f"{stem}.md", markdown(rows))
    plot(rows, RESULTS / f"{stem}.png")


def markdown(rows: dict[str, Any]) -> str:
    """nDCG@10 mean +- std per eval set; deltas vs zero-shot with p; leaky cells marked."""
    specs = list(next(iter(rows.values()))["eval"])
    lines = ["| row | " + " | ".join(specs) + " | seeds | s/run |", "|---|" + "---:|" * (len(specs) + 2)]
    for name, row in rows.items():
        cells = []
        for spec in specs:
            entry = row["eval"][spec]
            cell = f"{entry['mean']:.4f} ± {entry['std']:.4f}"
            test = entry.get("vs_zero_shot")
            if test and test["delta"]:
                cell += f" ({100 * test['delta']:+.1f}, p={test['p_ttest']:.2g})"
            if row["regime"] in LEAKY.get(spec, ()):
                cell += " †"
            cells.append(cell)
        seeds = 1 if name.startswith("zero-shot") else len(row["seconds"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {seeds} | {np.mean(row['seconds']):.0f} |")
    lines.append("")
    lines.append(
        "nDCG@10 mean ± std over seeds; (points vs zero-shot, paired t-test p). † in-domain and leaky: "
        "NFCorpus test shares relevant documents with NFCorpus train."
    )
    return "\n".join(lines) + "\n" + rival_table(rows) + expert_table(rows)


def rival_table(rows: dict[str, Any]) -> str:
    """SB-MoE rows minus their closest dense rival, per eval set (points, paired t-test p)."""
    lines = ["", "| row | rival | " + " | ".join(next(iter(rows.values()))["eval"]) + " |"]
    lines.append("|---|---|" + "---:|" * len(next(iter(rows.values()))["eval"]))
    for name, row in rows.items():
        for i, other in enumerate(rivals(name, rows)):
            tests = [entry["vs_rivals"][i] for entry in row["eval"].values()]
            cells = [f"{100 * t['delta']:+.1f} (p={t['p_ttest']:.2g})" for t in tests]
            lines.append(f"| {name} | {other} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def expert_table(rows: dict[str, Any]) -> str:
    """Share of each collection's documents per expert (top-1 routing), for the SB-MoE rows."""
    lines = ["", "| row | collection | expert shares |", "|---|---|---|"]
    for name, row in rows.items():
        for spec, entry in row["eval"].items():
            if "expert_shares" in entry and spec != "scifact:test-unseen":
                shares = " ".join(f"{s:.2f}" for s in entry["expert_shares"])
                lines.append(f"| {name} | {spec.split(':')[0]} | {shares} |")
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, Any], path: Path) -> None:
    """nDCG@10 change from zero-shot per eval set, one bar group per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zero = next(name for name in rows if name.startswith("zero-shot"))
    names = [n for n in rows if not n.startswith("zero-shot")]
    specs = list(rows[zero]["eval"])
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.9), 4.5))
    width = 0.8 / len(specs)
    for i, spec in enumerate(specs):
        deltas = [100 * (rows[n]["eval"][spec]["mean"] - rows[zero]["eval"][spec]["mean"]) for n in names]
        errors = [100 * rows[n]["eval"][spec]["std"] for n in names]
        ax.bar(np.arange(len(names)) + i * width, deltas, width, yerr=errors, label=spec)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(f"nDCG@10 points vs {zero}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["head", "full"], required=True)
    parser.add_argument("--out", default="out/multidomain", help="folder of the individual runs")
    parser.add_argument("--regimes", default=",".join(REGIMES), help="head part: training regimes to run")
    parser.add_argument("--full-seeds", default="0", help="full part: seeds (the GPU script runs 0,1,2)")
    parser.add_argument("--row-seeds", default="", help="full part: per-row seeds, 'ROW=0,1,2;ROW=' (empty: skip)")
    parser.add_argument("--max-steps", type=int, default=30, help="full part: steps (-1: one whole epoch)")
    parser.add_argument("--backbone", default="minilm-l3", help="full part: backbone (the GPU script adds minilm)")
    parser.add_argument("--full-eval", default=",".join(FULL_EVAL), help="full part: eval sets (the GPU script: all)")
    cli = parser.parse_args()
    FULL_SEEDS[:] = [int(s) for s in cli.full_seeds.split(",")]
    for item in filter(None, cli.row_seeds.split(";")):
        name, _, seeds = item.partition("=")
        FULL_SEEDS_BY_ROW[name] = [int(s) for s in seeds.split(",") if s]
    FULL_EVAL[:] = cli.full_eval.split(",")
    FULL_BASE.update(max_steps=cli.max_steps, backbone=cli.backbone, eval_data=cli.full_eval)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("sbmoe").setLevel(logging.INFO)
    root = Path(cli.out)
    pilot = cli.backbone == "minilm-l3" and cli.max_steps == 30
    suffix = "" if pilot else f"_{cli.backbone}_steps{cli.max_steps}"
    if len(FULL_EVAL) == len(EVAL):
        suffix += "_all_collections"
    if cli.part == "head":
        write_results(head_part(root / "head", cli.regimes.split(",")), "multidomain_head")
    else:
        write_results(full_part(root / f"full{suffix}", f"multidomain_full{suffix}"), f"multidomain_full{suffix}")


if __name__ == "__main__":
    main()
