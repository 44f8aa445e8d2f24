"""The reuse study's report: each identity-start reuse row against no reuse on the same layers, from the runs that
``reuse_open.py`` committed (``reuse_rows/<row>/seed<s>.json``).

    python experiments/moe_layers/reuse_report.py

Per eval set: mean +- std over seeds of both rows, the difference with a seeds x queries bootstrap 95% interval,
the paired t-test on per-query seed means and Holm's correction across the table. Per MoE layer at the end of
training: the opened reuse scale and the own-expert share (tokens whose largest-weight candidate is one of the
layer's own experts), over seeds. Then the issue's goals. Writes
``experiments/results/moe_layers_reuse_open.{json,md,png}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from reuse_open import RIVALS, RUNS, slug  # noqa: E402

from sbmoe.evaluation.significance import compare_seeded, holm  # noqa: E402
from sbmoe.files import write_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
EVAL = ["scifact:test", "scifact:test-unseen", "cranfield:test", "nfcorpus:test"]
LEAKY = {"nfcorpus:test"}  # every row trains on NFCorpus train too, whose relevant documents NFCorpus test shares
UNSEEN = "scifact:test-unseen"


def seed_runs(name: str) -> list[dict[str, Any]]:
    """The committed runs of a row, in seed order."""
    folder = RUNS / slug(name)
    files = sorted(folder.glob("seed*.json"), key=lambda f: int(f.stem.removeprefix("seed")))
    return [json.loads(f.read_text()) for f in files]


def layer_summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per MoE layer: the reuse scale and own-expert share at the end of training, each seed's value."""
    layers = [u["layer"] for u in runs[0]["moe_utilization"]]
    out = []
    for i, layer in enumerate(layers):
        scales = [r["moe_utilization"][i]["reuse_scale"] for r in runs]
        shares = [r["moe_utilization"][i]["own_share"] for r in runs]
        out.append({"layer": layer, "reuse_scale": scales, "own_share": shares})
    return out


def _cell(runs: list[dict[str, Any]], spec: str) -> dict[str, float]:
    values = [r["eval"][spec]["metrics"]["nDCG@10"] for r in runs]
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def comparisons() -> dict[str, Any]:
    """Every reuse row with committed runs against its no-reuse rival; Holm over every cell of the table."""
    table: dict[str, Any] = {}
    for name, (rival, _) in RIVALS.items():
        runs, rival_runs = seed_runs(name), seed_runs(rival)
        if not runs or not rival_runs:
            continue
        row: dict[str, Any] = {"rival": rival, "seeds": len(runs), "rival_seeds": len(rival_runs), "eval": {}}
        for spec in EVAL:
            per_query = [[r["eval"][spec]["per_query"]["nDCG@10"] for r in rs] for rs in (runs, rival_runs)]
            row["eval"][spec] = {
                "reuse": _cell(runs, spec),
                "no_reuse": _cell(rival_runs, spec),
                "zero_shot": runs[0]["zero_shot"][spec]["metrics"]["nDCG@10"],
                "leaky": spec in LEAKY,
                **compare_seeded(*per_query),
            }
        row["layers"] = layer_summary(runs)
        row["kept"] = [r["kept"] for r in runs]
        row["seconds"] = [round(r["seconds"], 1) for r in runs]
        table[name] = row
    cells = [(name, spec) for name, row in table.items() for spec in row["eval"]]
    for (name, spec), p in zip(cells, holm([table[n]["eval"][s]["p_ttest"] for n, s in cells]), strict=True):
        table[name]["eval"][spec]["p_holm"] = p
    return table


def goals(table: dict[str, Any]) -> list[str]:
    """The issue's goal and its fallback, each reached or not."""
    wins = [n for n, row in table.items() if row["eval"][UNSEEN]["delta"] >= 0.005 and row["eval"][UNSEEN]["low"] > 0]
    below = [
        f"{n} on {spec}"
        for n, row in table.items()
        for spec, cell in row["eval"].items()
        if not cell["leaky"] and cell["high"] < 0
    ]
    deltas = ", ".join(f"{n}: {100 * row['eval'][UNSEEN]['delta']:+.2f}" for n, row in table.items())
    return [
        f"- a reuse row beats no reuse by >= 0.5 on test-unseen, interval above 0: "
        f"{'REACHED by ' + ', '.join(wins) if wins else 'not reached'} ({deltas})",
        f"- no reuse row below no reuse beyond its interval (unseen collections): "
        f"{'not reached: ' + ', '.join(below) if below else 'REACHED'}",
    ]


def markdown(table: dict[str, Any]) -> str:
    """The comparison table, the per-layer scale and own share, the goals."""
    lines = [
        "# Reuse that starts at no reuse: MiniLM-L6, fixed recipe, against no reuse on the same layers",
        "",
        "nDCG@10 x 100, mean +- std over seeds. Delta: reuse minus no reuse, 95% interval by a bootstrap over seeds",
        "and queries; p: paired t-test on per-query seed means, Holm-corrected across the table. Both domains trained",
        "(`leaky`: NFCorpus test shares relevant documents with NFCorpus train). Commands:",
        "`python experiments/moe_layers/reuse_open.py --part train`, `python experiments/moe_layers/reuse_report.py`.",
        "",
        "| row | eval | seeds | zero-shot | no reuse | reuse | delta [95% interval] | p (t) | p (Holm) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        for spec, c in row["eval"].items():
            label = f"{spec} (leaky)" if c["leaky"] else spec
            lines.append(
                f"| {name} | {label} | {row['seeds']} vs {row['rival_seeds']} | {100 * c['zero_shot']:.2f} | "
                f"{100 * c['no_reuse']['mean']:.2f} +- {100 * c['no_reuse']['std']:.2f} | "
                f"{100 * c['reuse']['mean']:.2f} +- {100 * c['reuse']['std']:.2f} | "
                f"{100 * c['delta']:+.2f} [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}] | "
                f"{c['p_ttest']:.3g} | {c['p_holm']:.3g} |"
            )
    lines += ["", "At the end of training, per MoE layer (each seed):", ""]
    lines += ["| row | layer | reuse scale | own-expert share |", "|---|---:|---|---|"]
    for name, row in table.items():
        for layer in row["layers"]:
            scales = ", ".join(f"{s:+.4f}" for s in layer["reuse_scale"])
            shares = ", ".join(f"{s:.3f}" for s in layer["own_share"])
            lines.append(f"| {name} | {layer['layer']} | {scales} | {shares} |")
    return "\n".join(lines + ["", "Goals:", *goals(table), ""])


def plot(table: dict[str, Any], path: Path) -> None:
    """Delta against no reuse with its interval, per row and eval set."""
    names = list(table)
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(EVAL)
    for i, spec in enumerate(EVAL):
        cells = [table[n]["eval"][spec] for n in names]
        x = np.arange(len(names)) + (i - (len(EVAL) - 1) / 2) * width
        delta = np.array([100 * c["delta"] for c in cells])
        errors = [delta - [100 * c["low"] for c in cells], [100 * c["high"] for c in cells] - delta]
        ax.bar(x, delta, width, yerr=errors, capsize=3, label=spec + (" (leaky)" if spec in LEAKY else ""))
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(names)), [n.replace("L6 layers ", "layers ") for n in names], fontsize=8)
    ax.set_ylabel("nDCG@10 x 100, reuse - no reuse")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    table = comparisons()
    write_atomic(RESULTS / "moe_layers_reuse_open.json", json.dumps({"rows": table, "goals": goals(table)}, indent=1))
    write_atomic(RESULTS / "moe_layers_reuse_open.md", markdown(table))
    plot(table, RESULTS / "moe_layers_reuse_open.png")
    print(markdown(table))


if __name__ == "__main__":
    main()
