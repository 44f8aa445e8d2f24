"""One MoE block after the encoder (SB-MoE) against MoE layers: stacked head layers and upcycled encoder layers.

Parts (every run's ``run.json`` is kept under ``--out`` and reused, so an interrupted study continues):

    python experiments/moe_layers/study.py --part head    # stacked heads on cached MiniLM-L6 vectors, 3 seeds
    python experiments/moe_layers/study.py --part full    # in-encoder pilot: MiniLM-L3, 15 steps, 1 seed
    python experiments/moe_layers/study.py --part encoder [--shard I/N]  # MiniLM-L6, layers 4-5 trained, 3 seeds
    python experiments/moe_layers/study.py --part reuse4 [--shard I/N]   # MiniLM-L6, layers 2-5 trained, r = 4
    python experiments/moe_layers/study.py --part speed   # encode docs/s as a ratio to the plain backbone
    python experiments/moe_layers/study.py --part report  # JSON + markdown + per-layer expert plot
    python experiments/moe_layers/reuse_open.py ...       # reuse that starts at no reuse, row by row (see there)

Head rows train on SciFact train (the multi-domain data costs ~5x more per run on two shared cores), pick the epoch
on a 100-query dev split held out of it (patience 4), at the fixed learning rate 1e-3 (no choice on test).
Results: ``experiments/results/moe_layers.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import time
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sbmoe.data import load_dataset
from sbmoe.evaluation.significance import paired_test
from sbmoe.files import write_atomic
from sbmoe.heads import HeadConfig, MoELayersConfig
from sbmoe.model import build_model

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("multidomain_run", HERE.parent / "multidomain" / "run.py")
multidomain = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(multidomain)
run_once, summarize, RESULTS = multidomain.run_once, multidomain.summarize, multidomain.RESULTS

EVAL = ["scifact:test", "scifact:test-unseen", "cranfield:test"]
SEEDS = [0, 1, 2]
HEAD_BASE = {**multidomain.HEAD_BASE, "train_data": "scifact:train", "eval_data": ",".join(EVAL)}
HEAD_BASE["learning_rate"] = 1e-3
STACK = {"head": "sbmoe", "num_experts": 4, "top_k": 2}
HEAD_ROWS: dict[str, dict[str, Any]] = {
    "zero-shot MiniLM-L6": {"head": "none"},
    "SB-MoE head (E=6, k=2)": {"head": "sbmoe"},
}
for _layers in (2, 4):
    HEAD_ROWS[f"stack L={_layers}, r=1"] = {**STACK, "head_layers": _layers}
    HEAD_ROWS[f"stack L={_layers}, r=2"] = {**STACK, "head_layers": _layers, "reuse_group": 2}
    HEAD_ROWS[f"stack L={_layers}, r=2, PSR"] = {**STACK, "head_layers": _layers, "reuse_group": 2, "psr": "linear"}
    HEAD_ROWS[f"stack L={_layers}, r=2, PSR, pre-gate"] = {
        **STACK,
        "head_layers": _layers,
        "reuse_group": 2,
        "psr": "linear",
        "pregate": True,
    }
FULL_BASE = {**multidomain.FULL_BASE, "train_data": "scifact:train", "eval_data": ",".join(EVAL), "threads": 1}
UPCYCLED = {"head": "none", "moe_layers": "all", "num_experts": 8, "top_k": 2}
FULL_ROWS: dict[str, dict[str, Any]] = {
    "zero-shot MiniLM-L3": {"head": "none", "train": "head"},
    "L3 plain fine-tuning": {"head": "none"},
    "L3 upcycled every layer (E=8, k=2)": UPCYCLED,
    "L3 upcycled every 2nd layer (E=8, k=2)": {**UPCYCLED, "moe_layers": "every-2"},
    "L3 upcycled every layer, pre-gate": {**UPCYCLED, "pregate": True},
    "L3 upcycled every layer, r=2, PSR": {**UPCYCLED, "reuse_group": 2, "psr": "linear"},
}
ENCODER_EVAL = [*EVAL, "nfcorpus:test"]
ENCODER_BASE = {**multidomain.FULL_BASE, "backbone": "minilm", "eval_data": ",".join(ENCODER_EVAL), "threads": 1}
ENCODER_BASE.update(frozen_layers=4, token_cache_dir="out/moe_layers/token_states")
UP_TOP = {"head": "none", "moe_layers": "4,5", "num_experts": 8, "top_k": 2}
ENCODER_ROWS: dict[str, dict[str, Any]] = {
    "L6 fine-tuning (layers 4-5)": {"head": "none"},
    "L6 fine-tuning + SB-MoE head (E=6, k=2)": {"head": "sbmoe"},
    "L6 upcycled layers 4-5 (E=8, k=2)": UP_TOP,
    "L6 upcycled every 2nd trained layer (5)": {**UP_TOP, "moe_layers": "5"},
    "L6 upcycled layers 4-5, r=2": {**UP_TOP, "reuse_group": 2},
    "L6 upcycled layers 4-5, r=2, PSR": {**UP_TOP, "reuse_group": 2, "psr": "linear"},
    "L6 upcycled layers 4-5, pre-gate": {**UP_TOP, "pregate": True},
}
REUSE4_BASE = {**ENCODER_BASE, "frozen_layers": 2, "eval_data": ",".join(EVAL)}  # a group of 4 needs 4 MoE layers
UP_FOUR = {"head": "none", "moe_layers": "2,3,4,5", "num_experts": 8, "top_k": 2}
REUSE4_ROWS: dict[str, dict[str, Any]] = {
    "L6 upcycled layers 2-5 (E=8, k=2)": UP_FOUR,
    "L6 upcycled layers 2-5, r=4": {**UP_FOUR, "reuse_group": 4},
    "L6 upcycled layers 2-5, r=4, PSR": {**UP_FOUR, "reuse_group": 4, "psr": "linear"},
}
SPEED_MODELS: dict[str, dict[str, Any]] = {
    "minilm-l3 plain": {"backbone": "minilm-l3"},
    "minilm-l3 upcycled every layer (E=8, k=2)": {"backbone": "minilm-l3", "moe": MoELayersConfig("all")},
    "minilm-l3 upcycled every 2nd layer": {"backbone": "minilm-l3", "moe": MoELayersConfig("every-2")},
    "minilm-l3 upcycled every layer, fine-grained": {"backbone": "minilm-l3", "moe": MoELayersConfig(init="fine")},
    "minilm-l3 upcycled every layer, pre-gate": {"backbone": "minilm-l3", "moe": MoELayersConfig(pregate=True)},
    "minilm plain": {"backbone": "minilm"},
    "minilm + SB-MoE head": {"backbone": "minilm", "head": HeadConfig()},
    "minilm + stack L=4, r=2": {"backbone": "minilm", "head": HeadConfig(num_experts=4, head_layers=4, reuse_group=2)},
    "minilm upcycled every layer (E=8, k=2)": {"backbone": "minilm", "moe": MoELayersConfig("all")},
    "minilm upcycled layers 4-5 (E=8, k=2)": {"backbone": "minilm", "moe": MoELayersConfig("4,5")},
    "minilm upcycled layer 5": {"backbone": "minilm", "moe": MoELayersConfig("5")},
    "minilm upcycled layers 4-5, pre-gate": {"backbone": "minilm", "moe": MoELayersConfig("4,5", pregate=True)},
}


def head_part(root: Path) -> dict[str, Any]:
    """The stacked-head rows, 3 seeds each (the zero-shot row once)."""
    rows = {}
    for name, options in HEAD_ROWS.items():
        seeds = [0] if options["head"] == "none" else SEEDS
        records = [run_once({**HEAD_BASE, **options, "seed": s}, root / name / f"seed{s}") for s in seeds]
        rows[name] = row_summary(records)
        logging.getLogger("moe_layers").info("%s: %s", name, {k: v["mean"] for k, v in rows[name]["eval"].items()})
    return rows


def full_part(root: Path, max_steps: int) -> dict[str, Any]:
    """The in-encoder pilot rows, one seed."""
    rows = {}
    for name, options in FULL_ROWS.items():
        args = {**FULL_BASE, "max_steps": max_steps, **options, "seed": 0}
        rows[name] = row_summary([run_once(args, root / f"steps{max_steps}" / name / "seed0")])
        logging.getLogger("moe_layers").info("%s: %s", name, {k: v["mean"] for k, v in rows[name]["eval"].items()})
    return rows


def encoder_part(
    root: Path, shard: tuple[int, int] | None, table: dict[str, dict[str, Any]], base: dict[str, Any]
) -> dict[str, Any] | None:
    """MiniLM-L6 rows of ``table``, 3 seeds, layers above a frozen, cached bottom. With ``shard = (i, n)`` this
    process runs every n-th run from the i-th and returns None (run n shards side by side, then one without).
    Runs go seed by seed, so the first ones fill the token-state store."""
    jobs = [(name, seed) for seed in SEEDS for name in table]
    mine = jobs[shard[0] :: shard[1]] if shard else jobs
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in table}
    for name, seed in mine:
        records[name].append(run_once({**base, **table[name], "seed": seed}, root / name / f"seed{seed}"))
        logging.getLogger("moe_layers").info("%s seed %d done", name, seed)
    if shard:
        return None
    specs = base["eval_data"].split(",")
    if table is not ENCODER_ROWS:
        return {name: row_summary(runs, specs) for name, runs in records.items()}
    first = records[next(iter(ENCODER_ROWS))][0]  # the backbone before training, scored in every run alike
    zero_shot = {
        spec: {"mean": result["metrics"]["nDCG@10"], "std": 0.0, "per_query": {}}
        for spec, result in first["zero_shot"].items()
    }
    plain = {"eval": zero_shot, "seconds": [0], "layers": [], "parameters": first["parameters"]}
    rows = {"zero-shot MiniLM-L6 (128 tokens)": plain}
    return {**rows, **{name: row_summary(runs, specs) for name, runs in records.items()}}


def row_summary(records: list[dict[str, Any]], specs: list[str] = EVAL) -> dict[str, Any]:
    """:func:`summarize` plus parameters and per-layer expert use averaged over seeds."""
    row = summarize(records, specs)
    row["parameters"] = records[0].get("parameters")
    layers = [r.get("moe_utilization") or [] for r in records]
    row["layers"] = [
        {
            "layer": per_seed[0].get("layer", i),
            "shares": np.mean([p["shares"] for p in per_seed], axis=0).tolist(),
            "own_share": float(np.mean([p["own_share"] for p in per_seed])),
        }
        for i, per_seed in enumerate(zip(*layers, strict=True))
    ]
    return row


def speed_part(docs: int, rounds: int) -> dict[str, Any]:
    """Encode docs/s of each model as a ratio to its plain backbone, measured in interleaved rounds."""
    torch.set_num_threads(1)
    dataset = load_dataset("scifact", split="test")
    texts = [doc.full_text for doc in islice(dataset.iter_docs(), docs)]
    models = {name: build_model(max_seq_length=128, device="cpu", **spec) for name, spec in SPEED_MODELS.items()}
    for model in models.values():
        model.encode(texts[:32], batch_size=32)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model.encode(texts, batch_size=32)
            rates[name].append(len(texts) / (time.perf_counter() - start))
    out = {}
    for name, values in rates.items():
        plain = rates[f"{name.split()[0]} plain"]
        ratios = [v / p for v, p in zip(values, plain, strict=True)]
        out[name] = {"docs_per_s": values, "ratio_to_plain": statistics.median(ratios), "ratios": ratios}
    return {"docs": docs, "rounds": rounds, "max_seq_length": 128, "threads": 1, "models": out}


PROTOCOL = """# MoE layers: one block after the encoder against MoE layers (stacked head, upcycled encoder layers)

Protocol. Stacked-head rows (and the SB-MoE head row): frozen all-MiniLM-L6-v2, the head trained on cached pooled
vectors of SciFact train (not the multi-domain SciFact + NFCorpus data: ~5x the time per run on two shared CPU
cores), in-batch + 7 mined hard negatives, AdamW lr 1e-3 (fixed, not tuned), weight decay 0.1, up to 40 epochs, the
epoch kept by nDCG@10 on 100 train queries held out as a dev split (patience 4), 3 seeds; N = 4 experts of H/2
units per stacked layer, top-2. In-encoder rows are a pilot: MiniLM-L3 (MiniLM's first 3 layers), full fine-tuning
of everything for 15 steps of batch 32 (1 hard negative, at most 2 positives per query, 128 tokens), backbone lr
5e-5, routers and heads 1e-3, 1 seed: far from convergence, so they show the machinery, not the trade-off.
Upcycled layers: E = 8 copies of the dense feed-forward block, top-2, gates renormalised (at initialisation the
model encodes as the backbone). r = 2 groups consecutive MoE layers (MiniLM-L3: layers 0+1, then 2 alone); PSR
opens the group linearly by half of training. Expert shares: top-1 choice (stacked head: per SciFact document;
in-encoder: per token of the first 200 SciFact documents). Test sets were never used to choose anything. Rival
deltas are paired t-tests on per-query nDCG@10 (averaged over seeds). Speed: docs/s encoding 256 SciFact documents
at 128 tokens, 1 thread, 3 interleaved rounds, median of the per-round ratios to the plain backbone.

Encoder rows (MiniLM-L6, the second table): the multi-domain data (SciFact train + NFCorpus train, one source per
batch, weights proportional), 30 steps of batch 32 (1 hard negative, at most 2 positives per query, 128 tokens),
backbone lr 5e-5, routers and heads 1e-3, 3 seeds. Layers 4-5 and everything above them train; the embeddings and
layers 0-3 are frozen and their token states come from the token-state cache (`--frozen-layers 4`), which is what
makes 3 seeds of 7 rows fit two CPU cores. MoE rows upcycle the trained layers (E = 8 copies, top-2); r = 2 makes
layers 4 and 5 one group of 16 candidates; pre-gating lets layer 4's input choose layer 5's experts. NFCorpus test is
in-domain and leaky (it shares relevant documents with NFCorpus train).

Reuse rows named "r=2" / "r=4" without "identity start" use the first reuse construction (the group's candidates
scored by their owners' routers on this layer's input, balanced over all r x N candidates): at initialisation it was
not the model without reuse (layers 4-5, r = 2: document cosine 0.605, top-10 overlap 0.57, layer 5 keeps 29% of
its tokens). Rows "identity start" (`reuse_open.py`) use the current construction: own mixture plus a per-layer
scale (0 at the start) times the foreign mixture, routed by the layer's own router, balanced per owner group; at
initialisation it encodes exactly as no reuse (`moe_layers_reuse_open/init.json`). Their no-reuse rival is rerun
beside them ("identity-start code"), so that both run on the same training code."""

RIVALS = {  # row -> (rival, what the comparison tests)
    **{f"stack L={n}, r=2": (f"stack L={n}, r=1", "reuse") for n in (2, 4)},
    **{f"stack L={n}, r=2, PSR": (f"stack L={n}, r=1", "reuse") for n in (2, 4)},
    **{f"stack L={n}, r=2, PSR, pre-gate": (f"stack L={n}, r=2, PSR", "pre-gate") for n in (2, 4)},
    "L3 upcycled every layer (E=8, k=2)": ("L3 plain fine-tuning", "upcycled"),
    "L3 upcycled every 2nd layer (E=8, k=2)": ("L3 plain fine-tuning", "upcycled"),
    "L3 upcycled every layer, r=2, PSR": ("L3 upcycled every layer (E=8, k=2)", "reuse"),
    "L3 upcycled every layer, pre-gate": ("L3 upcycled every layer (E=8, k=2)", "pre-gate"),
    "L6 fine-tuning + SB-MoE head (E=6, k=2)": ("L6 fine-tuning (layers 4-5)", "head"),
    "L6 upcycled layers 4-5 (E=8, k=2)": ("L6 fine-tuning (layers 4-5)", "upcycled"),
    "L6 upcycled every 2nd trained layer (5)": ("L6 fine-tuning (layers 4-5)", "upcycled"),
    "L6 upcycled layers 4-5, r=2": ("L6 upcycled layers 4-5 (E=8, k=2)", "reuse"),
    "L6 upcycled layers 4-5, r=2, PSR": ("L6 upcycled layers 4-5 (E=8, k=2)", "reuse"),
    "L6 upcycled layers 4-5, pre-gate": ("L6 upcycled layers 4-5 (E=8, k=2)", "pre-gate"),
    "L6 upcycled layers 2-5, r=4": ("L6 upcycled layers 2-5 (E=8, k=2)", "reuse"),
    "L6 upcycled layers 2-5, r=4, PSR": ("L6 upcycled layers 2-5 (E=8, k=2)", "reuse"),
}


def compare(rows: dict[str, Any]) -> None:
    """Paired tests of each row against its rival (per-query nDCG@10 averaged over seeds)."""
    for name, (other, _) in RIVALS.items():
        if name in rows and other in rows:
            for spec, entry in rows[name]["eval"].items():
                test = paired_test(entry["per_query"], rows[other]["eval"][spec]["per_query"])
                entry["vs_rival"] = {"rival": other, **test}


def goals(rows: dict[str, Any]) -> list[str]:
    """The issue's three goals, each reached or not, from the rows at hand."""

    def tested(kind: str) -> dict[str, dict[str, Any]]:
        kinds = {n: RIVALS.get(n, ("", ""))[1] for n in rows}
        return {n: r["eval"] for n, r in rows.items() if kinds[n] == kind and "vs_rival" in r["eval"][EVAL[0]]}

    def verdict(text: str, hits: list[str], details: list[str]) -> str:
        return f"- {text}: {'REACHED by ' + ', '.join(hits) if hits else 'not reached'} ({'; '.join(details)})"

    lines = []
    reuse = {n: [e[s]["vs_rival"]["delta"] for s in EVAL[1:]] for n, e in tested("reuse").items()}
    details = [f"{n}: {100 * d[0]:+.1f} / {100 * d[1]:+.1f}" for n, d in reuse.items()]
    hits = [n for n, d in reuse.items() if min(d) >= 0.005]
    lines.append(verdict("reuse (r >= 2) beats no reuse by >= 0.5 on test-unseen and Cranfield", hits, details))
    pre = {n: [e[s]["vs_rival"]["delta"] for s in EVAL] for n, e in tested("pre-gate").items()}
    details = [n + ": " + " / ".join(f"{100 * x:+.1f}" for x in d) for n, d in pre.items()]
    hits = [n for n, d in pre.items() if min(d) >= -0.003]
    lines.append(verdict("pre-gating within 0.3 point of conventional gating on every eval set", hits, details))
    up = {n: e["scifact:test-unseen"]["vs_rival"] for n, e in tested("upcycled").items()}
    details = [f"{n}: {100 * t['delta']:+.1f}, p={t['p_ttest']:.2g}" for n, t in up.items()]
    hits = [n for n, t in up.items() if t["delta"] >= 0.01 and t["p_ttest"] < 0.05]
    lines.append(verdict("an upcycled row beats plain fine-tuning by >= 1.0 on test-unseen, p < 0.05", hits, details))
    return lines


def markdown(rows: dict[str, Any], speed: dict[str, Any] | None) -> str:
    """The table (nDCG@10, parameters, speed ratio, expert use per layer), the comparisons and the goals."""
    ratio = {}
    if speed:
        ratio = {name: m["ratio_to_plain"] for name, m in speed["models"].items()}
    lines = [PROTOCOL, ""]
    groups: dict[tuple[str, ...], dict[str, Any]] = {}  # rows scored on the same eval sets share a table
    for name, row in rows.items():
        groups.setdefault(tuple(row["eval"]), {})[name] = row
    for specs, group in groups.items():
        lines += results_table(group, list(specs))
    if ratio:
        lines += ["", "| model (max 128 tokens, 1 thread) | encode docs/s | ratio to its plain backbone |"]
        lines.append("|---|---:|---:|")
        for name, m in speed["models"].items():
            lines.append(f"| {name} | {statistics.median(m['docs_per_s']):.1f} | {ratio[name]:.2f} |")
    lines += ["", "Goals:", *goals(rows), ""]
    return "\n".join(lines) + "\n"


def results_table(rows: dict[str, Any], specs: list[str]) -> list[str]:
    """Markdown lines: nDCG@10, parameters and expert use per row, then each row against its rival."""
    head = " | seeds | total params | active params | own-expert share per layer | max expert share per layer |"
    lines = ["| row | " + " | ".join(specs) + head, "|---|" + "---:|" * (len(specs) + 5)]
    for name, row in rows.items():
        cells = [f"{e['mean']:.4f} ± {e['std']:.4f}" for e in row["eval"].values()]
        params = row.get("parameters") or {}
        own = " ".join(f"{layer['own_share']:.2f}" for layer in row["layers"]) or "-"
        top = " ".join(f"{max(layer['shares']):.2f}" for layer in row["layers"]) or "-"
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {len(row['seconds'])} | {params.get('total', '-'):,} | "
            f"{params.get('active', '-'):,} | {own} | {top} |"
        )
    lines += ["", "| row | rival | " + " | ".join(specs) + " |", "|---|---|" + "---:|" * len(specs)]
    for name, row in rows.items():
        tests = [e.get("vs_rival") for e in row["eval"].values()]
        if all(tests):
            cells = [f"{100 * t['delta']:+.1f} (p={t['p_ttest']:.2g})" for t in tests]
            lines.append(f"| {name} | {tests[0]['rival']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def plot(rows: dict[str, Any], path: Path) -> None:
    """Per-layer top-1 expert shares (stacked bars, one colour per candidate) for every row with MoE layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    moe = {n: r["layers"] for n, r in rows.items() if r["layers"]}
    columns = min(6, len(moe))
    grid = -(-len(moe) // columns)
    fig, axes = plt.subplots(grid, columns, figsize=(2.6 * columns, 3.2 * grid), squeeze=False, sharey=True)
    for ax in axes.flat[len(moe) :]:
        ax.set_visible(False)
    for ax, (name, layers) in zip(axes.flat, moe.items(), strict=False):  # the grid may have spare cells
        bottom = np.zeros(len(layers))
        for e in range(max(len(layer["shares"]) for layer in layers)):
            shares = np.array([layer["shares"][e] if e < len(layer["shares"]) else 0.0 for layer in layers])
            ax.bar(range(len(layers)), shares, bottom=bottom, color=plt.cm.tab20(e % 20))
            bottom += shares
        ax.set_xticks(range(len(layers)), [str(layer["layer"]) for layer in layers])
        ax.set_title(name.replace(", ", ",\n", 1), fontsize=7)
        ax.set_xlabel("layer", fontsize=7)
    for row in axes:
        row[0].set_ylabel("top-1 share per expert")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["head", "full", "encoder", "reuse4", "speed", "report"], required=True)
    parser.add_argument("--shard", help="encoder part: I/N runs every N-th run from the I-th, side by side")
    parser.add_argument("--out", default="out/moe_layers", help="folder of the individual runs")
    parser.add_argument("--max-steps", type=int, default=15, help="full part: training steps of the pilot")
    parser.add_argument("--docs", type=int, default=256, help="speed part: documents per encode")
    parser.add_argument("--rounds", type=int, default=3, help="speed part: interleaved rounds")
    cli = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("moe_layers").setLevel(logging.INFO)
    root = Path(cli.out)
    part_file = RESULTS / f"moe_layers.{cli.part}.json"  # each part's rows, merged by --part report
    if cli.part == "head":
        write_atomic(part_file, json.dumps(head_part(root / "head")))
    elif cli.part == "full":
        write_atomic(part_file, json.dumps(full_part(root / "full", cli.max_steps)))
    elif cli.part in ("encoder", "reuse4"):
        shard = tuple(int(x) for x in cli.shard.split("/")) if cli.shard else None
        table, base = (ENCODER_ROWS, ENCODER_BASE) if cli.part == "encoder" else (REUSE4_ROWS, REUSE4_BASE)
        rows = encoder_part(root / cli.part, shard, table, base)
        if rows is not None:
            write_atomic(part_file, json.dumps(rows))
    elif cli.part == "speed":
        write_atomic(part_file, json.dumps(speed_part(cli.docs, cli.rounds), indent=1))
    else:
        rows = {}
        for part in ("head", "full", "encoder", "reuse4"):
            if (RESULTS / f"moe_layers.{part}.json").is_file():
                rows.update(json.loads((RESULTS / f"moe_layers.{part}.json").read_text()))
        for path in sorted((RESULTS / "moe_layers_reuse_open").glob("*.json")):  # reuse_open.py, one per row
            entry = json.loads(path.read_text())
            if "row" in entry:
                rows[entry["name"]] = entry["row"]
            if entry.get("rival"):
                RIVALS[entry["name"]] = (entry["rival"], "reuse")
        speed_file = RESULTS / "moe_layers.speed.json"
        speed = json.loads(speed_file.read_text()) if speed_file.is_file() else None
        compare(rows)
        write_atomic(RESULTS / "moe_layers.json", json.dumps({"rows": rows, "speed": speed}, indent=1))
        write_atomic(RESULTS / "moe_layers.md", markdown(rows, speed))
        plot(rows, RESULTS / "moe_layers.png")


if __name__ == "__main__":
    main()
