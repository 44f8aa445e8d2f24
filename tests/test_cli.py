"""The ``sbmoe`` command end to end on 300 SciFact documents with MiniLM: index, then search in new processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_beir_slice

from sbmoe.cli import COMMANDS
from sbmoe.cli import main as cli_main
from sbmoe.commands.evaluate import main as evaluate_main

SLICE_QUERIES, SLICE_DOCS = 40, 300


def sbmoe(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``sbmoe ARGS`` in a new process (``python -m sbmoe.cli``: the console script's own entry point)."""
    return subprocess.run([sys.executable, "-m", "sbmoe.cli", *args], env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def indexed(shared_data: Path, tmp_path_factory: pytest.TempPathFactory, session_cache: Path) -> dict:
    """A 300-document SciFact slice indexed by ``sbmoe index`` with MiniLM in its own process."""
    root = tmp_path_factory.mktemp("cli")
    data = write_beir_slice(root / "scifact300", shared_data, SLICE_QUERIES, SLICE_DOCS)
    env = {**os.environ, "SBMOE_CACHE": str(session_cache), "HF_HUB_OFFLINE": "1"}
    done = sbmoe(
        "index", "--model", "minilm", "--corpus", str(data), "--output", str(root / "idx"), "--quiet", env=env
    )
    assert done.returncode == 0, done.stderr
    assert f"indexed {SLICE_DOCS} documents (flat)" in done.stdout
    return {"root": root, "data": data, "index": root / "idx", "env": env}


def test_a_documents_title_finds_it_first_with_text_from_the_store(indexed: dict) -> None:
    docs = [json.loads(line) for line in (indexed["data"] / "corpus.jsonl").read_text().splitlines()]
    target = docs[123]
    (indexed["data"] / "corpus.jsonl").rename(indexed["data"] / "moved.jsonl")  # search must not need the corpus
    try:
        done = sbmoe("search", str(indexed["index"]), target["title"], "-k", "3", "--json", env=indexed["env"])
    finally:
        (indexed["data"] / "moved.jsonl").rename(indexed["data"] / "corpus.jsonl")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    first = result["hits"][0]
    assert (first["id"], first["title"], first["text"]) == (target["_id"], target["title"], target["text"])
    assert len(result["hits"]) == 3 and result["expert"] is None and first["expert"] is None
    assert result["hits"][0]["score"] >= result["hits"][1]["score"] >= result["hits"][2]["score"]


def test_batch_run_file_scores_like_evaluate(indexed: dict, tmp_path: Path, session_cache: Path) -> None:
    run_file = tmp_path / "run.trec"
    queries = indexed["data"] / "queries.jsonl"
    done = sbmoe(
        "search",
        str(indexed["index"]),
        "--queries",
        str(queries),
        "-k",
        "1000",
        "--output",
        str(run_file),
        env=indexed["env"],
    )
    assert done.returncode == 0, done.stderr
    lines = run_file.read_text().splitlines()
    assert len(lines) == SLICE_QUERIES * SLICE_DOCS and lines[0].split()[1::2] == ["Q0", "1", "sbmoe"]
    data = str(indexed["data"])
    assert evaluate_main(["--run", str(run_file), "--datasets", data, "--output", str(tmp_path / "a.json")]) == 0
    assert (
        evaluate_main(
            [
                "--model",
                "minilm",
                "--datasets",
                data,
                "--output",
                str(tmp_path / "b.json"),
                "--cache-dir",
                str(session_cache),
                "--quiet",
            ]
        )
        == 0
    )
    from_run, from_model = (json.loads((tmp_path / n).read_text())["results"][0] for n in ("a.json", "b.json"))
    assert from_model["corpus_from_cache"]  # `sbmoe index` encoded this corpus already
    assert from_run["num_queries"] == from_model["num_queries"] == SLICE_QUERIES
    assert from_run["metrics"] == pytest.approx(from_model["metrics"], abs=1e-9)
    assert set(from_run) <= set(from_model) and from_run["per_query"].keys() == from_model["per_query"].keys()
    assert from_model["metrics"]["nDCG@10"] > 0.5


def test_regrown_corpus_adds_only_new_ids(indexed: dict, tmp_path: Path) -> None:
    docs = [json.loads(line) for line in (indexed["data"] / "corpus.jsonl").read_text().splitlines()]
    grown = tmp_path / "grown.jsonl"
    extra = [{"_id": "new-1", "title": "", "text": "glioblastoma stem cells resist radiation"}]
    grown.write_text("".join(json.dumps(d) + "\n" for d in [*docs, *extra]))
    done = sbmoe(
        "index", "--model", "minilm", "--corpus", str(grown), "--output", str(indexed["index"]), env=indexed["env"]
    )
    assert done.returncode == 0, done.stderr
    assert f"added 1, updated 0, removed 0 documents: {SLICE_DOCS + 1} indexed, {SLICE_DOCS} before" in done.stdout
    assert "encode corpus: 100%|██████████| 1/1" in done.stderr  # only the new document was encoded
    done = sbmoe(
        "search", str(indexed["index"]), "glioblastoma stem cells resist radiation", "--json", env=indexed["env"]
    )
    assert json.loads(done.stdout)["hits"][0]["id"] == "new-1"


def test_help_of_every_command_ends_with_examples(capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["--help"]) == 0
    assert "examples:" in capsys.readouterr().out
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            cli_main([name, "--help"])
        out = capsys.readouterr().out
        assert exit_info.value.code == 0 and f"usage: sbmoe {name}" in out
        examples = out.rsplit("examples:", 1)[1].strip().splitlines()
        assert 2 <= len(examples) <= 3 and all(line.strip().startswith("sbmoe") for line in examples), name
    assert cli_main(["serve"]) == 2 and "unknown command 'serve'" in capsys.readouterr().err
