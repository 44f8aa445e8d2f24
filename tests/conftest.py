"""Shared fixtures: a tiny random BERT backbone saved to a temporary folder (no download)."""

from __future__ import annotations

import json
import os
import string
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test writes its embedding cache under a temporary folder, never the user's ~/.cache/sbmoe."""
    path = tmp_path_factory.mktemp("sbmoe-cache")
    os.environ["SBMOE_CACHE"] = str(path)
    return path


WORDS = (
    "the a of and to in is was for on with by as cell cells protein gene genes cancer drug study results "
    "patients disease blood brain risk increase decrease effect effects treatment mice human dna rna virus "
    "query document retrieval expert router dense vector search index"
).split()


def write_tiny_bert(folder: Path, hidden: int = 32, seed: int = 0, layers: int = 2) -> Path:
    """Save a random BERT of ``layers`` layers (hidden size ``hidden``) and a word-piece tokenizer to ``folder``."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *string.digits, *WORDS]
    vocab += [f"##{c}" for c in string.ascii_lowercase + string.digits]
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(dict.fromkeys(vocab)),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a tiny random BERT backbone (hidden size 32), shared by the whole test session."""
    return str(write_tiny_bert(tmp_path_factory.mktemp("tiny-bert")))


def write_beir_slice(folder: Path, data: Path, num_queries: int, num_docs: int) -> Path:
    """A BEIR folder of the first ``num_queries`` SciFact test queries, their relevant documents and others in file
    order up to ``num_docs``."""
    from sbmoe.data import load_dataset

    full = load_dataset("scifact", data_dir=data)
    qids = list(full.qrels)[:num_queries]
    relevant = {d for q in qids for d in full.qrels[q]}
    docs = [d for d in full.iter_docs() if d.id in relevant]
    docs += [d for d in full.iter_docs() if d.id not in relevant][: num_docs - len(docs)]
    (folder / "qrels").mkdir(parents=True)
    with (folder / "corpus.jsonl").open("w") as f:
        f.writelines(json.dumps({"_id": d.id, "title": d.title, "text": d.text}) + "\n" for d in docs)
    with (folder / "queries.jsonl").open("w") as f:
        f.writelines(json.dumps({"_id": q, "text": full.queries[q]}) + "\n" for q in qids)
    rows = [f"{q}\t{d}\t{s}\n" for q in qids for d, s in full.qrels[q].items()]
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(rows))
    return folder


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only data folder beside the project (``../shared/data`` or ``$SBMOE_DATA``)."""
    path = Path(os.environ.get("SBMOE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"shared data folder not found at {path}")
    return path


@pytest.fixture(scope="module")
def one_faiss_thread() -> Iterator[None]:
    """One OpenMP thread: on a busy shared machine faiss's spinning threads slow small trainings 10x."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def head_output(head: torch.nn.Module, x: torch.Tensor, task: str) -> torch.Tensor:
    """A standalone head's embeddings of pooled vectors ``x`` of ``task`` (eval mode, no gradient)."""
    head.eval()
    with torch.no_grad():
        return head({"sentence_embedding": x, "task": task})["sentence_embedding"]
