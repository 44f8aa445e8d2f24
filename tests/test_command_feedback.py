"""What the commands tell a user: finetune's help and baseline, refusals to overwrite, counts, honest labels."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from test_damaged_data import DOCS, QRELS, beir

from sbmoe import cli
from sbmoe.commands import finetune
from sbmoe.data.corpus import load_corpus
from sbmoe.training.arguments import FinetuneArguments

ROWS = Path(__file__).resolve().parents[1] / "experiments" / "scifact" / "rows"
STUDY = Path(__file__).resolve().parents[1] / "experiments" / "results" / "scifact_study.json"


def said(capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> str:
    captured = capsys.readouterr()
    return captured.out + captured.err + caplog.text


def finetune_argv(backbone: str, data: Path, out: Path, *extra: str) -> list[str]:
    spec = f"{data}:test"
    return [
        "finetune",
        "--backbone",
        backbone,
        "--train-data",
        spec,
        "--eval-data",
        spec,
        "--epochs",
        "1",
        "--hard-negatives",
        "1",
        "--output-dir",
        str(out),
        "--threads",
        "1",
        *extra,
    ]


def test_finetune_help_has_dashed_flags_defaults_and_examples(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["finetune", "--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert text.startswith("usage: sbmoe finetune ")
    assert "train an SB-MoE (or dense, or no) head" in text and "examples:\n  sbmoe finetune --train-data" in text
    flags = re.findall(r"^  (--[a-z0-9_-]+)", text, flags=re.MULTILINE)
    assert len(flags) == len(FinetuneArguments().flat()) and not [f for f in flags if "_" in f]
    options = text.split("options:")[1].split("examples:")[0]
    entries = re.split(r"\n  (?=-)", options)[2:]  # after -h
    assert all("default" in " ".join(entry.split()) for entry in entries), [e for e in entries if "default" not in e]
    assert "--noise, --no-noise   noisy router logits while training (default: --noise)" in text
    assert text.count("(default") == len(entries)  # one default per flag, --data-dir included


def test_finetune_flags_parse_with_dashes_and_negated_booleans() -> None:
    args = finetune.parse_args(["--train-data", "x:train", "--no-noise", "--query-only", "--threads", "3"])
    assert (args.data.train_data, args.head.noise, args.head.query_only, args.training.threads) == (
        "x:train",
        False,
        True,
        3,
    )


def test_every_study_row_file_reruns_its_row() -> None:
    rows = json.loads(STUDY.read_text())["rows"]
    files = sorted(ROWS.glob("*.json"))
    assert len(files) == len(rows) == 32
    for path in files:
        args = finetune.parse_args([str(path)])
        name = next(n for n in rows if re.sub(r"[^a-z0-9]+", "-", n.lower()).strip("-") == path.stem)
        study = {k: v for k, v in rows[name]["arguments"].items() if k not in ("output_dir", "save_model", "seed")}
        assert {k: args.flat()[k] for k in study} == study
        assert (args.training.seed, args.training.threads) == (0, 1)


def test_finetune_config_with_an_unknown_key_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"train_data": "scifact:train", "lerning_rate": 0.1}))
    assert cli.main(["finetune", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"sbmoe finetune: error: {config}: unknown argument(s) lerning_rate; known: " in err


def test_finetune_shows_zero_shot_beside_each_figure(tiny_bert: str, tmp_path: Path, capsys, caplog) -> None:
    data = beir()(tmp_path / "data")
    with caplog.at_level(logging.INFO):
        code = cli.main(finetune_argv(tiny_bert, data, tmp_path / "out", "--head", "none", "--no-save-model"))
    text = said(capsys, caplog)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert code == 0 and record["threads"] == 1
    spec = f"{data}:test"
    assert record["zero_shot"][spec]["metrics"] == record["eval"][spec]["metrics"]  # no head: nothing moved
    ndcg = record["eval"][spec]["metrics"]["nDCG@10"]
    assert f"  nDCG@10     zero-shot {ndcg:.4f}  fine-tuned {ndcg:.4f}  +0.0000" in text
    assert f"run.json in {tmp_path / 'out'}" in text and "saved to" not in text


def test_finetune_refuses_to_replace_a_finished_run(tiny_bert: str, tmp_path: Path, capsys) -> None:
    data, out = beir()(tmp_path / "data"), tmp_path / "out"
    argv = finetune_argv(tiny_bert, data, out, "--head", "none", "--no-save-model")
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main(argv) == 1
    assert f"sbmoe finetune: error: {out} already holds a finished run (run.json); pass --overwrite" in (
        capsys.readouterr().err
    )
    assert cli.main([*argv, "--overwrite"]) == 0


def test_keep_identical_ids_in_finetune_eval(tiny_bert: str, tmp_path: Path) -> None:
    docs = [*DOCS, {"_id": "q1", "title": "gene", "text": "gene expression"}]
    data = beir(docs=docs, qrels=["q1\tq1\t1", *QRELS[1:]])(tmp_path / "data")
    recall = {}
    for keep in ("--keep-identical-ids", "--no-keep-identical-ids"):
        out = tmp_path / keep
        assert cli.main(finetune_argv(tiny_bert, data, out, "--head", "none", "--no-save-model", keep)) == 0
        result = json.loads((out / "run.json").read_text())["eval"][f"{data}:test"]
        recall[keep] = result["per_query"]["Recall@100"]["q1"]
    assert recall == {"--keep-identical-ids": 1.0, "--no-keep-identical-ids": 0.0}


def test_evaluate_refuses_to_replace_a_result_of_other_settings(tiny_bert: str, tmp_path: Path, capsys) -> None:
    data, output = beir()(tmp_path / "data"), tmp_path / "r.json"
    argv = ["evaluate", "--model", tiny_bert, "--datasets", str(data), "--output", str(output), "--quiet"]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 0  # the same settings again: replaced
    capsys.readouterr()
    assert cli.main([*argv, "--index", "hnsw"]) == 1
    assert f"{output} holds a result with other settings (index 'flat' -> 'hnsw')" in capsys.readouterr().err
    assert cli.main([*argv, "--index", "hnsw", "--overwrite"]) == 0
    assert "| hnsw " in (output.with_suffix(".md")).read_text()
    assert json.loads(output.read_text())["results"][0]["corpus_from_cache"] is True


def test_evaluate_names_outputs_by_index_and_logs_the_split(
    tiny_bert: str, tmp_path: Path, monkeypatch, caplog
) -> None:
    data = beir()(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO):
        for index in ("flat", "hnsw"):
            assert cli.main(["evaluate", "--model", "minilm-plain", "--datasets", str(data), "--index", index]) == 0
    names = sorted(p.name for p in (tmp_path / "runs" / "evaluate").glob("*.json"))
    stems = [re.sub("_[0-9a-f]{8}.json$", "", name) for name in names]
    assert stems == ["minilm-plain_data", "minilm-plain_data_hnsw"]
    assert "on data:test (3 queries)" in caplog.text
    argv = ["evaluate", "--model", "minilm-plain", "--datasets", str(data), "--top-k", "2"]
    assert cli.main(argv) == 0  # other settings, default name: a third file, no clash
    assert len(list((tmp_path / "runs" / "evaluate").glob("*.json"))) == 3
    assert cli.main(argv) == 0  # the same settings again replace their own file


def test_evaluate_names_a_misspelled_dataset_even_after_earlier_runs(
    tiny_bert: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    data = beir()(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["evaluate", "--model", tiny_bert, "--datasets", str(data), "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", "--model", tiny_bert, "--datasets", str(tmp_path / "dta"), "--quiet"]) == 1
    assert f"dataset '{tmp_path / 'dta'}' not found" in capsys.readouterr().err


def test_run_file_missing_queries_says_how_many_were_scored(tmp_path: Path, capsys, caplog) -> None:
    data = beir()(tmp_path / "data")
    run = tmp_path / "run.trec"
    run.write_text("q1 Q0 d1 1 2.0 t\nq2 Q0 d5 1 1.0 t\n")
    with caplog.at_level(logging.INFO):
        code = cli.main(["evaluate", "--run", str(run), "--datasets", str(data), "--output", str(tmp_path / "r.json")])
    text = said(capsys, caplog)
    assert code == 0
    assert "data: scored 2 of 3 judged queries: 1 judged queries are not in the run file (e.g. q3)" in text
    assert "| 2 of 3 |" in text
    empty = tmp_path / "other.trec"
    empty.write_text("x9 Q0 d1 1 1.0 t\n")
    code = cli.main(["evaluate", "--run", str(empty), "--datasets", str(data), "--output", str(tmp_path / "e.json")])
    assert code == 1
    assert "nothing to evaluate among 3 judged queries: 3 judged queries are not in the run file" in said(
        capsys, caplog
    )


def test_tsv_corpus_with_a_byte_order_mark_and_header(tmp_path: Path) -> None:
    path = tmp_path / "docs.tsv"
    path.write_bytes(b"\xef\xbb\xbfid\ttext\nd1\tfirst\nd2\tsecond\n")
    assert [(d.id, d.text) for d in load_corpus(path).iter_docs()] == [("d1", "first"), ("d2", "second")]
