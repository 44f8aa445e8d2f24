"""Hard negatives mined with the backbone alone, as sentence-transformers' ``mine_hard_negatives`` selects them.

Mining reads the cached pooled backbone vectors (never a head), so every head, seed and training mode of one
backbone and training set gets the same negatives; the result is cached under the cache home, keyed by the vectors,
the judged documents and the settings, so later runs load it instead of searching again.

Selection per anchor (:class:`MiningArguments`): the documents ranked ``negatives_skip`` .. ``negatives_depth`` by
similarity, minus every document judged relevant to the anchor, minus those scoring within the margins
(``negatives_margin``, ``negatives_relative_margin``) of the anchor's weakest positive (likely unjudged positives);
then the ``hard_negatives`` best of them (``top``) or a seeded random draw (``random``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from sbmoe.files import atomic_file
from sbmoe.paths import cache_dir

logger = logging.getLogger(__name__)


@dataclass
class MiningArguments:
    """How negatives are chosen (the ``finetune`` flags ``--hard-negatives``, ``--negatives-*``): as
    sentence-transformers' ``mine_hard_negatives`` arguments ``num_negatives``, ``range_min``, ``range_max``,
    ``absolute_margin``, ``relative_margin`` and ``sampling_strategy``."""

    _argument_group_name = "hard negatives (mined once with the backbone, cached)"

    hard_negatives: int = field(default=7, metadata={"help": "negatives per query, mined with the backbone alone"})
    negatives_skip: int = field(
        default=10, metadata={"help": "mining: top-ranked non-positives skipped (likely unjudged positives)"}
    )
    negatives_depth: int = field(default=100, metadata={"help": "mining: negatives come from the top DEPTH ranks"})
    negatives_margin: float = field(
        default=0.0, metadata={"help": "mining: a negative scores at most the weakest positive minus this"}
    )
    negatives_relative_margin: float = field(
        default=0.05, metadata={"help": "mining: a negative scores at most (1 - this) x the weakest positive"}
    )
    negatives_sampling: Literal["top", "random"] = field(
        default="top", metadata={"help": "mining: the best eligible negatives, or a random draw of them"}
    )


def mine_negatives(
    query_emb: Tensor, doc_emb: Tensor, positives: Sequence[set[int]], settings: MiningArguments
) -> np.ndarray:
    """Q x ``settings.hard_negatives`` document rows per anchor (see the module docstring); an anchor with fewer
    eligible documents repeats its last one, and one with none gets the lowest-ranked non-positive of the range.

    Args:
        query_emb: Q x H anchor embeddings of the backbone (normalised for cosine similarity).
        doc_emb: D x H document embeddings of the backbone.
        positives: Per anchor, the rows of every document judged relevant to it.
        settings: Range, margins, count and sampling.
    """
    from sbmoe.retrieval.rescore import exact_top_k

    depth = settings.negatives_depth + max((len(p) for p in positives), default=0)
    scores, rows = exact_top_k(query_emb.numpy(), doc_emb.numpy(), depth)
    rng = np.random.default_rng(0)  # fixed, not the run's seed: every run shares the draw
    mined = np.zeros((len(positives), settings.hard_negatives), dtype=np.int64)
    for i, pos in enumerate(positives):
        pos_rows = torch.tensor(sorted(pos), dtype=torch.long)
        weakest = float((query_emb[i] @ doc_emb[pos_rows].T).min()) if len(pos_rows) else np.inf
        limit = min(weakest - settings.negatives_margin, weakest * (1 - settings.negatives_relative_margin))
        ranked = [(int(r), float(s)) for r, s in zip(rows[i], scores[i], strict=True) if r >= 0 and int(r) not in pos]
        window = ranked[settings.negatives_skip : settings.negatives_depth]
        kept = [r for r, s in window if s <= limit] or [r for r, _ in window[-1:]] or [r for r, _ in ranked[-1:]]
        if settings.negatives_sampling == "random" and len(kept) > settings.hard_negatives:
            kept = sorted(rng.choice(kept, settings.hard_negatives, replace=False).tolist(), key=kept.index)
        mined[i] = (kept + kept[-1:] * settings.hard_negatives)[: settings.hard_negatives] if kept else 0
    return mined


def cached_negatives(
    query_emb: Tensor, doc_emb: Tensor, positives: Sequence[set[int]], settings: MiningArguments
) -> np.ndarray:
    """:func:`mine_negatives`, loaded from the cache home when these vectors, positives and settings were mined
    before (written atomically otherwise)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(sorted(asdict(settings).items())).encode())
    for tensor in (query_emb, doc_emb):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    digest.update(repr([sorted(p) for p in positives]).encode())
    file = cache_dir() / "negatives" / f"{digest.hexdigest()}.npy"
    if file.is_file():
        logger.info("hard negatives: reusing %s", file)
        return np.load(file)
    mined = mine_negatives(query_emb, doc_emb, positives, settings)
    file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(file) as tmp, open(tmp, "wb") as handle:
        np.save(handle, mined)
    logger.info("hard negatives: mined %d x %d with the backbone, cached in %s", *mined.shape, file)
    return mined
