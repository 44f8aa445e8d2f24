"""Reuse that starts at no reuse (a per-layer scale at 0 opens the foreign experts): MiniLM-L6 rows, row by row.

    python experiments/moe_layers/reuse_open.py --part init              # the model at initialisation
    python experiments/moe_layers/reuse_open.py --part train [--row NAME] [--seeds 0,1,2]

``init``: with the group open (eval mode), document embeddings of each reuse model against the same layers without
reuse: cosine, top-10 overlap of the 300 SciFact test queries over 200 documents, own-expert share per layer
(``experiments/results/moe_layers_reuse_open/init.json``). ``train``: the rows below with the fixed recipe of the
training-fixes study (``experiments/training_fixes/study.py``: qrel-aware loss, backbone-mined negatives, equal
source weights, dev selection every 26 of 52 steps, backbone rate 2e-5) on both domains, layers below the MoE
layers frozen and cached. Every finished run is distilled to ``reuse_rows/<row>/seed<s>.json`` (committed, and never
run again), and each row writes ``experiments/results/moe_layers_reuse_open/<row>.json`` with the seeds done so
far (the reuse scale and own-expert share per layer at the end of training), which ``study.py --part report``
merges.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import re
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sbmoe.data import load_dataset
from sbmoe.files import write_atomic
from sbmoe.heads import MoELayersConfig
from sbmoe.model import build_model

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("moe_layers_study", HERE / "study.py")
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)
_spec = importlib.util.spec_from_file_location("training_fixes_study", HERE.parent / "training_fixes" / "study.py")
training_fixes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(training_fixes)
RUNS = HERE / "reuse_rows"
ROW_RESULTS = study.RESULTS / "moe_layers_reuse_open"
TWO, FOUR = study.UP_TOP, study.UP_FOUR
FIXED = {  # the training-fixes study's full row on both domains, with the MoE-layers study's eval collections
    **training_fixes.FULL_ROWS["L6 full fine-tuning (layers 4-5) [both]"],
    "backbone_learning_rate": training_fixes.FULL_GRID[0],
    "eval_data": ",".join(study.ENCODER_EVAL),
    "token_cache_dir": "out/moe_layers/token_states",
}
LAYERS_4_5 = {**FIXED, "frozen_layers": 4}
LAYERS_2_5 = {**FIXED, "frozen_layers": 2}
ROWS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {  # row -> (base arguments, row options)
    "L6 upcycled layers 4-5 (E=8, k=2), identity-start code": (LAYERS_4_5, TWO),
    "L6 layers 4-5, r=2, identity start": (LAYERS_4_5, {**TWO, "reuse_group": 2}),
    "L6 layers 4-5, r=2, identity start, PSR": (LAYERS_4_5, {**TWO, "reuse_group": 2, "psr": "linear"}),
    "L6 upcycled layers 2-5 (E=8, k=2), identity-start code": (LAYERS_2_5, FOUR),
    "L6 layers 2-5, r=4, identity start": (LAYERS_2_5, {**FOUR, "reuse_group": 4}),
    "L6 layers 2-5, r=4, identity start, PSR": (LAYERS_2_5, {**FOUR, "reuse_group": 4, "psr": "linear"}),
}
RIVALS = {name: (next(iter(ROWS)) if "4-5" in name else list(ROWS)[3], "reuse") for name in ROWS if "r=" in name}


def slug(name: str) -> str:
    """A file name for a row."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_seed(name: str, seed: int, root: Path) -> dict[str, Any]:
    """One run of a row, distilled to ``reuse_rows/<row>/seed<s>.json`` (read back when present)."""
    file = RUNS / slug(name) / f"seed{seed}.json"
    if file.is_file():
        return json.loads(file.read_text())
    base, options = ROWS[name]
    record = study.run_once({**base, **options, "seed": seed}, root / slug(name) / f"seed{seed}")
    kept = ("arguments", "seconds", "dev_nDCG@10", "kept_zero_shot", "parameters", "moe_utilization")
    distilled = {key: record.get(key) for key in kept}
    distilled["kept"] = record["history"].get("kept")
    for part in ("eval", "zero_shot"):
        distilled[part] = {
            spec: {
                "metrics": {"nDCG@10": r["metrics"]["nDCG@10"]},
                "per_query": {"nDCG@10": r["per_query"]["nDCG@10"]},
            }
            for spec, r in record[part].items()
        }
    write_atomic(file, json.dumps(distilled, indent=1))
    return distilled


def train_rows(root: Path, names: list[str], seeds: list[int]) -> None:
    """Run ``seeds`` of each row in ``names`` (finished runs are reused); after each run, rewrite its row's JSON
    with every seed finished so far."""
    for name in names:
        records = []
        for seed in seeds:
            records.append(run_seed(name, seed, root))
            row = study.row_summary(records, ROWS[name][0]["eval_data"].split(","))
            row["seeds"] = seeds[: len(records)]
            row["reuse_scale"] = [[u.get("reuse_scale") for u in r.get("moe_utilization") or []] for r in records]
            row["kept"] = [r["kept"] for r in records]
            rival = RIVALS.get(name, (None,))[0]
            write_atomic(ROW_RESULTS / f"{slug(name)}.json", json.dumps({"name": name, "rival": rival, "row": row}))
            logging.getLogger("reuse_open").info("%s: %s", name, {k: v["mean"] for k, v in row["eval"].items()})


def init_part(docs: int = 200) -> dict[str, Any]:
    """Each reuse setting at initialisation (group open) against the same layers without reuse."""
    dataset = load_dataset("scifact", split="test")
    texts = [doc.full_text for doc in islice(dataset.iter_docs(), docs)]
    queries = list(dataset.queries.values())
    out = {}
    for layers, group in (("4,5", 2), ("2,3,4,5", 4)):
        encoded = {}
        for r in (1, group):
            torch.manual_seed(0)
            model = build_model(
                moe=MoELayersConfig(moe_layers=layers, num_experts=8, top_k=2, reuse_group=r), max_seq_length=128
            )
            model.eval()
            with model[0].recorder() as recorder:
                d = model.encode(texts, batch_size=32, convert_to_tensor=True, normalize_embeddings=True)
                q = model.encode(queries, batch_size=64, convert_to_tensor=True, normalize_embeddings=True)
            encoded[r] = (d, (q @ d.T).topk(10).indices, model[0].expert_utilization(recorder))
        (d1, top1, _), (dr, topr, usage) = encoded[1], encoded[group]
        overlap = [len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(top1, topr, strict=True)]
        out[f"layers {layers}, r={group}"] = {
            "min_doc_cosine": F.cosine_similarity(d1, dr).min().item(),
            "mean_doc_cosine": F.cosine_similarity(d1, dr).mean().item(),
            "top10_overlap": sum(overlap) / len(overlap),
            "own_share": {u["layer"]: u["own_share"] for u in usage},
            "reuse_scale": {u["layer"]: u["reuse_scale"] for u in usage},
        }
    return {"docs": docs, "queries": len(queries), "settings": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["init", "train"], required=True)
    parser.add_argument("--row", choices=list(ROWS), action="append", help="train these rows (default: all)")
    parser.add_argument("--seeds", default="0,1,2", help="train part: comma-separated seeds")
    parser.add_argument("--out", default="out/moe_layers/reuse-open", help="folder of the individual runs")
    cli = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("reuse_open").setLevel(logging.INFO)
    ROW_RESULTS.mkdir(parents=True, exist_ok=True)
    if cli.part == "init":
        result = init_part()
        write_atomic(ROW_RESULTS / "init.json", json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
    else:
        train_rows(Path(cli.out), cli.row or list(ROWS), [int(s) for s in cli.seeds.split(",")])


if __name__ == "__main__":
    main()
