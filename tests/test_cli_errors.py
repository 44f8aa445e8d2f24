"""The ``sbmoe`` command's failures: Ctrl-C is one line and exit 130 in every command (an interrupted encoding
keeps what it finished), a bug says it is one, blank queries are refused, ``--json`` works with ``--queries``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sbmoe.cli import main as cli_main
from sbmoe.data import Doc
from sbmoe.retrieval import Retriever

DOCS = [Doc(f"d{i}", f"title {i}", f"the cancer cells {i} and the gene study {i % 3}") for i in range(24)]
SIGINT_DURING_ENCODING = """
import os, signal, sys
import sbmoe.retrieval.cache as cache
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job may have inherited SIGINT ignored
from sentence_transformers import SentenceTransformer
cache.CHUNK = 8
real, calls = SentenceTransformer.encode_document, []
def interrupted(self, texts, *args, **kwargs):
    calls.append(len(texts))
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the second chunk encodes
    return real(self, texts, *args, **kwargs)
SentenceTransformer.encode_document = interrupted
from sbmoe.cli import main
sys.exit(main(sys.argv[1:]))
"""


def write_corpus(path: Path, docs: list[Doc]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"_id": d.id, "title": d.title, "text": d.text}) + "\n" for d in docs))
    return path


@pytest.fixture()
def encoded_inputs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from sentence_transformers import SentenceTransformer

    seen: list[str] = []
    real = SentenceTransformer.encode_document

    def counting(self, texts, *args, **kwargs):
        seen.extend(texts)
        return real(self, texts, *args, **kwargs)

    monkeypatch.setattr(SentenceTransformer, "encode_document", counting)
    return seen


def test_ctrl_c_during_index_is_one_line_exit_130_and_the_rerun_encodes_only_the_rest(
    tiny_bert: str, tmp_path: Path, encoded_inputs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus, cache, out = write_corpus(tmp_path / "c.jsonl", DOCS), tmp_path / "cache", tmp_path / "idx"
    argv = ["index", "--model", tiny_bert, "--corpus", str(corpus), "--output", str(out), "--cache-dir", str(cache)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-c", SIGINT_DURING_ENCODING, *argv, "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "sbmoe index: interrupted; resume with the same command (the documents encoded so far are cached)"
    )
    assert "Traceback" not in done.stderr and not (out / "manifest.json").exists()
    monkeypatch.setattr("sbmoe.retrieval.cache.CHUNK", 8)
    assert cli_main([*argv, "--quiet"]) == 0
    assert encoded_inputs == [d.full_text for d in DOCS[8:]]  # chunk 1 was kept; the interrupted 2 and 3 encode
    assert len(Retriever.load(out)) == 24


def test_ctrl_c_during_finetune_is_one_line_and_resume_gives_the_uninterrupted_weights(
    tiny_bert: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    beir = write_corpus(tmp_path / "toy" / "corpus.jsonl", DOCS).parent
    (beir / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{t}", "text": f"gene study {t}"}) + "\n" for t in range(3))
    )
    (beir / "qrels").mkdir()
    rows = "".join(f"q{int(d.id[1:]) % 3}\t{d.id}\t1\n" for d in DOCS)
    (beir / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + rows)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: resumed weights are bit for bit the uninterrupted ones
    try:
        argv = ["finetune", "--backbone", tiny_bert, "--train-data", f"{beir}:train"]
        argv += ["--cache-dir", str(tmp_path / "cache"), "--num-experts", "3", "--hard-negatives", "2"]
        argv += ["--batch-size", "4", "--max-seq-length", "32", "--epochs", "4", "--dev-queries", "0"]
        assert cli_main([*argv, "--output-dir", str(tmp_path / "whole")]) == 0
        real_step, steps = torch.optim.AdamW.step, []

        def interrupted_step(self, *args, **kwargs):
            steps.append(1)
            if len(steps) == 5:  # in the second epoch, after the first epoch's checkpoint
                raise KeyboardInterrupt
            return real_step(self, *args, **kwargs)

        monkeypatch.setattr(torch.optim.AdamW, "step", interrupted_step)
        capsys.readouterr()
        assert cli_main([*argv, "--output-dir", str(tmp_path / "cut")]) == 130
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == "sbmoe finetune: interrupted; resume with the same command plus --resume"
        monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
        assert cli_main([*argv, "--output-dir", str(tmp_path / "cut"), "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    whole, cut = (sorted((tmp_path / name).rglob("*.safetensors")) for name in ("whole", "cut"))
    assert whole and len(steps) >= 5  # weights were saved, and the interrupted run did stop mid-training
    assert [p.relative_to(tmp_path / "whole") for p in whole] == [p.relative_to(tmp_path / "cut") for p in cut]
    for a, b in zip(whole, cut, strict=True):
        tensors_a, tensors_b = load_file(a), load_file(b)
        assert tensors_a.keys() == tensors_b.keys()
        assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)  # the same computation repeated


@pytest.fixture(scope="module")
def saved(tiny_bert: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "r"
    Retriever.build(tiny_bert, DOCS, show_progress=False).save(folder)
    return folder


def test_an_unexpected_exception_says_it_is_a_bug_and_debug_shows_the_traceback(
    saved: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def broken(*args, **kwargs):
        raise TypeError("unsupported operand\nsecond line")

    monkeypatch.setattr("sbmoe.commands.search.Retriever.load", broken)
    assert cli_main(["search", str(saved), "cancer"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "sbmoe search: internal error, a bug in sbmoe (TypeError: unsupported operand); please report it with the "
        "traceback that `sbmoe --debug search ...` prints"
    )
    with pytest.raises(TypeError, match="unsupported operand"):
        cli_main(["--debug", "search", str(saved), "cancer"])


@pytest.mark.parametrize("query", ["", "   ", "\n\t"])
def test_a_blank_query_is_refused_in_one_line(saved: Path, query: str, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["search", str(saved), query]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is blank" in err and "give the words to search for" in err


def test_json_with_queries_prints_one_line_per_query_and_writes_no_unasked_run(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    queries = tmp_path / "q.jsonl"
    records = [{"_id": "q1", "text": DOCS[4].full_text}, {"id": "q2", "text": "gene study"}]
    queries.write_text("".join(json.dumps(record) + "\n" for record in records))
    assert cli_main(["search", str(saved), "--queries", str(queries), "--json", "-k", "3"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["query_id"] for line in lines] == ["q1", "q2"] and lines[0]["hits"][0]["id"] == "d4"
    assert all(len(line["hits"]) == 3 for line in lines) and not (tmp_path / "runs").exists()
    assert cli_main(["search", str(saved), "--queries", str(queries), "--json", "--output", "r.trec"]) == 0
    assert (tmp_path / "r.trec").read_text().startswith("q1 Q0 d4 1 ")
