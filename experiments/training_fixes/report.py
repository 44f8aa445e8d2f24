"""Tables of the training-fixes study: each row against the zero-shot backbone of its own runs, with the mean over
seeds, a seeds x queries bootstrap interval of the difference, the paired t-test and Holm's correction across the
table, beside the same row before the fixes (the earlier studies' JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sbmoe.evaluation.significance import compare_seeded, hierarchical_bootstrap, holm, paired_test
from sbmoe.files import write_atomic

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
LEAKY = {"nfcorpus:test": ("nfcorpus", "both")}
BEFORE = {  # row -> (earlier results file, its row, its zero-shot row): the same training data, old recipe
    "L6 full fine-tuning (layers 4-5) [scifact]": (
        "scifact_study.json",
        "full fine-tuning, no head (1 epoch)",
        "zero-shot",
    ),
}


def seed_runs(name: str, grid: list[float]) -> list[dict[str, Any]]:
    """The finished runs of row ``name`` at its chosen rate (seed 0 of the grid decides), seed order."""
    from study import chosen_rate, row_file

    rate = chosen_rate(name, grid, wait=False)
    if rate is None:
        return []
    files = [row_file(name, rate, seed) for seed in (0, 1, 2)]
    return [json.loads(f.read_text()) for f in files if f.is_file()]


def before_delta(name: str, spec: str) -> float | None:
    """The row's nDCG@10 gain over its own zero-shot on ``spec`` before the fixes, where an earlier study ran it:
    head rows in ``multidomain_head.json`` under the same name, the others as :data:`BEFORE` says."""
    file, old_name, zero_name = BEFORE.get(name, ("multidomain_head.json", name, "zero-shot MiniLM-L6"))
    path = RESULTS / file
    if not path.is_file():
        return None
    rows = json.loads(path.read_text())
    rows = rows.get("rows", rows)
    entry = rows.get(old_name, {}).get("eval", {}).get(spec)
    zero = rows.get(zero_name, {}).get("eval", {}).get(spec)
    if not entry or not zero:
        return None
    return _mean(entry) - _mean(zero)


def _mean(entry: dict[str, Any]) -> float:
    """nDCG@10 mean of an earlier study's cell (``{"mean"}`` or ``{"nDCG@10": {"mean"}}``)."""
    return float(entry["mean"] if "mean" in entry else entry["nDCG@10"]["mean"])


def row_table(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per eval set: zero-shot, mean and std over seeds, difference, interval, t-test p, before."""
    out: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "learning_rate": runs[0]["learning_rate"]}
    out["kept"] = [r["kept"] for r in runs]
    out["kept_zero_shot"] = [r["kept_zero_shot"] for r in runs]
    out["dev_nDCG@10"] = [r["dev_nDCG@10"] for r in runs]
    out["batch_shares"] = runs[0]["batch_shares"]
    out["dev_splits"] = [s.get("dev_split") for s in runs[0]["sources"]]
    out["seconds"] = [r["seconds"] for r in runs]
    out["eval"] = {}
    for spec, zero in runs[0]["zero_shot"].items():
        queries = sorted(zero["per_query"])
        trained = np.array([[r["eval"][spec]["per_query"][q] for q in queries] for r in runs])
        base = np.array([[zero["per_query"][q] for q in queries]])
        boot = hierarchical_bootstrap(trained, base, resamples=10_000)
        seed_mean = dict(zip(queries, trained.mean(axis=0).tolist(), strict=True))
        t = paired_test(seed_mean, zero["per_query"])
        values = [r["eval"][spec]["nDCG@10"] for r in runs]
        regime = name.rsplit("[", 1)[-1].rstrip("]")
        out["eval"][spec] = {
            "zero_shot": zero["nDCG@10"],
            "mean": float(np.mean(values)),
            "std": float(np.std(values)),
            "values": values,
            "delta": boot["delta"],
            "low": boot["low"],
            "high": boot["high"],
            "p_ttest": t["p_ttest"],
            "leaky": regime in LEAKY.get(spec, ()),
            "before_delta": before_delta(name, spec),
        }
    return out


HEADS = (" + SB-MoE head", " + dense head")


def head_against_plain(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Each full fine-tuning row with a head against the same row without one (the paper's claim: the head beats
    plain fine-tuning): difference, seeds x queries interval, t-test on per-query seed means; Holm over the cells."""
    out: dict[str, Any] = {}
    for name, head_runs in runs.items():
        plain = next((name.replace(h, "") for h in HEADS if h in name), None)
        if plain not in runs:
            continue
        out[name] = {"rival": plain, "eval": {}}
        for spec in head_runs[0]["eval"]:
            a, b = ([r["eval"][spec]["per_query"] for r in rs] for rs in (head_runs, runs[plain]))
            out[name]["eval"][spec] = compare_seeded(a, b)
    cells = [(name, spec) for name, row in out.items() for spec in row["eval"]]
    for (name, spec), p in zip(cells, holm([out[n]["eval"][s]["p_ttest"] for n, s in cells]), strict=True):
        out[name]["eval"][spec]["p_holm"] = p
    return out


def write_report(rows: dict[str, dict[str, Any]], grids: dict[str, list[float]]) -> dict[str, Any]:
    """Write ``results/training_fixes.{json,md,png}`` from the finished row files; rows without runs are left out."""
    runs = {name: found for name in rows if (found := seed_runs(name, grids[name]))}
    table = {name: row_table(name, found) for name, found in runs.items()}
    cells = [(name, spec) for name, row in table.items() for spec in row["eval"]]
    adjusted = holm([table[n]["eval"][s]["p_ttest"] for n, s in cells])
    for (name, spec), p in zip(cells, adjusted, strict=True):
        table[name]["eval"][spec]["p_holm"] = p
    rivals = head_against_plain(runs)
    write_atomic(RESULTS / "training_fixes.json", json.dumps({**table, "head_against_plain": rivals}, indent=1))
    write_atomic(RESULTS / "training_fixes.md", markdown(table) + rival_markdown(rivals))
    if table:
        plot(table, RESULTS / "training_fixes.png")
    return table


def markdown(table: dict[str, Any]) -> str:
    """One line per row and eval set."""
    lines = [
        "# Training fixes (issue 21): rows against the zero-shot backbone of their own runs",
        "",
        "nDCG@10 x 100. Mean +- std over seeds; delta and its 95% interval by a bootstrap over seeds and queries;",
        "p: paired t-test on per-query seed means, Holm-corrected across every cell of this table. `leaky`: trained",
        "on NFCorpus train, whose relevant documents NFCorpus test shares. `delta before`: the same row's gain over",
        "its own zero-shot in the earlier study (old recipe, 256 tokens; the full row trained every layer for one",
        "epoch), where one ran. Rows here use 128 tokens (zero-shot below).",
        "",
        "| row | eval | seeds | zero-shot | after | delta [95% interval] | p (t) | p (Holm) | delta before |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        for spec, cell in row["eval"].items():
            before = f"{100 * cell['before_delta']:+.2f}" if cell["before_delta"] is not None else "-"
            lines.append(
                f"| {name} | {spec}{' (leaky)' if cell['leaky'] else ''} | {len(row['seeds'])} | "
                f"{100 * cell['zero_shot']:.2f} | {100 * cell['mean']:.2f} +- {100 * cell['std']:.2f} | "
                f"{100 * cell['delta']:+.2f} [{100 * cell['low']:+.2f}, {100 * cell['high']:+.2f}] | "
                f"{cell['p_ttest']:.3g} | {cell['p_holm']:.3g} | {before} |"
            )
    lines += ["", "Model selection (per seed): " + "; ".join(f"{n}: {r['kept']}" for n, r in table.items()), ""]
    return "\n".join(lines)


def rival_markdown(rivals: dict[str, Any]) -> str:
    """The head-against-plain table (empty while no pair has runs)."""
    if not rivals:
        return ""
    lines = [
        "## Full fine-tuning with a head against the same fine-tuning without one",
        "",
        "| row | against | eval | seeds | delta [95% interval] | p (t) | p (Holm) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rivals.items():
        for spec, c in row["eval"].items():
            lines.append(
                f"| {name} | {row['rival']} | {spec} | {c['seeds'][0]} vs {c['seeds'][1]} | "
                f"{100 * c['delta']:+.2f} [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}] | "
                f"{c['p_ttest']:.3g} | {c['p_holm']:.3g} |"
            )
    return "\n".join([*lines, ""])


def plot(table: dict[str, Any], path: Path) -> None:
    """Delta over zero-shot with its interval, one panel per eval set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = list(next(iter(table.values()))["eval"])
    fig, axes = plt.subplots(1, len(specs), figsize=(4 * len(specs), 0.5 * len(table) + 2), sharey=True)
    for ax, spec in zip(np.atleast_1d(axes), specs, strict=True):
        names = [n for n in table if spec in table[n]["eval"]]
        cells = [table[n]["eval"][spec] for n in names]
        deltas = [100 * c["delta"] for c in cells]
        errors = [[100 * (c["delta"] - c["low"]) for c in cells], [100 * (c["high"] - c["delta"]) for c in cells]]
        ax.errorbar(deltas, range(len(names)), xerr=errors, fmt="o")
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_title(spec)
        ax.set_xlabel("nDCG@10 x 100 over zero-shot")
        ax.set_yticks(range(len(names)), names)
    fig.tight_layout()
    with open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
