"""Fault injection: ``kill -9`` an sbmoe command at its k-th file-system event, check what it left, run it again.

``python tests/fault_runner.py SPEC.json REPORT.json`` imports sbmoe once, then forks a child per run (no import
cost per run). A child counts file-system events (each call of ``os.replace``, ``os.rename``, ``os.mkdir``,
``shutil.rmtree``, ``open`` for writing, ``np.save``, ``faiss.write_index``, ``torch.save``, safetensors'
``save_file``, ... counts once before and once after) and sends itself SIGKILL at event k. The parent first
counts the events of a clean run, then draws each k from ``random.Random(seed)`` over that range.

Scenarios (``spec["scenario"]``):

* ``index``: ``sbmoe index`` grows an index of corpus A into one of corpus B.
* ``evaluate``: ``sbmoe evaluate --save-index`` replaces the index of dataset A with that of dataset B.
* ``finetune``: ``sbmoe finetune`` (head or full mode), every run with ``--resume``.

For the index scenarios each run starts from what the previous one left (the old index, or the new one, which is
then put back to the old); after a kill the folder must load as the old index or the new one, or not at all.
For finetune, each run resumes what the killed one left; a run that finishes must give the weights of an
uninterrupted run. The report lists every run's kill point and outcome.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import random
import shutil
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from safetensors.numpy import load_file

import sbmoe.cli
import sbmoe.commands.evaluate
import sbmoe.commands.finetune
import sbmoe.commands.index
import sbmoe.training.runner
from sbmoe.errors import IndexLoadError
from sbmoe.retrieval.index import DenseIndex
from sbmoe.retrieval.retriever import Retriever

EVENTS = {
    "os": ("replace", "rename", "mkdir", "makedirs", "remove", "unlink", "rmdir"),
    "shutil": ("rmtree", "copyfile", "copy2", "move"),
    "numpy": ("save",),
    "numpy.lib.format": ("open_memmap",),
    "faiss": ("write_index", "write_index_binary"),
    "torch": ("save",),
    "safetensors.torch": ("save_file",),
    "sqlite3": ("connect",),
}
WRITE_MODES = set("wax+")
QUERIES = ["cell protein gene", "blood risk of disease", "virus dna rna"]


class Events:
    """Counts file-system events; at event ``kill_at`` the process sends itself SIGKILL."""

    def __init__(self, kill_at: int | None):
        self.count, self.kill_at = 0, kill_at

    def tick(self) -> None:
        self.count += 1
        if self.count == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(self, function: Callable) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.tick()
            try:
                return function(*args, **kwargs)
            finally:
                self.tick()

        return counted

    def open_for(self, function: Callable) -> Callable:
        def counted_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if not WRITE_MODES & set(mode):
                return function(file, mode, *args, **kwargs)
            self.tick()
            try:
                return function(file, mode, *args, **kwargs)
            finally:
                self.tick()

        return counted_open


def install(events: Events) -> None:
    """Replace every reference to the event functions, in every loaded module, by a counting wrapper."""
    counted_open = events.open_for(io.open)
    wrapped: dict[int, tuple[Callable, Callable]] = {id(io.open): (io.open, counted_open)}
    for module_name, names in EVENTS.items():
        module = sys.modules.get(module_name)
        for name in names:
            function = getattr(module, name, None)
            if function is not None:
                wrapped[id(function)] = (function, events.wrap(function))
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            pair = wrapped.get(id(value))
            if pair is not None and value is pair[0]:
                namespace[name] = pair[1]
    builtins.open = counted_open


def in_child(function: Callable, *args: Any, log: Path) -> tuple[str, Any]:
    """Run ``function(*args)`` in a forked child: ``("ok", result)``, ``("error", traceback)`` or ``("killed",)``."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read)
        with log.open("a") as handle:
            os.dup2(handle.fileno(), 1)
            os.dup2(handle.fileno(), 2)
        try:
            torch.set_num_threads(1)
            faiss.omp_set_num_threads(1)
            outcome: tuple[str, Any] = ("ok", function(*args))
        except BaseException:  # noqa: B036 - everything goes back to the parent, SystemExit included
            outcome = ("error", traceback.format_exc())
        sys.stdout.flush()
        sys.stderr.flush()
        with os.fdopen(write, "wb") as pipe:
            pickle.dump(outcome, pipe)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return ("killed", None) if os.WTERMSIG(status) == signal.SIGKILL else ("error", f"signal {status}")
    return pickle.loads(data) if data else ("error", "the child sent nothing back")


def command(argv: list[str], kill_at: int | None) -> dict[str, int]:
    """(In a child) run ``sbmoe ARGV`` counting events, killed at event ``kill_at``; its exit code and events."""
    events = Events(kill_at)
    install(events)
    code = sbmoe.cli.main(argv)
    return {"code": code, "events": events.count}


def retriever_summary(folder: str) -> dict[str, Any]:
    """(In a child) what a saved retriever holds: ids, stored texts and the hits of a few queries; or its error."""
    try:
        retriever = Retriever.load(folder)
    except IndexLoadError as err:
        return {"error": str(err)}
    hits = [[(hit.id, hit.score, hit.text) for hit in found] for found in retriever.search(QUERIES, k=5)]
    return {"ids": retriever.index.doc_ids, "stored": len(retriever.store), "hits": hits}


def index_summary(folder: str) -> dict[str, Any]:
    """(In a child) what a saved DenseIndex holds: ids and the files of its manifest; or its error."""
    try:
        index = DenseIndex.load(folder, use_gpu=False)
    except IndexLoadError as err:
        return {"error": str(err)}
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    return {"ids": index.doc_ids, "files": manifest["files"]}


def weights(folder: str) -> dict[str, np.ndarray]:
    """Every tensor of the model saved in ``folder`` (its safetensors files, checkpoints left out)."""
    tensors = {}
    for file in sorted(Path(folder).rglob("*.safetensors")):
        name = file.relative_to(folder)
        if "checkpoints" not in name.parts:
            tensors.update({f"{name}:{key}": value for key, value in load_file(str(file)).items()})
    return tensors


def head_checkpoint(folder: str) -> dict[str, Any]:
    """(In a child) the epoch of the head checkpoint under ``folder``, or None; raises if it does not load."""
    file = Path(folder) / "checkpoints" / "head" / "state.pt"
    if not file.is_file():
        return {"epoch": None}
    return {"epoch": len(torch.load(file, weights_only=True)["result"]["losses"])}


def leftovers(*folders: Path) -> list[str]:
    """Temporary entries (``.tmp-``, ``.old-``) left in ``folders``."""
    return sorted(p.name for f in folders if f.is_dir() for p in f.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def clear_cache(cache: Path) -> None:
    """Remove the complete cache entries (not what killed writers left), so the next run encodes again."""
    for entry in cache.glob("[!.]*"):
        shutil.rmtree(entry)


def index_scenario(spec: dict[str, Any], work: Path, log: Path) -> dict[str, Any]:
    """Kill ``sbmoe index`` (or ``evaluate --save-index``) while it replaces an index; see the module docstring."""
    output, cache = Path(spec["output"]), Path(spec["cache"])
    summary = retriever_summary if spec["scenario"] == "index" else index_summary
    checked = str(output / spec.get("inside", ""))
    must_ok(in_child(command, spec["old"], None, log=log), "old run")
    old_state = must_ok(in_child(summary, checked, log=log), "old summary")
    pristine = work / "pristine-old"
    shutil.copytree(output, pristine)
    clean = must_ok(in_child(command, spec["new"], None, log=log), "clean run")
    new_state = must_ok(in_child(summary, checked, log=log), "new summary")
    assert clean["code"] == 0 and "error" not in new_state and new_state != old_state, (clean, new_state)
    rng, runs, state = random.Random(spec["seed"]), [], new_state
    while sum(run["outcome"].startswith("killed") for run in runs) < spec["kills"]:
        if state == new_state:  # finished: start again from the old index
            shutil.rmtree(output)
            shutil.copytree(pristine, output)
        clear_cache(cache)
        kill_at = rng.randint(1, clean["events"])
        status, result = in_child(command, spec["new"], kill_at, log=log)
        state = must_ok(in_child(summary, checked, log=log), "summary")
        runs.append({"kill_at": kill_at, "outcome": outcome(status, result, state, old_state, new_state)})
    final = must_ok(in_child(command, spec["new"], None, log=log), "final run")
    final_state = must_ok(in_child(summary, checked, log=log), "final summary")
    return {
        "clean_events": clean["events"],
        "runs": runs,
        "final": {"code": final["code"], "equal": final_state == new_state},
        "leftovers": leftovers(output.parent, cache),
    }


def outcome(status: str, result: Any, state: dict, old_state: dict, new_state: dict) -> str:
    """How a run of the index scenarios ended, and what the folder held after it."""
    held = "old" if state == old_state else "new" if state == new_state else "unloadable" if "error" in state else "?"
    if status == "killed":
        return f"killed: {held}"
    if status == "ok" and result["code"] == 0:
        return f"finished: {held}"
    return f"failed: {held}: {result}"


def finetune_scenario(spec: dict[str, Any], work: Path, log: Path) -> dict[str, Any]:
    """Kill ``sbmoe finetune`` and resume it again and again; finished runs must match an uninterrupted run."""
    reference, output = work / "reference", Path(spec["output"])
    clean = must_ok(in_child(command, [*spec["argv"], "--output-dir", str(reference)], None, log=log), "clean run")
    assert clean["code"] == 0, clean
    expected = weights(str(reference))
    argv = [*spec["argv"], "--output-dir", str(output), "--resume"]
    rng, runs = random.Random(spec["seed"]), []
    while sum(run["outcome"] == "killed" for run in runs) < spec["kills"]:
        kill_at = rng.randint(1, clean["events"])
        status, result = in_child(command, argv, kill_at, log=log)
        run: dict[str, Any] = {"kill_at": kill_at}
        if status == "killed":
            run["outcome"] = "killed"
            if spec["mode"] == "head":
                checkpoint = must_ok(in_child(head_checkpoint, str(output), log=log), "checkpoint")
                run["checkpoint_epoch"] = checkpoint["epoch"]
        elif status == "ok" and result["code"] == 0:
            run.update(outcome="finished", max_abs_diff=max_abs_diff(expected, weights(str(output))))
            shutil.rmtree(output)  # next: a new chain of kills from the start
        else:
            run["outcome"] = f"failed: {result}"
        runs.append(run)
        if run["outcome"].startswith("failed"):
            break
    status, result = in_child(command, argv, None, log=log)
    final = {"code": result["code"] if status == "ok" else f"{status}: {result}"}
    if final["code"] == 0:
        final["max_abs_diff"] = max_abs_diff(expected, weights(str(output)))
    return {
        "clean_events": clean["events"],
        "runs": runs,
        "final": final,
        "leftovers": leftovers(output, output / "checkpoints" / "head"),
    }


def max_abs_diff(expected: dict[str, np.ndarray], found: dict[str, np.ndarray]) -> float:
    """Largest absolute difference between two sets of weights (inf when their names or shapes differ)."""
    if expected.keys() != found.keys() or any(v.shape != found[k].shape for k, v in expected.items()):
        return float("inf")
    return max(float(np.max(np.abs(v.astype(np.float64) - found[k]), initial=0.0)) for k, v in expected.items())


def must_ok(outcome: tuple[str, Any], what: str) -> Any:
    """The result of a child that must have finished."""
    status, result = outcome
    if status != "ok":
        raise RuntimeError(f"{what}: {status}: {result}")
    return result


def main(spec_file: str, report_file: str) -> None:
    """Run the scenario of ``spec_file`` and write its report."""
    spec = json.loads(Path(spec_file).read_text())
    work = Path(spec["work"])
    work.mkdir(parents=True, exist_ok=True)
    log = work / "children.log"
    scenario = finetune_scenario if spec["scenario"] == "finetune" else index_scenario
    Path(report_file).write_text(json.dumps(scenario(spec, work, log), indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
