"""The README's examples run as written (real offline MiniLM), twice in a row and in another order, so they never rot
and never depend on what ran before them; its evaluate, finetune and quantize examples parse."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sbmoe.commands import evaluate, finetune, quantize

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.DOTALL)


def block(language: str, marker: str) -> str:
    (found,) = [b for b in blocks(language) if marker in b]
    return found


def commands(text: str) -> list[str]:
    """The block's commands, continuation lines joined."""
    return [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip()]


def run_shell(folder: Path, cache: Path) -> str:
    """The quick start's shell block, run by bash in ``folder`` with the package's ``sbmoe`` on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["SBMOE_CACHE"] = str(cache)
    script = block("bash", "sbmoe index")
    argv = ["bash", "-euo", "pipefail", "-c", script]
    done = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert re.search(r"indexed 2 documents \(flat\)|up to date: all 2 documents indexed as they are", done.stdout)
    assert '"id": "d1"' in done.stdout and done.stdout.index('"id": "d1"') < done.stdout.index('"id": "d2"')
    assert "Stem cells drive glioblastoma growth." in done.stdout  # the tumour query finds d1 first
    return done.stdout


def run_python(marker: str, monkeypatch: pytest.MonkeyPatch, folder: Path) -> dict:
    monkeypatch.chdir(folder)
    names: dict = {}
    exec(compile(block("python", marker), str(README), "exec"), names)
    return names


def check_retriever(names: dict, printed: list[str]) -> None:
    import sbmoe

    assert len(printed) == 2 and printed[0].split()[1] == "d1" and "expert" in printed[0]
    assert len(sbmoe.Retriever.load("indexes/my_docs-moe")) == 3  # the add() was saved


def check_routes(names: dict) -> None:
    plain = names["stock"].encode(["Stem cells drive glioblastoma growth."])  # the document route, as documented
    np.testing.assert_allclose(plain, names["doc_vectors"], atol=1e-6)
    assert names["query_vectors"].shape == (1, 384)


@pytest.mark.parametrize("order", [("shell", "python", "routes") * 2, ("routes", "python", "shell")])
def test_readme_examples_run_in_any_order_and_twice(
    order: tuple[str, ...], tmp_path: Path, session_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    for example in order:
        if example == "shell":
            run_shell(tmp_path, session_cache)
        elif example == "python":
            capsys.readouterr()
            names = run_python("Retriever.build", monkeypatch, tmp_path)
            check_retriever(names, capsys.readouterr().out.splitlines())
        else:
            check_routes(run_python("trust_remote_code", monkeypatch, tmp_path))


def test_every_evaluate_finetune_and_quantize_example_parses() -> None:
    checked = []
    for text in blocks("bash"):
        for command in commands(text):
            words = shlex.split(command)
            if words[:2] == ["sbmoe", "evaluate"]:
                evaluate.parse_args(words[2:])
            elif words[:2] == ["sbmoe", "finetune"]:
                finetune.parse_args(words[2:])
            elif words[:2] == ["sbmoe", "quantize"]:
                quantize.build_parser().parse_flags(words[2:])
            else:
                continue
            checked.append(words[1])
    assert checked.count("evaluate") == 2 and checked.count("finetune") == 3 and checked.count("quantize") == 2


def test_moe_layers_example_builds_what_it_says() -> None:
    code = block("python", "moe=sbmoe.MoELayersConfig")
    names: dict = {}
    exec(compile("import sbmoe\n" + code, str(README), "exec"), names)
    model = names["model"]
    plans = model.expert_plan(["a question"])  # the last example: every MiniLM layer upcycled, pre-gated
    assert [plan["decided_by"] for plan in plans] == [0, 0, 1, 2, 3, 4]
    assert all(len(plan["batches"]) == 1 and plan["batches"][0] for plan in plans)


def test_readme_stays_short_and_starts_with_make_demo_and_make_test() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    assert commands(blocks("bash")[0])[:2] == [
        "make demo    # sets up .venv, fine-tunes two heads on SciFact, indexes, searches, prints an honest table",
        "make test    # sets up .venv, then runs ruff and the test suite",
    ]
    for section in ("cranfield", "irds:cranfield"):
        assert section in text
    assert "0.3817" in text and "0.3536" in text
