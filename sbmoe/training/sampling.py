"""Homogeneous batches over several training sources: every batch comes from one source, sources drawn by weight.

In-batch negatives from another domain are trivially easy, so a batch never mixes sources. One epoch has as many
batches as the sources need to show each example once (``ceil(size / batch_size)`` summed); the weights split
those batches between sources (``proportional``: by size, so each example is seen once), and a source that gets
more batches than its size fills cycles through a fresh permutation of its examples.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from sentence_transformers.base.sampler import MultiDatasetDefaultBatchSampler

PROPORTIONAL = "proportional"


def parse_weights(text: str, sources: int) -> list[float] | None:
    """``"1,2"`` -> ``[1.0, 2.0]``; ``"proportional"`` (or empty) -> None.

    Raises:
        ValueError: not one positive number per source.
    """
    if text.strip() in ("", PROPORTIONAL):
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError as err:
        raise ValueError(f"--train-weights {text!r}: expected numbers separated by commas, or 'proportional'") from err
    if len(weights) != sources or any(not w > 0 for w in weights):
        raise ValueError(f"--train-weights {text!r}: expected {sources} positive numbers, one per source")
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
