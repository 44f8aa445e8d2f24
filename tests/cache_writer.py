"""Two processes writing one embedding cache entry at once: ``python tests/cache_writer.py MODEL OUT CACHE...``.

For each cache folder, two forked processes encode the same texts into it; each waits at a barrier before putting
its entry in place, so both encode and then both publish (the race of two ``sbmoe evaluate`` runs started
together). Process ``w`` of cache ``i`` saves what it got to ``OUT/i-w.npy`` and its metadata to ``OUT/i-w.json``.
sbmoe is imported once, before the forks.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

import sbmoe.retrieval.cache as cache_module
from sbmoe.model import build_model

TEXTS = ["the cell protein", "a gene study", "blood risk increase", "dense vector search index", "virus dna"]


def encode_together(model_dir: str, cache: str, barrier: Any, out: Path) -> None:
    """Encode :data:`TEXTS` into ``cache``, waiting at ``barrier`` before publishing; save the result to ``out``
    (the metadata with the inode of the file it returned)."""
    publish = cache_module._publish

    def publish_together(tmp: Path, folder: Path) -> None:
        barrier.wait()
        publish(tmp, folder)

    cache_module._publish = publish_together
    model = build_model(model_dir, max_seq_length=64)
    vectors, meta = cache_module.cached_embeddings(model, TEXTS, "queries", cache, show_progress=False)
    np.save(out.with_suffix(".npy"), np.array(vectors))
    out.with_suffix(".json").write_text(json.dumps({**meta, "inode": os.stat(vectors.filename).st_ino}))


def main(model_dir: str, out: str, *caches: str) -> None:
    """Race two writers into each of ``caches``; exit 1 if any writer failed."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    context = multiprocessing.get_context("fork")
    for i, cache in enumerate(caches):
        barrier = context.Barrier(2)
        writers = [
            context.Process(target=encode_together, args=(model_dir, cache, barrier, Path(out) / f"{i}-{w}"))
            for w in range(2)
        ]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join()
        if any(writer.exitcode != 0 for writer in writers):
            sys.exit(1)


if __name__ == "__main__":
    main(*sys.argv[1:])
