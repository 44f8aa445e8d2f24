"""The README's code blocks run as written (quick start with the real offline MiniLM), so they never rot."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from sbmoe.commands import evaluate, finetune

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.DOTALL)


def commands(block: str) -> list[str]:
    """The block's commands, continuation lines joined."""
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory: pytest.TempPathFactory, session_cache: Path) -> tuple[Path, str]:
    """The quick start's shell block, run by bash in an empty folder with the package's ``sbmoe`` on PATH."""
    folder = tmp_path_factory.mktemp("readme")
    block = next(b for b in blocks("bash") if "sbmoe index" in b)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "SBMOE_CACHE": str(session_cache)}  # fmt: skip
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=folder, env=env, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return folder, done.stdout


def test_quick_start_indexes_and_searches_a_folder_of_texts(quick_start: tuple[Path, str]) -> None:
    folder, out = quick_start
    assert (folder / "indexes" / "my_docs" / "docs.sqlite").is_file()
    assert "indexed 2 documents (flat)" in out
    assert '"id": "d1"' in out and out.index('"id": "d1"') < out.index('"id": "d2"')  # the tumour query finds d1
    assert "Stem cells drive glioblastoma growth." in out


def test_python_quick_start_runs(quick_start: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    folder, _ = quick_start
    monkeypatch.chdir(folder)
    code = blocks("python")[0]
    exec(compile(code, str(README), "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[0].split()[1] == "d1" and "expert" in printed[0]
    import sbmoe

    assert len(sbmoe.Retriever.load("indexes/my_docs-moe")) == 2  # the add() after save stays in memory


def test_every_evaluate_and_finetune_example_parses() -> None:
    checked = 0
    for block in blocks("bash"):
        for command in commands(block):
            words = shlex.split(command)
            if words[:2] == ["sbmoe", "evaluate"]:
                evaluate.parse_args(words[2:])
            elif words[:2] == ["sbmoe", "finetune"]:
                finetune.parse_args(words[2:])
            else:
                continue
            checked += 1
    assert checked == 5


def test_moe_layers_example_builds_what_it_says() -> None:
    (code,) = [block for block in blocks("python") if "moe_layers" in block]
    names: dict = {}
    exec(compile("import sbmoe\n" + code, str(README), "exec"), names)
    model = names["model"]
    plans = model.expert_plan(["a question"])  # the last example: every MiniLM layer upcycled, pre-gated
    assert [plan["decided_by"] for plan in plans] == [0, 0, 1, 2, 3, 4]
    assert all(len(plan["batches"]) == 1 and plan["batches"][0] for plan in plans)
