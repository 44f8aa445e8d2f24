"""The expert-quantization recipe: calibration inputs -> per-linear figures -> a bit plan -> a quantized model.

Plans name expert linears by their qualified name in the model (``2.experts.0.up`` in the head,
``0.model.encoder.layer.1.intermediate.experts.3.down`` in an upcycled encoder layer); a plan of names inside
the head alone (plans written before MoE encoder layers existed) applies to the head.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sbmoe.data import DataError, load_dataset
from sbmoe.heads import SBMoEHead
from sbmoe.heads.upcycle import MoETransformer
from sbmoe.model import SBMoEModel, find_head
from sbmoe.quant.allocate import CRITERIA, allocate, make_plan, uniform
from sbmoe.quant.calibrate import LinearStats, capture_inputs, head_frequencies, linear_stats, routed_frequencies
from sbmoe.quant.head import QuantizedSBMoEHead
from sbmoe.quant.linear import BIT_WIDTHS, expert_linears
from sbmoe.quant.transformer import QuantizedMoETransformer
from sbmoe.retrieval.encoder import Encoder

DEFAULT_GROUP = 128


def calibration_data(spec: str, corpus_sample: int, seed: int = 0) -> tuple[list[str], list[str], np.ndarray]:
    """A dataset's query texts, all its document texts (in corpus order: the embedding cache knows the corpus by
    them) and the sorted rows of a random sample of ``corpus_sample`` documents.

    Raises:
        DataError: a dataset with neither queries nor documents.
    """
    dataset = load_dataset(spec)
    corpus = [doc.full_text for doc in dataset.iter_docs()]
    size = min(corpus_sample, len(corpus))
    rows = np.sort(np.random.default_rng(seed).choice(len(corpus), size=size, replace=False))
    queries = list(dataset.queries.values())
    if not queries and not corpus:
        raise DataError(f"{spec}: no queries or documents to calibrate on")
    return queries, corpus, rows


def calibration_texts(spec: str, corpus_sample: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """A dataset's query texts and a random sample of ``corpus_sample`` of its document texts."""
    queries, corpus, rows = calibration_data(spec, corpus_sample, seed)
    return queries, [corpus[i] for i in rows]


def calibration_vectors(
    model: SBMoEModel, spec: str, corpus_sample: int, cache_dir: str | os.PathLike | None = None, seed: int = 0
) -> Tensor:
    """Pooled backbone vectors of a dataset's queries and a random sample of ``corpus_sample`` of its documents.

    The documents' vectors are rows of the whole corpus's cache entry, the one ``evaluate``, ``index`` and
    ``finetune`` write and read: a corpus any of them encoded is not encoded again (one that none did is encoded
    whole, once, for all of them).
    """
    queries, corpus, rows = calibration_data(spec, corpus_sample, seed)
    encoder = Encoder(model, cache_dir)
    parts = [encoder.pooled(corpus, "corpus")[torch.from_numpy(rows)]] if len(rows) else []
    if queries:
        parts.append(encoder.pooled(queries, "queries"))
    return torch.cat(parts)


def calibrate_head(model: SBMoEModel, pooled: Tensor, group_size: int | None = DEFAULT_GROUP) -> list[LinearStats]:
    """Per expert linear of the model's head: output error per bit width on ``pooled`` (run as queries, so a
    query-only head transforms them), its expert's routing share, and its outlier score."""
    head = find_head(model)
    if head is None:
        raise ValueError("the model has no SB-MoE head: there are no experts to quantize")
    names = [name for name, _ in expert_linears(head)]
    encoder = Encoder(model)
    inputs = capture_inputs(head, lambda: encoder.tail(pooled, "query"), names)
    return linear_stats(head, inputs, {"": head_frequencies(head, pooled.to(model.device))}, group_size)


def layer_expert_names(model: SBMoEModel) -> list[str]:
    """The qualified names of the expert linears outside the model's SB-MoE head."""
    head = find_head(model)
    in_head = {id(m) for m in head.modules()} if head is not None else set()
    return [name for name, linear in expert_linears(model) if id(linear) not in in_head]


def calibrate_layers(
    model: SBMoEModel, queries: Sequence[str], docs: Sequence[str], group_size: int | None = DEFAULT_GROUP
) -> list[LinearStats]:
    """Per expert linear outside the SB-MoE head (upcycled encoder layers): output error per bit width on the token
    states routed to its expert while encoding ``queries`` and ``docs``, its expert's share of the routed tokens,
    and its outlier score. Names are qualified in ``model``."""
    names = layer_expert_names(model)
    if not names:
        return []
    model.eval()

    def encode() -> None:
        if queries:
            model.encode_query(list(queries), batch_size=32)
        if docs:
            model.encode_document(list(docs), batch_size=32)

    counts: dict[str, int] = {}
    inputs = capture_inputs(model, encode, names, counts)
    return linear_stats(model, inputs, routed_frequencies(counts), group_size)


def calibrate_model(
    model: SBMoEModel, spec: str, corpus_sample: int, group_size: int | None = DEFAULT_GROUP, seed: int = 0
) -> list[LinearStats]:
    """Figures of every expert linear of ``model`` (names qualified in it): the head's (see :func:`calibrate_head`)
    and the upcycled layers' (see :func:`calibrate_layers`), on a dataset's queries and sampled documents.

    Raises:
        ValueError: a model without experts.
    """
    stats = []
    head = find_head(model)
    if head is not None:
        index = next(i for i, module in enumerate(model) if module is head)
        pooled = calibration_vectors(model, spec, corpus_sample, seed=seed)
        stats += [replace(s, name=f"{index}.{s.name}") for s in calibrate_head(model, pooled, group_size)]
    if layer_expert_names(model):
        stats += calibrate_layers(model, *calibration_texts(spec, corpus_sample, seed), group_size)
    if not stats:
        raise ValueError("the model has no expert linears to quantize")
    return stats


def choose_plan(
    stats: Sequence[LinearStats],
    budget: float | None = None,
    bits: int | None = None,
    criterion: str = "sensitivity",
    group_size: int | None = DEFAULT_GROUP,
    bit_widths: Sequence[int] = BIT_WIDTHS,
) -> dict[str, Any]:
    """A plan: ``bits`` for every linear (uniform), or the ``criterion``'s best allocation at ``budget`` average
    bits. Exactly one of ``budget`` and ``bits`` is given."""
    if (budget is None) == (bits is None):
        raise ValueError("give exactly one of budget (mixed precision) and bits (uniform)")
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}: expected one of {CRITERIA}")
    if bits is not None:
        return make_plan(uniform(stats, bits), stats, group_size, "uniform")
    return make_plan(allocate(stats, budget, bit_widths, criterion), stats, group_size, criterion)


def read_plan(path: str | os.PathLike) -> dict[str, Any]:
    """A plan saved as JSON (the ``plan.json`` that ``sbmoe quantize`` writes, or one edited by hand).

    Raises:
        DataError: a missing or malformed file.
    """
    try:
        plan = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read a bit plan ({err})") from err
    linears = plan.get("linears") if isinstance(plan, dict) else None
    if not isinstance(linears, dict) or any(p.get("bits") not in BIT_WIDTHS for p in linears.values()):
        raise DataError(f"{path}: expected {{'linears': {{name: {{'bits': one of {BIT_WIDTHS}, ...}}}}}}")
    for spec in linears.values():
        spec.setdefault("group_size", None)
    return plan


def quantize_head(model: SBMoEModel, plan: dict[str, Any]) -> SBMoEModel:
    """Replace the model's SB-MoE head by its quantized copy (in place); ``plan`` names linears inside the head."""
    head = find_head(model)
    if head is None:
        raise ValueError("the model has no SB-MoE head: there are no experts to quantize")
    index = next(i for i, module in enumerate(model) if module is head)
    model[index] = QuantizedSBMoEHead.from_head(head, plan)
    return model


def quantize_model(model: SBMoEModel, plan: dict[str, Any]) -> SBMoEModel:
    """Quantize every expert linear that ``plan`` names, in place: the head becomes a
    :class:`QuantizedSBMoEHead`, an upcycled Transformer a :class:`QuantizedMoETransformer` (both save packed).

    Raises:
        ValueError: plan names in a module that cannot save packed experts.
    """
    linears = plan["linears"]
    if not any(name.split(".")[0].isdigit() for name in linears):
        return quantize_head(model, plan)
    for index, module in enumerate(list(model)):
        prefix = f"{index}."
        own = {name.removeprefix(prefix): spec for name, spec in linears.items() if name.startswith(prefix)}
        if not own:
            continue
        if isinstance(module, SBMoEHead):
            model[index] = QuantizedSBMoEHead.from_head(module, {"linears": own})
        elif isinstance(module, MoETransformer):
            model[index] = QuantizedMoETransformer.from_transformer(module, {"linears": own})
        else:
            raise ValueError(f"module {index} ({type(module).__name__}) cannot hold packed experts")
    return model
