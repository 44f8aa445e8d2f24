"""Write a BEIR folder of Python standard-library module docstrings (a corpus nobody on the project wrote) with the
25 questions in questions.tsv (written before any search) as queries and their expected modules as qrels.

Usage: python experiments/newcomer/build_corpus.py [OUT]   (default experiments/newcomer/stdlib)
"""

from __future__ import annotations

import ast
import importlib
import json
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).parent
MIN_CHARS, MAX_CHARS = 30, 2000  # docstrings shorter than this say too little; longer ones are cut


def module_docstrings() -> dict[str, str]:
    """Top-level public stdlib modules -> their docstring: read with ast from the source (module files and
    packages' __init__), or imported for compiled modules (math, zlib, ...), which run no code on import."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = {}
    for name in sorted(sys.stdlib_module_names):
        path = root / f"{name}.py" if (root / f"{name}.py").is_file() else root / name / "__init__.py"
        if name.startswith("_") or name in ("this", "antigravity"):
            continue
        if path.is_file():
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8", errors="replace")))
        else:
            try:
                doc = importlib.import_module(name).__doc__
            except ImportError:
                continue
        if doc and len(doc.strip()) >= MIN_CHARS:
            docs[name] = doc[:MAX_CHARS]
    return docs


def main(out: Path) -> None:
    docs = module_docstrings()
    rows = [line.split("\t") for line in (HERE / "questions.tsv").read_text().splitlines()[1:]]
    missing = sorted({m for _, _, modules in rows for m in modules.split(",")} - set(docs))
    if missing:
        raise SystemExit(f"expected modules not in the corpus: {', '.join(missing)}")
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    with (out / "corpus.jsonl").open("w") as f:
        f.writelines(json.dumps({"_id": name, "title": name, "text": doc}) + "\n" for name, doc in docs.items())
    with (out / "queries.jsonl").open("w") as f:
        f.writelines(json.dumps({"_id": qid, "text": text}) + "\n" for qid, text, _ in rows)
    qrels = [f"{qid}\t{m}\t1" for qid, _, modules in rows for m in modules.split(",")]
    (out / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(qrels) + "\n")
    print(f"{len(docs)} modules, {len(rows)} questions, {len(qrels)} qrels in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "stdlib")
