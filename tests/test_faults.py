"""Reliability under faults: kill -9 at random points, concurrent cache writers, a read-only data folder."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import stat
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import write_beir_slice

from sbmoe.cli import main as cli_main
from sbmoe.commands.index import main as index_main
from sbmoe.files import atomic_dir, last_complete_checkpoint, replace_dir, scratch_name
from sbmoe.model import build_model
from sbmoe.retrieval.cache import cached_embeddings
from sbmoe.retrieval.retriever import Retriever

RUNNER = Path(__file__).with_name("fault_runner.py")
WRITER = Path(__file__).with_name("cache_writer.py")
KILLS = 20
TEXTS = ["the cell protein", "a gene study", "blood risk increase", "dense vector search index", "virus dna"]


def run_scenario(spec: dict, work: Path) -> dict:
    """Run ``fault_runner.py`` on ``spec`` in its own process (it forks one child per run); its report."""
    spec = {**spec, "work": str(work / "runner"), "kills": KILLS}
    (work / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(RUNNER), str(work / "spec.json"), str(work / "report.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((work / "report.json").read_text())


@pytest.fixture(scope="module")
def slices(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SciFact slices: ``old`` (5 queries, 30 docs) and ``new`` (8 queries, 50 docs), both folders named ``slice``;
    ``train`` (20 queries, 80 docs)."""
    root = tmp_path_factory.mktemp("slices")
    return {
        "old": write_beir_slice(root / "old" / "slice", shared_data, 5, 30),
        "new": write_beir_slice(root / "new" / "slice", shared_data, 8, 50),
        "train": write_beir_slice(root / "train" / "slice", shared_data, 20, 80),
    }


@pytest.mark.slow
@pytest.mark.parametrize("command", ["index", "evaluate"])
def test_a_killed_index_write_leaves_the_old_or_the_new_index(
    command: str, tiny_bert: str, slices: dict[str, Path], tmp_path: Path
) -> None:
    cache, target = tmp_path / "cache", tmp_path / "out" / "idx"
    common = ["--model", tiny_bert, "--cache-dir", str(cache), "--quiet"]
    if command == "index":
        argv = {v: ["index", *common, "--corpus", str(slices[v]), "--output", str(target)] for v in ("old", "new")}
    else:
        argv = {
            v: [
                "evaluate",
                *common,
                "--datasets",
                str(slices[v]),
                "--save-index",
                str(target),
                "--top-k",
                "10",
                "--output",
                str(tmp_path / f"{v}.json"),
            ]
            for v in ("old", "new")
        }
    spec = {"scenario": command, "seed": 7, "cache": str(cache), "output": str(target), **argv}
    report = run_scenario({**spec, "inside": "slice" if command == "evaluate" else ""}, tmp_path)
    outcomes = Counter(run["outcome"] for run in report["runs"])
    assert set(outcomes) <= {"killed: old", "killed: new", "finished: new"}, report["runs"]
    assert outcomes["killed: old"] + outcomes["killed: new"] == KILLS
    assert outcomes["killed: old"] >= 5 and outcomes["killed: new"] >= 1  # kills before and after the swap
    assert report["final"] == {"code": 0, "equal": True}
    assert report["leftovers"] == []  # the reruns removed what the killed writers left


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["head", "full"])
def test_a_killed_finetune_resumes_to_the_uninterrupted_weights(
    mode: str, tiny_bert: str, slices: dict[str, Path], tmp_path: Path
) -> None:
    argv = [
        "finetune",
        "--backbone",
        tiny_bert,
        "--train-data",
        f"{slices['train']}:test",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--num-experts",
        "3",
        "--hard-negatives",
        "2",
        "--batch-size",
        "4",
        "--max-seq-length",
        "32",
        "--learning-rate",
        "1e-2",
        "--train",
        mode,
    ]
    argv += ["--epochs", "12", "--dev-queries", "4"] if mode == "head" else ["--max-steps", "4", "--save-steps", "1"]
    spec = {"scenario": "finetune", "mode": mode, "seed": 11, "output": str(tmp_path / "out"), "argv": argv}
    report = run_scenario(spec, tmp_path)
    runs = report["runs"]
    assert [run["outcome"] for run in runs if run["outcome"] != "finished"] == ["killed"] * KILLS, runs[-1]
    # one torch thread in every run: resumed weights equal the uninterrupted run's bit for bit, in both modes
    assert [run["max_abs_diff"] for run in runs if run["outcome"] == "finished"] == [0.0] * (len(runs) - KILLS)
    assert report["final"] == {"code": 0, "max_abs_diff": 0.0}
    assert report["leftovers"] == []
    if mode == "head":  # every killed run left a checkpoint that loads (or none yet), some from mid-training
        epochs = [run["checkpoint_epoch"] for run in runs if run["outcome"] == "killed"]
        assert all(epoch is None or 1 <= epoch <= 12 for epoch in epochs)
        assert any(epoch is not None and epoch < 12 for epoch in epochs)


def of_a_dead_process(label: str) -> str:
    """A :func:`scratch_name` of ``label`` whose process has exited."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return scratch_name(label).replace(f"-{os.getpid()}-", f"-{int(done.stdout)}-")


def test_replace_dir_swaps_in_one_step_and_cleans_only_dead_writers(tmp_path: Path) -> None:
    final = tmp_path / "idx"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("old")
    dead_temp = tmp_path / of_a_dead_process(".idx.tmp")
    live_temp = tmp_path / scratch_name(".idx.tmp")  # this process's: alive, so never touched
    dead_temp.mkdir()
    live_temp.mkdir()
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (final / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["idx", live_temp.name])


def test_a_kill_between_the_fallback_renames_is_undone_by_the_next_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sbmoe.files as files

    final = tmp_path / "idx"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("old")
    monkeypatch.setattr(files, "exchange", lambda a, b: False)  # a file system without renameat2's swap
    old = tmp_path / of_a_dead_process(".idx.old")
    os.rename(final, old)  # what a writer killed after its first rename leaves
    files.recover_dir(final)
    assert (final / "a.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    new = tmp_path / "new"
    new.mkdir()
    (new / "a.txt").write_text("new")
    replace_dir(new, final)
    assert (final / "a.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_last_complete_checkpoint_skips_a_half_written_one(tmp_path: Path) -> None:
    for step, state in ((2, "{}"), (4, "{}"), (6, '{"global_st'), (8, None)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert last_complete_checkpoint(tmp_path / "none") is None


def test_a_built_retrievers_temporary_store_goes_with_it(tiny_bert: str, slices: dict[str, Path]) -> None:
    retriever = Retriever.build(tiny_bert, str(slices["old"]), show_progress=False)
    folder = retriever.store.path.parent
    assert folder.name.startswith("sbmoe-store-") and len(retriever.store) == 30
    del retriever
    gc.collect()
    assert not folder.exists()


def test_index_command_refuses_to_replace_a_folder_that_is_not_an_index(
    tiny_bert: str, slices: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    argv = ["--model", tiny_bert, "--corpus", str(slices["old"]), "--output", str(tmp_path / "notes"), "--quiet"]
    assert index_main(argv) == 1 and index_main([*argv, "--rebuild"]) == 1
    assert "is not an index folder (no retriever.json)" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["todo.txt"]
    (tmp_path / "empty").mkdir()
    assert index_main([*argv[:-2], str(tmp_path / "empty"), "--quiet"]) == 0
    assert len(Retriever.load(tmp_path / "empty")) == 30


def test_two_processes_writing_one_cache_entry_both_get_it(tiny_bert: str, tmp_path: Path) -> None:
    model = build_model(tiny_bert, max_seq_length=64)
    fresh, _ = cached_embeddings(model, TEXTS, "queries", tmp_path / "fresh", show_progress=False)
    absent, damaged = tmp_path / "absent", tmp_path / "damaged"
    cached_embeddings(model, TEXTS, "queries", damaged, show_progress=False)
    (entry,) = [p for p in damaged.iterdir() if p.name != "texts"]
    (entry / "embeddings.npy").write_bytes((entry / "embeddings.npy").read_bytes()[:100])
    done = subprocess.run(
        [sys.executable, str(WRITER), tiny_bert, str(tmp_path), str(absent), str(damaged)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("another process wrote this entry meanwhile; keeping it") == 2  # one per race
    for i, cache in enumerate((absent, damaged)):
        results = [np.load(tmp_path / f"{i}-{w}.npy") for w in range(2)]
        metas = [json.loads((tmp_path / f"{i}-{w}.json").read_text()) for w in range(2)]
        assert [meta["cached"] for meta in metas] == [False, False]  # both encoded: a real race
        assert np.array_equal(results[0], results[1]) and np.array_equal(results[0], fresh)
        (entry,) = [p for p in cache.iterdir() if p.name != "texts"]  # one entry, no temporary folder left
        assert not entry.name.startswith(".") and cached_embeddings(model, TEXTS, "queries", cache)[1]["cached"]
        inode = (entry / "embeddings.npy").stat().st_ino  # the first entry put in place was never replaced
        assert [meta["inode"] for meta in metas] == [inode, inode]


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder`` (itself included): kind, size, SHA-256 and modification time."""
    entries = {}
    for path in [folder, *sorted(folder.rglob("*"))]:
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        entries[str(path.relative_to(folder))] = (stat.S_IFMT(info.st_mode), info.st_size, digest, info.st_mtime_ns)
    return entries


@pytest.fixture
def read_only_data(shared_data: Path, tmp_path: Path) -> Iterator[Path]:
    """A data folder holding a SciFact slice ``mini``, made read-only (write bits removed) for the test."""
    data = tmp_path / "data"
    write_beir_slice(data / "mini", shared_data, 5, 40)
    paths = [data, *data.rglob("*")]
    modes = {path: path.stat().st_mode for path in paths}
    for path in paths:
        path.chmod(modes[path] & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    yield data
    for path in reversed(paths):
        path.chmod(modes[path])


def test_nothing_is_written_under_the_data_folder(
    tiny_bert: str, read_only_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    before = snapshot(read_only_data)
    monkeypatch.setenv("SBMOE_DATA", str(read_only_data))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # default outputs (runs/...) go here
    index = str(tmp_path / "idx")
    assert cli_main(["index", "--model", tiny_bert, "--corpus", "mini", "--output", index, "--quiet"]) == 0
    assert (
        cli_main(
            [
                "evaluate",
                "--model",
                tiny_bert,
                "--datasets",
                "mini",
                "--data-dir",
                str(read_only_data),
                "--save-index",
                str(tmp_path / "saved"),
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert cli_main(["search", index, "cell protein", "-k", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["hits"]) == 3
    assert (tmp_path / "saved" / "mini" / "manifest.json").is_file()
    assert snapshot(read_only_data) == before
