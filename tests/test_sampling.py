"""Homogeneous batches over several training sources, in the numbers the sampling weights ask for."""

from __future__ import annotations

import functools

import pytest
import torch
from datasets import Dataset
from torch.utils.data import ConcatDataset

from sbmoe.training.sampling import (
    WeightedSourceBatchSampler,
    batches_per_source,
    homogeneous_batches,
    parse_weights,
)


def test_weights_parse_and_bad_ones_are_refused() -> None:
    assert parse_weights("1,3", [5, 5]) == [1.0, 3.0] and parse_weights("proportional", [5, 5]) is None
    assert parse_weights("equal", [900, 100]) == [1.0, 1.0]
    assert parse_weights("temperature:2", [900, 100]) == pytest.approx([30.0, 10.0])
    with pytest.raises(ValueError, match=r"--train-weights '1': expected 2 positive numbers, one per source"):
        parse_weights("1", [5, 5])
    with pytest.raises(ValueError, match=r"expected equal, proportional, temperature:T or one number per source"):
        parse_weights("1,x", [5, 5])
    with pytest.raises(ValueError, match=r"expected temperature:T with T > 0"):
        parse_weights("temperature:0", [5, 5])


@pytest.mark.parametrize("weights", [None, [1.0, 1.0], [1.0, 3.0]])
def test_head_mode_batches_are_homogeneous_and_follow_the_weights(weights: list[float] | None) -> None:
    sizes, batch = [8000, 1000], 32
    drawn = [0, 0]
    for source, rows in homogeneous_batches(sizes, batch, weights, torch.Generator().manual_seed(0)):
        assert len(rows) == batch and max(rows) < sizes[source]
        drawn[source] += len(rows)
    target = [s / sum(sizes) for s in sizes] if weights is None else [w / sum(weights) for w in weights]
    shares = [d / sum(drawn) for d in drawn]
    assert all(abs(share - want) <= 0.02 for share, want in zip(shares, target, strict=True)), (shares, target)
    assert sum(batches_per_source(sizes, batch, weights)) == 250 + 32  # one epoch: what proportional needs


def test_proportional_epoch_shows_every_example_once_per_source() -> None:
    sizes = [96, 64]
    rows = {0: [], 1: []}
    for source, batch in homogeneous_batches(sizes, 32, None, torch.Generator().manual_seed(1)):
        rows[source] += batch
    assert sorted(rows[0]) == list(range(96)) and sorted(rows[1]) == list(range(64))


def test_full_mode_sampler_never_mixes_sources_and_follows_the_weights() -> None:
    from sentence_transformers.base.sampler import NoDuplicatesBatchSampler

    parts = [
        Dataset.from_dict({"query": [f"a{i}" for i in range(640)], "source": [0] * 640}),
        Dataset.from_dict({"query": [f"b{i}" for i in range(160)], "source": [1] * 160}),
    ]
    concat = ConcatDataset(parts)
    samplers = [
        NoDuplicatesBatchSampler(part, batch_size=16, drop_last=True, valid_label_columns=["source"]) for part in parts
    ]
    make = functools.partial(WeightedSourceBatchSampler, weights=[1.0, 1.0])
    sampler = make(concat, batch_samplers=samplers, generator=torch.Generator(), seed=0)
    sampler.set_epoch(0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 50
    sources = [{concat[i]["source"] for i in batch} for batch in batches]
    assert all(len(s) == 1 for s in sources)
    assert sum(s == {1} for s in sources) == 25  # equal weights: half the batches from the small source
