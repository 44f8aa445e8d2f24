"""Counts read from the code of a checkout, for issue 20's note: before and after, from the code itself.

    .venv/bin/python experiments/code_counts.py                      # this checkout
    .venv/bin/python experiments/code_counts.py /tmp/before --label before-16835fb

Writes (merging by label) experiments/results/code_counts.json with, per checkout: ``# fmt: skip`` markers (in the
whole tree and in ``sbmoe/``), Python files over 300 and 400 lines, index build paths (functions under ``sbmoe/``
that both construct a faiss index, or a ``DenseIndex``, and fill it from vectors), tail sites (functions outside
``sbmoe/heads/`` that call a head with a ``{"sentence_embedding": ...}`` dict), scorers (functions that compute
metrics from a run: they call ``metrics.per_query`` or ``evaluate_run``), configuration dataclasses
(``@dataclass`` classes under ``sbmoe/`` named ``*Config``, ``*Arguments``, ``*Settings`` or ``*Options``), and the
pair count of ``duplicates`` run on ``sbmoe/``. Files are those git tracks plus the untracked ones it does not
ignore. Nothing is timed: the counts are exact.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sbmoe.files import write_atomic  # noqa: E402

OUTPUT = REPO / "experiments" / "results" / "code_counts.json"
FMT_SKIP = "# fmt: skip"
SELF = "experiments/code_counts.py"
CONSTRUCTORS = re.compile(r"^(DenseIndex|Index\w+|index_factory|index_binary_factory|deserialize_index)$")
FILLERS = {"add", "add_with_ids", "build", "merge_ondisk"}
CONFIG_NAME = re.compile(r"(Config|Arguments|Settings|Options)$")
DUPLICATES_SECONDS = 120


def python_files(root: Path) -> list[Path]:
    """The ``.py`` files of the checkout at ``root`` (tracked, or untracked and not ignored)."""
    listed = subprocess.run(
        ["git", "-C", str(root), "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return sorted(root / name for name in listed if (root / name).is_file())


def called_names(node: ast.AST) -> set[str]:
    """The names called inside ``node``: ``f(...)`` gives ``f``, ``a.b.f(...)`` gives ``f``."""
    names = set()
    for call in ast.walk(node):
        if isinstance(call, ast.Call):
            func = call.func
            names.add(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""))
    return names


def library_nodes(root: Path, files: list[Path]) -> Iterator[tuple[str, ast.AST]]:
    """``(file, node)`` for every syntax node of the files under ``sbmoe/``."""
    for file in files:
        name = file.relative_to(root).as_posix()
        if name.startswith("sbmoe/"):
            for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
                yield name, node


def build_paths(root: Path, files: list[Path]) -> list[str]:
    """``file:function`` for each function under ``sbmoe/`` that constructs an index and fills it."""
    found = []
    for name, node in library_nodes(root, files):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            called = called_names(node)
            if any(CONSTRUCTORS.match(call) for call in called) and called & FILLERS:
                found.append(f"{name}:{node.name}")
    return found


def tail_sites(root: Path, files: list[Path]) -> list[str]:
    """``file:function`` for each function outside ``sbmoe/heads/`` that runs a head on pooled vectors by hand: it
    calls something with a dict literal keyed ``"sentence_embedding"`` (the tail's input features)."""
    found = []
    for name, node in library_nodes(root, files):
        if name.startswith("sbmoe/heads/") or not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for call in ast.walk(node):
            if isinstance(call, ast.Call) and any(
                isinstance(arg, ast.Dict)
                and any(isinstance(k, ast.Constant) and k.value == "sentence_embedding" for k in arg.keys)
                for arg in call.args
            ):
                found.append(f"{name}:{node.name}")
                break
    return found


def scorers(root: Path, files: list[Path]) -> list[str]:
    """``file:function`` for each function under ``sbmoe/`` that computes metrics from a run itself (calls the
    metrics module's ``per_query`` or ``evaluate_run``)."""
    found = []
    for name, node in library_nodes(root, files):
        if name == "sbmoe/evaluation/metrics.py" or not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if called_names(node) & {"per_query", "evaluate_run"}:
            found.append(f"{name}:{node.name}")
    return found


def config_dataclasses(root: Path, files: list[Path]) -> list[str]:
    """``file:Class`` for each configuration dataclass under ``sbmoe/``."""
    found = []
    for name, node in library_nodes(root, files):
        named = isinstance(node, ast.ClassDef) and CONFIG_NAME.search(node.name)
        if named and any("dataclass" in ast.unparse(decorator) for decorator in node.decorator_list):
            found.append(f"{name}:{node.name}")
    return found


def duplicate_pairs(root: Path) -> tuple[int, str]:
    """The pair count ``duplicates`` gives on ``root/sbmoe``, and its first line."""
    output = subprocess.run(
        ["duplicates", "--repo", str(root / "sbmoe"), "--seconds", str(DUPLICATES_SECONDS)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    first = output.splitlines()[0]
    match = re.match(r"(\d+) pairs?", first)
    return (int(match[1]) if match else 0), first


def counts(root: Path) -> dict[str, Any]:
    """Every count for the checkout at ``root``."""
    files = python_files(root)
    lines = {file.relative_to(root).as_posix(): len(file.read_text(encoding="utf-8").splitlines()) for file in files}
    counted = [file for file in files if file.relative_to(root).as_posix() != SELF]  # this file names the marker
    skips = {file.relative_to(root).as_posix(): file.read_text(encoding="utf-8").count(FMT_SKIP) for file in counted}
    paths, configs = build_paths(root, files), config_dataclasses(root, files)
    pairs, summary = duplicate_pairs(root)
    return {
        "commit": subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True
        ).stdout.strip(),
        "fmt_skip": sum(skips.values()),
        "fmt_skip_in_sbmoe": sum(n for name, n in skips.items() if name.startswith("sbmoe/")),
        "fmt_skip_files": {name: n for name, n in skips.items() if n},
        "files_over_300": sorted(name for name, n in lines.items() if n > 300),
        "files_over_400": sorted(name for name, n in lines.items() if n > 400),
        "sbmoe_files_over_300": sorted(name for name, n in lines.items() if n > 300 and name.startswith("sbmoe/")),
        "index_build_paths": paths,
        "tail_sites": tail_sites(root, files),
        "scorers": scorers(root, files),
        "config_dataclasses": configs,
        "duplicates_pairs": pairs,
        "duplicates_summary": summary,
    }


def main() -> None:
    """Count the checkout given (default: this one) and merge the result into the JSON under its label."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=str(REPO), help="the checkout to count (default: this one)")
    parser.add_argument("--label", help="the key in the JSON (default: the checkout's short commit)")
    args = parser.parse_args()
    result = counts(Path(args.root).resolve())
    label = args.label or result["commit"]
    previous = json.loads(OUTPUT.read_text(encoding="utf-8")) if OUTPUT.is_file() else {}
    write_atomic(OUTPUT, json.dumps({**previous, label: result}, indent=1) + "\n")
    summary = {key: len(value) if isinstance(value, list) else value for key, value in result.items()}
    print(label, {key: value for key, value in summary.items() if not isinstance(value, dict)})


if __name__ == "__main__":
    main()
