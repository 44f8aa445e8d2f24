"""Homogeneous batches over several training sources: every batch comes from one source, sources drawn by weight.

In-batch negatives from another domain are trivially easy, so a batch never mixes sources. One epoch has as many
batches as the sources need to show each example once (``ceil(size / batch_size)`` summed); the weights split
those batches between sources (``equal``, the default; ``temperature:T``; ``proportional``: by size, so each
example is seen once), and a source that gets more batches than its size fills cycles through a fresh permutation
of its examples.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from sentence_transformers.base.sampler import MultiDatasetDefaultBatchSampler

PROPORTIONAL = "proportional"
EQUAL = "equal"
TEMPERATURE = "temperature:"


def parse_weights(text: str, sizes: Sequence[int]) -> list[float] | None:
    """Per-source batch weights from ``--train-weights``: ``"1,2"`` -> ``[1.0, 2.0]``; ``"equal"`` -> one each;
    ``"temperature:T"`` -> ``size ** (1 / T)`` (T = 1 is proportional, larger T moves toward equal);
    ``"proportional"`` (or empty) -> None (by size: each example once per epoch).

    Args:
        text: The flag's value.
        sizes: Training examples per source.

    Raises:
        ValueError: not one of those forms, or not one positive number per source.
    """
    text = text.strip()
    if text in ("", PROPORTIONAL):
        return None
    if text == EQUAL:
        return [1.0] * len(sizes)
    if text.startswith(TEMPERATURE):
        try:
            temperature = float(text.removeprefix(TEMPERATURE))
        except ValueError:
            temperature = 0.0
        if not temperature > 0:
            raise ValueError(f"--train-weights {text!r}: expected temperature:T with T > 0 (e.g. temperature:2)")
        return [size ** (1 / temperature) for size in sizes]
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError as err:
        raise ValueError(
            f"--train-weights {text!r}: expected equal, proportional, temperature:T or one number per source (1,2)"
        ) from err
    if len(weights) != len(sizes) or any(not w > 0 for w in weights):
        raise ValueError(f"--train-weights {text!r}: expected {len(sizes)} positive numbers, one per source")
    return weights


def batches_per_source(sizes: Sequence[int], batch_size: int, weights: Sequence[float] | None) -> list[int]:
    """How many batches each source gets in one epoch (at least one for a non-empty source)."""
    needed = [math.ceil(size / batch_size) for size in sizes]
    if weights is None:
        return needed
    total, share = sum(needed), sum(weights)
    return [max(1, round(total * w / share)) if size else 0 for w, size in zip(weights, sizes, strict=True)]


def source_order(counts: Sequence[int], generator: torch.Generator) -> list[int]:
    """A random order of source labels holding ``counts[s]`` copies of each source ``s``."""
    labels = [source for source, count in enumerate(counts) for _ in range(count)]
    return [labels[i] for i in torch.randperm(len(labels), generator=generator).tolist()]


def homogeneous_batches(
    sizes: Sequence[int], batch_size: int, weights: Sequence[float] | None, generator: torch.Generator
) -> list[tuple[int, list[int]]]:
    """One epoch of ``(source, [example index within the source])`` batches in random source order."""
    counts = batches_per_source(sizes, batch_size, weights)
    streams: list[list[list[int]]] = []
    for size, count in zip(sizes, counts, strict=True):
        width = min(batch_size, size)
        cycles = math.ceil(count * width / size) if size else 0
        stream = torch.cat([torch.randperm(size, generator=generator) for _ in range(cycles)]) if cycles else []
        streams.append([stream[i * width : (i + 1) * width].tolist() for i in range(count)])
    taken = [0] * len(sizes)
    batches = []
    for source in source_order(counts, generator):
        batches.append((source, streams[source][taken[source]]))
        taken[source] += 1
    return batches


class WeightedSourceBatchSampler(MultiDatasetDefaultBatchSampler):
    """A sentence-transformers multi-dataset sampler: each batch from one source's own batch sampler (no
    duplicates within a batch), sources in the numbers :func:`batches_per_source` gives (full fine-tuning).

    Pass ``functools.partial(WeightedSourceBatchSampler, weights=...)`` as ``multi_dataset_batch_sampler``.
    """

    def __init__(self, dataset, batch_samplers, generator=None, seed: int = 0, weights=None) -> None:
        super().__init__(dataset, batch_samplers=batch_samplers, generator=generator, seed=seed)
        self.weights = weights

    def _counts(self) -> list[int]:
        return batches_per_source([len(d) for d in self.dataset.datasets], self.batch_size, self.weights)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        offsets = [0, *self.dataset.cumulative_sizes[:-1]]
        streams = [iter(sampler) for sampler in self.batch_samplers]
        for source in source_order(self._counts(), generator):
            batch = next(streams[source], None)
            if batch is None:  # the source is exhausted: a new pass over it
                streams[source] = iter(self.batch_samplers[source])
                batch = next(streams[source])
            yield [offsets[source] + row for row in batch]

    def __len__(self) -> int:
        return sum(self._counts())
