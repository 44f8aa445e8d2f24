"""Model names and paths that cannot load fail in one line; loading is quiet; the untyped encode of a query-only
model and build_model's ignored or misspelled arguments are refused."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sbmoe.backbones import BackboneUnavailableError, resolve_backbone
from sbmoe.cli import main as cli_main
from sbmoe.errors import ModelLoadError
from sbmoe.heads import HeadConfig, MoELayersConfig
from sbmoe.model import SBMoEModel, build_model, load_any_model, load_model
from sbmoe.quiet import ST_LOGGER, quiet_loading
from sbmoe.retrieval.encoder import Encoder, pooled_model

TEXTS = ["cells and genes", "the protein increase in blood", "a drug study of mice"]
KNOWN = "known: minilm, minilm-l3, minilm-l2, tinybert, bert-small, bert-base, contriever, contriever-msmarco"
OFFLINE = (
    "model 'no-such-org/no-such-encoder' is not in the local Hugging Face cache and the Hub is not reachable "
    "(HF_HUB_OFFLINE is set): download it where the Hub is reachable (`hf download no-such-org/no-such-encoder "
    "--local-dir DIR`) and give the folder DIR instead, or use the offline default backbone 'minilm'"
)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder holding ``out/minilm-sbmoe/`` and a file ``notes.txt``; the Hub is offline, nothing cached."""
    (tmp_path / "out" / "minilm-sbmoe").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("not a model")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("sbmoe.backbones._is_cached", lambda hub_id: False)
    return tmp_path


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("out/minilm-sbmo", "no such folder: out/minilm-sbmo; did you mean out/minilm-sbmoe?"),
        ("./out/minilm-sbmo", "no such folder: ./out/minilm-sbmo; did you mean out/minilm-sbmoe?"),
        ("ot/minilm-sbmoe/x", "no such folder: ot/minilm-sbmoe/x; did you mean out?"),  # more than one slash
        ("./elsewhere", "no such folder: ./elsewhere"),
        ("notes.txt", "not a folder: notes.txt (a model is a folder holding config.json or modules.json)"),
        ("minlm", f"unknown backbone name 'minlm'; {KNOWN}; did you mean 'minilm'?"),
        ("tinybret", f"unknown backbone name 'tinybret'; {KNOWN}; did you mean 'tinybert'?"),
        ("minilm-l4", f"unknown backbone name 'minilm-l4'; {KNOWN}; did you mean 'minilm-l3'?"),
        ("xyz", f"unknown backbone name 'xyz'; {KNOWN}; or give a local folder or a Hub id org/name"),
        ("no-such-org/no-such-encoder", OFFLINE),
    ],
)
def test_a_model_that_cannot_load_is_named_in_one_line(workdir: Path, spec: str, message: str) -> None:
    for load in (resolve_backbone, load_any_model, build_model):
        with pytest.raises(BackboneUnavailableError) as info:
            load(spec)
        assert str(info.value) == message


def test_a_known_name_that_is_not_cached_names_its_hub_id(workdir: Path) -> None:
    with pytest.raises(BackboneUnavailableError) as info:
        build_model("tinybert")
    assert str(info.value).startswith(
        "backbone 'tinybert' (huawei-noah/TinyBERT_General_4L_312D) is not in the local Hugging Face cache and the "
        "Hub is not reachable (HF_HUB_OFFLINE is set): download it"
    )


def test_an_invalid_hub_id_is_named(workdir: Path) -> None:
    with pytest.raises(BackboneUnavailableError, match=r"^model 'a b/c' is neither a local folder nor a valid Hub "):
        load_any_model("a b/c")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["evaluate", "--model", "out/minilm-sbmo", "--datasets", "scifact"],
            "sbmoe evaluate: error: no such folder: out/minilm-sbmo; did you mean out/minilm-sbmoe?",
        ),
        (
            ["evaluate", "--model", "minlm", "--datasets", "scifact"],
            f"sbmoe evaluate: error: unknown backbone name 'minlm'; {KNOWN}; did you mean 'minilm'?",
        ),
        (
            ["evaluate", "--model", "no-such-org/no-such-encoder", "--datasets", "scifact"],
            f"sbmoe evaluate: error: {OFFLINE}",
        ),
        (
            ["finetune", "--backbone", "out/minilm-sbmo", "--train-data", "scifact:train", "--output-dir", "ft"],
            "sbmoe finetune: error: no such folder: out/minilm-sbmo; did you mean out/minilm-sbmoe?",
        ),
    ],
)
def test_the_cli_prints_one_line_and_exits_1(
    workdir: Path, shared_data: Path, capsys: pytest.CaptureFixture, argv: list[str], message: str
) -> None:
    assert cli_main([*argv, "--data-dir", str(shared_data)]) == 1
    assert capsys.readouterr().err.splitlines() == [message]


def test_loading_is_quiet_but_keeps_warnings(
    tiny_bert: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    build_model(tiny_bert, HeadConfig(num_experts=2)).save(str(tmp_path / "m"))
    caplog.clear()
    capsys.readouterr()
    load_model(str(tmp_path / "m"))
    load_any_model(tiny_bert)
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("sentence_transformers")]
    assert "Loading weights" not in capsys.readouterr().err
    with quiet_loading():
        logging.getLogger(ST_LOGGER).warning("a warning a user can act on")
    assert caplog.messages == ["a warning a user can act on"]
    assert logging.getLogger(ST_LOGGER).level == logging.NOTSET  # restored


@pytest.fixture(scope="module")
def query_only(tiny_bert: str) -> SBMoEModel:
    """A query-only SB-MoE model on the tiny backbone."""
    torch.manual_seed(0)
    return build_model(tiny_bert, HeadConfig(num_experts=2, query_only=True)).eval()


def test_query_only_model_encodes_documents_without_a_task(query_only: SBMoEModel, tmp_path: Path) -> None:
    """encode() without a task takes the document route, in memory and reloaded (as stock loading does)."""
    documents = query_only.encode_document(TEXTS)
    np.testing.assert_allclose(query_only.encode(TEXTS), documents, atol=1e-6)
    query_only.save(str(tmp_path / "q"))  # its model card encodes examples as queries and documents
    np.testing.assert_allclose(load_model(str(tmp_path / "q")).encode(TEXTS), documents, atol=1e-6)


def test_query_only_model_typed_paths_are_unchanged(query_only: SBMoEModel, tmp_path: Path) -> None:
    pooled = torch.nn.functional.normalize(torch.tensor(pooled_model(query_only).encode(TEXTS)), dim=-1).numpy()
    documents, queries = query_only.encode_document(TEXTS), query_only.encode_query(TEXTS)
    np.testing.assert_allclose(documents, pooled, atol=1e-6)  # documents pass through
    assert np.abs(queries - pooled).max() > 1e-3  # queries are transformed
    np.testing.assert_allclose(query_only.encode(TEXTS, task="document"), documents, atol=1e-6)
    np.testing.assert_allclose(query_only.encode(TEXTS, task="query"), queries, atol=1e-6)
    encoder = Encoder(query_only, tmp_path, show_progress=False)
    np.testing.assert_allclose(encoder.encode(TEXTS, "corpus").vectors, documents, atol=1e-5)
    np.testing.assert_allclose(encoder.encode(TEXTS, "queries").vectors, queries, atol=1e-5)


def test_head_config_refuses_unknown_and_contradictory_options(tiny_bert: str) -> None:
    with pytest.raises(TypeError, match="expert_hiden"):
        HeadConfig(expert_hiden=16)
    with pytest.raises(ValueError, match="top_k must be between 1 and num_experts=2, got 3"):
        HeadConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="head_layers .* needs head 'sbmoe' and routing 'learned'"):
        HeadConfig(head_layers=2, routing="faithful")
    with pytest.raises(ValueError, match="reuse_group, psr and pregate need moe or a stacked head"):
        build_model(tiny_bert, HeadConfig(reuse_group=2))
    with pytest.raises(ValueError, match="moe .* or a stacked head, not both"):
        build_model(tiny_bert, HeadConfig(head_layers=2), moe=MoELayersConfig())
    head = build_model(
        tiny_bert, HeadConfig(num_experts=3, expert_hidden=8)
    ).head  # the config's defaults fill the rest
    settings = (head.num_experts, head.top_k, head.routing, head.inference, head.expert_hidden)
    assert settings == (3, 2, "learned", "soft", 8)


class _RunsCode:
    """A pickled object that would run a command when unpickled."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, ("touch pwned",)


@pytest.fixture(scope="module")
def refused_folders(tiny_bert: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Copies of a saved tiny model: one naming a module class outside sentence-transformers, one whose weights are
    a pickle that runs code."""
    root = tmp_path_factory.mktemp("refused")
    build_model(tiny_bert).save(str(root / "model"))
    untrusted, pickled = root / "untrusted", root / "pickled"
    shutil.copytree(root / "model", untrusted)
    modules = json.loads((untrusted / "modules.json").read_text())
    modules[0]["type"] = "someone_elses_package.Module"
    (untrusted / "modules.json").write_text(json.dumps(modules))
    shutil.copytree(root / "model", pickled)
    for weights in pickled.rglob("model.safetensors"):
        weights.unlink()
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsCode()))
    return {"untrusted": untrusted, "pickled": pickled}


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("untrusted", "modules.json names a module class outside sentence-transformers and sbmoe"),
        ("pickled", "holds a pickled weights file that is not plain tensors"),
    ],
)
def test_a_folder_refused_by_the_trust_check_or_holding_a_pickle_is_one_line(
    refused_folders: dict[str, Path],
    kind: str,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=message):
        load_model(str(refused_folders[kind]))
    (tmp_path / "docs.jsonl").write_text('{"_id": "d1", "text": "cells"}\n')
    argv = ["index", "--model", str(refused_folders[kind]), "--corpus", "docs.jsonl", "--output", "idx"]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("sbmoe ")]  # beside torch's own warning
    assert message in line and "bug" not in line and "Traceback" not in err
    assert not (tmp_path / "pwned").exists()  # no code ran
