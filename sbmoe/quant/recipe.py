"""The expert-quantization recipe: calibration vectors -> per-linear figures -> a bit plan -> a quantized head."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sbmoe.data import DataError, load_dataset
from sbmoe.data.dataset import beir_text
from sbmoe.model import SBMoEModel, find_head
from sbmoe.quant.allocate import CRITERIA, allocate, make_plan, uniform
from sbmoe.quant.calibrate import LinearStats, capture_inputs, head_frequencies, linear_stats
from sbmoe.quant.head import QuantizedSBMoEHead
from sbmoe.quant.linear import BIT_WIDTHS, expert_linears
from sbmoe.retrieval.encode import pooled_features

DEFAULT_GROUP = 128


def calibration_vectors(
    model: SBMoEModel, spec: str, corpus_sample: int, cache_dir: str | os.PathLike | None = None, seed: int = 0
) -> Tensor:
    """Pooled backbone vectors of a dataset's queries and a random sample of ``corpus_sample`` of its documents."""
    dataset = load_dataset(spec)
    texts = [beir_text(doc.title, doc.text) for doc in dataset.iter_docs()]
    rows = np.sort(np.random.default_rng(seed).choice(len(texts), size=min(corpus_sample, len(texts)), replace=False))
    parts = [pooled_features(model, [texts[i] for i in rows], "corpus", cache_dir)] if len(rows) else []
    if dataset.queries:
        parts.append(pooled_features(model, list(dataset.queries.values()), "queries", cache_dir))
    if not parts:
        raise DataError(f"{spec}: no queries or documents to calibrate on")
    return torch.cat(parts)


def calibrate_head(model: SBMoEModel, pooled: Tensor, group_size: int | None = DEFAULT_GROUP) -> list[LinearStats]:
    """Per expert linear of the model's head: output error per bit width on ``pooled`` (run as queries, so a
    query-only head transforms them), its expert's routing share, and its outlier score."""
    head = find_head(model)
    if head is None:
        raise ValueError("the model has no SB-MoE head: there are no experts to quantize")
    head.eval()
    names = [name for name, _ in expert_linears(head)]
    x = pooled.to(model.device)
    inputs = capture_inputs(head, lambda: head({"sentence_embedding": x}, task="query"), names)
    return linear_stats(head, inputs, {"": head_frequencies(head, x)}, group_size)


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
