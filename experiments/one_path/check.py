"""Same numbers before and after the one-path refactor (issue 20): the README's Python quick start, hit by hit.

    python experiments/one_path/check.py --record before   # on the commit before the refactor
    python experiments/one_path/check.py --record after    # on the refactored code; compares with "before"

Runs the README quick start (SB-MoE head on MiniLM, HNSW index of two documents, one query, then ``add``) in a
temporary folder with torch seeded, and stores every hit (id, score, expert) in
``experiments/results/one_path_check.json`` under the given key, with the commit; ``after`` also says whether each
hit equals its ``before`` counterpart (ids and experts exactly, scores within 1e-6).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

import sbmoe
from sbmoe.files import write_atomic

RESULT = Path(__file__).resolve().parents[1] / "results" / "one_path_check.json"
DOCS = [
    {"_id": "d1", "title": "Glioblastoma", "text": "Stem cells drive glioblastoma growth."},
    {"_id": "d2", "title": "Vitamin D", "text": "Vitamin D and bone density in older adults."},
]
QUERY = "what drives brain tumour growth"


def quick_start(folder: Path) -> dict[str, Any]:
    """The README's Python quick start; the hits of its query before and after ``add``."""
    torch.manual_seed(0)
    model = sbmoe.build_model("minilm", sbmoe.HeadConfig(num_experts=6))
    model.save(str(folder / "minilm-sbmoe"))
    retriever = sbmoe.Retriever.build(str(folder / "minilm-sbmoe"), DOCS, index="hnsw", cache_dir=folder / "cache")
    retriever.save(folder / "my_docs-moe")
    retriever = sbmoe.Retriever.load(folder / "my_docs-moe")
    hits = {"search": [_hit(h) for h in retriever.search(QUERY, k=2)[0]]}
    retriever.add([{"_id": "d3", "title": "Statins", "text": "Statins lower LDL cholesterol."}])
    hits["after_add"] = [_hit(h) for h in retriever.search(QUERY, k=3)[0]]
    return hits


def _hit(hit: Any) -> dict[str, Any]:
    return {"id": hit.id, "score": float(hit.score), "expert": hit.expert}


def same(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> bool:
    """Ids and experts equal, scores within 1e-6."""
    return len(before) == len(after) and all(
        b["id"] == a["id"] and b["expert"] == a["expert"] and abs(b["score"] - a["score"]) <= 1e-6
        for b, a in zip(before, after, strict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", choices=["before", "after"], required=True)
    key = parser.parse_args().record
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        hits = quick_start(Path(tmp))
    result = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    result[key] = {"commit": commit, "hits": hits}
    if key == "after" and "before" in result:
        result["identical"] = {part: same(result["before"]["hits"][part], hits[part]) for part in hits}
    write_atomic(RESULT, json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
