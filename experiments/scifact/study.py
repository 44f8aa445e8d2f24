"""The SciFact study: does an SB-MoE head generalise, and beat a dense head of the same size?

MiniLM backbone, SciFact train; every setting is chosen on a dev split of 100 train queries whose positives are
unseen by the remaining train queries (never on test). Each row runs 3 seeds; reported on SciFact ``test``,
``test-unseen`` and Cranfield (zero-shot), with expert utilization and paired significance tests.

    python experiments/scifact/study.py                 # head-only rows (cached features; minutes)
    python experiments/scifact/study.py --full          # also the --train full rows (one epoch, 3 seeds; hours)

Each run's ``run.json`` is kept under ``out/study/`` and reused, so an interrupted study continues where it
stopped. Results: ``experiments/results/scifact_study.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sbmoe.evaluation.significance import paired_test
from sbmoe.files import write_atomic
from sbmoe.training.runner import FinetuneArguments, run

EVAL = ["scifact:test", "scifact:test-unseen", "cranfield:test"]
METRICS = ["nDCG@10", "MAP@100", "Recall@100", "MRR@10"]
SEEDS = [0, 1, 2]
BASE = {
    "backbone": "minilm",
    "train_data": "scifact:train",
    "eval_data": ",".join(EVAL),
    "dev_queries": 100,
    "patience": 4,
    "epochs": 40,
    "weight_decay": 0.1,
    "hard_negatives": 7,
    "temperature": 0.05,
    "save_model": False,
}
GRID = {"learning_rate": [1e-4, 3e-4, 1e-3]}
# A ReZero scale starting at 0 moves about one learning rate per AdamW step: it needs larger rates to leave zero
# within the early-stopping window.
REZERO_GRID = {"learning_rate": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]}
RESULTS = Path(__file__).resolve().parents[1] / "results"
ROWS = Path(__file__).resolve().parent / "rows"
# options that apply to a dense head too
RECIPE_KEYS = ("query_only", "anchor_weight", "self_supervised", "tune_strength")


@dataclass
class Row:
    """One row of the table: fixed arguments, and a grid searched on dev (seed 0) before the seeds run."""

    name: str
    args: dict[str, Any]
    grid: dict[str, list[Any]] = field(default_factory=lambda: dict(GRID))
    seeds: list[int] = field(default_factory=lambda: list(SEEDS))


def run_once(args: dict[str, Any], out: Path) -> dict[str, Any]:
    """One fine-tuning run (reused from ``out/run.json`` when present)."""
    record_file = out / "run.json"
    if record_file.is_file():
        return json.loads(record_file.read_text())
    return run(FinetuneArguments.from_flat({**BASE, **args, "output_dir": str(out)}))


def slug(values: dict[str, Any]) -> str:
    return "-".join(f"{k}={v}" for k, v in sorted(values.items())) or "default"


def tune(row: Row, root: Path) -> dict[str, Any]:
    """The grid point with the best dev nDCG@10 (seed 0)."""
    if not row.grid:
        return {}
    scored = []
    for values in itertools.product(*row.grid.values()):
        point = dict(zip(row.grid, values, strict=True))
        record = run_once({**row.args, **point, "seed": 0}, root / row.name / slug(point) / "seed0")
        scored.append((record.get("dev_nDCG@10") or 0.0, point))
        logging.info("%s %s dev nDCG@10 %.4f", row.name, point, scored[-1][0])
    return max(scored, key=lambda x: x[0])[1]


def run_row(row: Row, root: Path) -> dict[str, Any]:
    """Tune on dev, then run every seed with the chosen point; mean +- std, per-query means, utilization."""
    point = tune(row, root)
    records = [
        run_once({**row.args, **point, "seed": s}, root / row.name / slug(point) / f"seed{s}") for s in row.seeds
    ]
    summary: dict[str, Any] = {"args": {**row.args, **point}, "seeds": row.seeds, "eval": {}}
    summary["arguments"] = records[0]["arguments"]
    summary["dev_nDCG@10"] = [r.get("dev_nDCG@10") for r in records]
    summary["epochs_kept"] = [r["history"].get("best_epoch") for r in records]
    summary["seconds"] = [r["seconds"] for r in records]  # one run each: training, dev choice and evaluation
    summary["head_parameters"] = records[0]["head_parameters"]
    for spec in EVAL:
        results = [r["eval"][spec] for r in records]
        entry: dict[str, Any] = {}
        for metric in METRICS:
            values = [res["metrics"][metric] for res in results]
            entry[metric] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}
        queries = sorted(results[0]["per_query"]["nDCG@10"])
        entry["per_query_nDCG@10"] = {
            q: float(np.mean([res["per_query"]["nDCG@10"][q] for res in results])) for q in queries
        }
        if "experts" in results[0]:
            entry["experts"] = {
                key: np.mean([res["experts"][key] for res in results], axis=0).tolist()
                for key in ("shares", "min_share", "entropy", "changed_from_init")
                if key in results[0]["experts"]
            }
        summary["eval"][spec] = entry
    return summary


def head_rows() -> list[Row]:
    """The head-only rows (the best learned / generalising settings are chosen on dev by :func:`main`)."""
    return [
        Row("zero-shot", {"head": "none"}, grid={}, seeds=[0]),
        Row("dense, one expert's size", {"head": "dense", "dense_size": "expert"}),
        Row("dense, equal total parameters", {"head": "dense", "dense_size": "total"}),
        Row("SB-MoE faithful, cos", {"routing": "faithful", "inference": "soft"}),
        Row(
            "SB-MoE faithful, dot tau 1 (paper)",
            {"routing": "faithful", "inference": "soft", "similarity": "dot", "temperature": 1.0},
        ),
        Row("SB-MoE learned, soft", {"routing": "learned", "inference": "soft", "top_k": 2}),
        Row("SB-MoE learned, top-2", {"routing": "learned", "inference": "topk", "top_k": 2}),
        Row("SB-MoE learned, top-1", {"routing": "learned", "inference": "top1", "top_k": 1}),
    ]


def fixed(args: dict[str, Any]) -> dict[str, Any]:
    """A row's chosen arguments without the searched ones, to build further rows on."""
    return {k: v for k, v in args.items() if k not in GRID}


def recipe_rows(best: dict[str, Any]) -> list[Row]:
    """Generalisation avenues on top of the best learned setting, each tuned on dev like every row."""
    base = fixed(best)
    return [
        Row("recipe: soft routing while training too", {**base, "top_k": 6, "inference": "soft"}),
        Row("recipe: query-only routing", {**base, "query_only": True}),
        Row("recipe: k-means router init", {**base, "router_init": "kmeans"}),
        Row("recipe: identity init (ReZero)", {**base, "identity_init": True}, grid=REZERO_GRID),
        Row("recipe: pull toward zero-shot", {**base, "anchor_weight": 1.0}),
        # title -> abstract self-supervision from the training corpus (7x the pairs per epoch)
        Row("recipe: + title->abstract pairs", {**base, "self_supervised": "title"}),
    ]


def second_round_rows(best: dict[str, Any], query_only: dict[str, Any]) -> list[Row]:
    """Second round: strength tuned on dev, balanced routing, query-only variants, expert dropout, cropped spans."""
    base, query = fixed(best), fixed(query_only)
    balanced = {**GRID, "aux_loss_weight": [0.1, 1.0]}
    return [
        Row("recipe: query-only + title->abstract pairs", {**query, "self_supervised": "title"}),
        Row("recipe: strength tuned on dev", {**base, "tune_strength": True}),
        Row("recipe: query-only + strength tuned on dev", {**query, "tune_strength": True}),
        Row("recipe: query-only + balanced routing", query, grid=balanced),
        Row("recipe: query-only + balanced routing + strength", {**query, "tune_strength": True}, grid=balanced),
        Row("recipe: query-only + k-means router init", {**query, "router_init": "kmeans"}),
        Row("recipe: query-only + identity init (ReZero)", {**query, "identity_init": True}, grid=REZERO_GRID),
        Row("recipe: expert dropout 0.25", {**base, "expert_dropout": 0.25}),
        Row("recipe: query-only + expert dropout 0.25", {**query, "expert_dropout": 0.25}),
        Row("recipe: + cropped-span pairs", {**base, "self_supervised": "crop"}),
        Row("recipe: query-only + cropped-span pairs", {**query, "self_supervised": "crop"}),
    ]


def full_rows() -> list[Row]:
    """``--train full`` rows, one epoch each (3 seeds): batch 32, one mined negative, backbone lr 2e-5.

    The head is the best learned setting on dev (learned top-1 routing, head lr 1e-3), fixed before the recipes
    finished so that the slow run could start. Checkpoints every 5 steps, so a killed run continues (``--resume``).
    """
    full = {
        "train": "full",
        "batch_size": 32,
        "hard_negatives": 1,
        "backbone_learning_rate": 2e-5,
        "epochs": 1,
        "save_steps": 5,
        "resume": True,
    }
    head = {"routing": "learned", "top_k": 1, "inference": "top1", "learning_rate": 1e-3}
    return [
        Row("full fine-tuning, no head (1 epoch)", {"head": "none", **full}, grid={}),
        Row("full fine-tuning, SB-MoE head (1 epoch)", {**head, **full}, grid={}),
    ]


def best_by_dev(summaries: dict[str, Any], names: list[str]) -> str:
    return max(names, key=lambda n: np.mean(summaries[n]["dev_nDCG@10"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/study", help="folder of the individual runs")
    parser.add_argument("--full", action="store_true", help="also run the --train full rows")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--rows-only", action="store_true", help="only (re)write experiments/scifact/rows/*.json from the results file"
    )
    cli = parser.parse_args()
    if cli.rows_only:
        write_row_files(json.loads((RESULTS / "scifact_study.json").read_text())["rows"], cli.threads)
        return
    torch.set_num_threads(cli.threads)
    BASE["threads"] = cli.threads
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    root = Path(cli.out)
    summaries: dict[str, Any] = {}
    for row in head_rows():
        summaries[row.name] = run_row(row, root)
    write_results(summaries)
    best_learned = best_by_dev(summaries, [n for n in summaries if n.startswith("SB-MoE learned")])
    best = summaries[best_learned]["args"]
    for row in recipe_rows(best):
        summaries[row.name] = run_row(row, root)
        write_results(summaries)
    for row in second_round_rows(best, summaries["recipe: query-only routing"]["args"]):
        summaries[row.name] = run_row(row, root)
        write_results(summaries)
    best_recipe = best_by_dev(summaries, [n for n in summaries if n.startswith("recipe:")] + [best_learned])
    summaries["chosen"] = {"best_learned": best_learned, "best_recipe": best_recipe}
    for recipe in dict.fromkeys([best_recipe, "recipe: query-only routing"]):  # dense heads with the same recipe
        recipe_options = {k: v for k, v in summaries[recipe]["args"].items() if k in RECIPE_KEYS}
        if recipe_options:
            name = f"dense, equal total parameters, {recipe.removeprefix('recipe: ')}"
            row = Row(name, {"head": "dense", "dense_size": "total", **recipe_options})
            summaries[name] = run_row(row, root)
    for experts in (3, 9, 12):
        args = {**summaries[best_recipe]["args"], "num_experts": experts}
        top_k = args.get("top_k", 2)
        args["top_k"] = experts if top_k >= 6 else min(top_k, experts)  # soft training keeps "all experts"
        name = f"best recipe ({best_recipe.removeprefix('recipe: ')}), {experts} experts"
        summaries[name] = run_row(Row(name, args, grid={}), root)
        write_results(summaries)
    if cli.full:
        for row in full_rows():
            summaries[row.name] = run_row(row, root)
            write_results(summaries)


def write_results(summaries: dict[str, Any]) -> None:
    """Significance tests, then the JSON, markdown table and PNG under ``experiments/results``."""
    rows = {name: summary for name, summary in summaries.items() if name != "chosen"}
    baseline, dense = rows["zero-shot"], rows["dense, equal total parameters"]
    for summary in rows.values():
        for spec in EVAL:
            entry = summary["eval"][spec]
            own = entry["per_query_nDCG@10"]
            entry["vs_zero_shot"] = paired_test(own, baseline["eval"][spec]["per_query_nDCG@10"])
            entry["vs_dense_equal"] = paired_test(own, dense["eval"][spec]["per_query_nDCG@10"])
    rivals = comparisons(rows)
    record = {
        "base_arguments": BASE,
        "grid": GRID,
        "chosen": summaries.get("chosen"),
        "rows": rows,
        "comparisons": rivals,
    }
    write_atomic(RESULTS / "scifact_study.json", json.dumps(record, indent=1))
    write_row_files(rows, BASE.get("threads", 1))
    write_atomic(RESULTS / "scifact_study.md", markdown(rows) + comparisons_markdown(rivals))
    plot(rows, RESULTS / "scifact_study.png")


def write_row_files(rows: dict[str, Any], threads: int) -> None:
    """Each row's full arguments (its dev-chosen grid point, seed 0) as ``rows/<row>.json``.

    ``sbmoe finetune rows/<row>.json`` reruns the row's seed-0 run (change ``seed`` in the file for the others).
    """
    folder = ROWS
    folder.mkdir(exist_ok=True)
    for name, summary in rows.items():
        file_name = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        arguments = {**summary["arguments"], "seed": 0, "threads": threads, "save_model": True}
        arguments["output_dir"] = f"out/rows/{file_name}"
        write_atomic(folder / f"{file_name}.json", json.dumps(arguments, indent=1) + "\n")


def markdown(summaries: dict[str, Any]) -> str:
    """The study table: nDCG@10 / MAP@100 / R@100 / MRR@10 (mean +- std) and expert utilization."""
    lines = [
        "| row | seeds | SciFact test nDCG@10 | MAP@100 | R@100 | MRR@10 | test-unseen nDCG@10 | MAP@100 | R@100 "
        "| MRR@10 | Cranfield nDCG@10 | min expert share (SciFact docs) | routing entropy | changed expert |",
        "|---" * 15 + "|",
    ]
    for name, summary in summaries.items():
        cells = [name, str(len(summary["seeds"]))]
        for spec in EVAL:
            entry = summary["eval"][spec]
            metrics = METRICS if spec != "cranfield:test" else ["nDCG@10"]
            for metric in metrics:
                cell = f"{entry[metric]['mean']:.3f} ± {entry[metric]['std']:.3f}"
                if metric == "nDCG@10" and name != "zero-shot":
                    cell += mark(entry["vs_zero_shot"], "z") + mark(entry["vs_dense_equal"], "d")
                cells.append(cell)
        experts = summary["eval"]["scifact:test"].get("experts", {})
        cells.append(f"{experts['min_share']:.3f}" if "min_share" in experts else "–")
        cells.append(f"{experts['entropy']:.2f}" if "entropy" in experts else "–")
        cells.append(f"{experts['changed_from_init']:.2f}" if "changed_from_init" in experts else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "nDCG@10 marks: `+z`/`-z` = significantly above/below the zero-shot backbone, `+d`/`-d` = above/below "
        "the dense head of equal total parameters (paired t-test and paired randomization test both p < 0.05 on "
        "per-query nDCG@10 averaged over seeds); no mark = not significant.",
    ]
    return "\n".join(lines) + "\n"


def comparisons(rows: dict[str, Any]) -> list[dict[str, Any]]:
    """Paired tests of SB-MoE rows against their closest rival.

    Each recipe row against the equal-size dense head trained with the same recipe, the full fine-tuning SB-MoE row
    against full fine-tuning without a head, and learned routing against the paper's faithful routing.
    """
    pairs = [
        (name, f"dense, equal total parameters, {name.removeprefix('recipe: ')}")
        for name in rows
        if name.startswith("recipe: ")
    ]
    pairs += [
        (name, "full fine-tuning, no head (1 epoch)") for name in rows if name.startswith("full fine-tuning, SB")
    ]
    learned = [name for name in rows if name.startswith("SB-MoE learned") or name == "recipe: query-only routing"]
    pairs += [(name, "SB-MoE faithful, cos") for name in learned]
    return [
        {
            "row": row,
            "against": other,
            "tests": {
                spec: paired_test(
                    rows[row]["eval"][spec]["per_query_nDCG@10"], rows[other]["eval"][spec]["per_query_nDCG@10"]
                )
                for spec in EVAL
            },
        }
        for row, other in pairs
        if other in rows
    ]


def comparisons_markdown(pairs: list[dict[str, Any]]) -> str:
    """Row minus rival: nDCG@10 points, standard error of the paired difference, both p values."""
    lines = [
        "",
        "SB-MoE rows minus their closest rival (nDCG@10 points ± standard error of the paired difference; "
        "p from the paired t-test / randomization test):",
        "",
        "| row | against | " + " | ".join(EVAL) + " |",
        "|---" * (len(EVAL) + 2) + "|",
    ]
    for pair in pairs:
        cells = [
            f"{100 * t['delta']:+.1f} ± {100 * t['se']:.1f} (p {t['p_ttest']:.2f} / {t['p_randomization']:.2f})"
            for t in (pair["tests"][spec] for spec in EVAL)
        ]
        lines.append(f"| {pair['row']} | {pair['against']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mark(test: dict[str, float], against: str) -> str:
    """`` +z``/`` -z`` when significantly above/below (both tests p < 0.05), else nothing."""
    if test["n"] == 0 or max(test["p_ttest"], test["p_randomization"]) >= 0.05:
        return ""
    return f" {'+' if test['delta'] > 0 else '-'}{against}"


def plot(summaries: dict[str, Any], path: Path) -> None:
    """nDCG@10 minus zero-shot per row on test, test-unseen and Cranfield, with +-1 std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in summaries if n != "zero-shot"]
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(names) + 1.5))
    y = np.arange(len(names))
    for i, spec in enumerate(EVAL):
        base = summaries["zero-shot"]["eval"][spec]["nDCG@10"]["mean"]
        means = [100 * (summaries[n]["eval"][spec]["nDCG@10"]["mean"] - base) for n in names]
        stds = [100 * summaries[n]["eval"][spec]["nDCG@10"]["std"] for n in names]
        ax.barh(y + (i - 1) * 0.27, means, 0.27, xerr=stds, label=spec)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("nDCG@10 minus zero-shot MiniLM (points; error bar = std over seeds)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
