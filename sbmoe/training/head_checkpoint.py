"""The head trainer's record (:class:`HeadTrainResult`), the state it carries between epochs, and its checkpoint:
written atomically after each epoch, resumed only by the run that wrote it (same settings, data and head)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from sbmoe.files import atomic_file
from sbmoe.heads.sbmoe_head import SBMoEHead

logger = logging.getLogger("sbmoe.training.head_trainer")

CHECKPOINT_FILE = "state.pt"
CHECKPOINT_FORMAT = 2


@dataclass
class HeadTrainResult:
    """What :func:`~sbmoe.training.head_trainer.train_head` measured: mean loss and dev score per epoch, the epoch
    kept and why.

    ``initial_dev_score`` is the dev score before training (epoch 0, a candidate like any epoch); ``best_epoch`` 0
    means the untrained head (the backbone, for a head that starts as it) won. ``selectable_from`` is the first
    epoch that may be kept (PSR: the first whose candidate pool is fully open). ``batch_shares`` is the share of
    batches each training source got. ``resumed_from`` is the epoch of the checkpoint training resumed from (0: from
    the start); ``kept`` says in words which epoch the head holds and why.
    """

    losses: list[float] = field(default_factory=list)
    aux_losses: list[float] = field(default_factory=list)
    domain_losses: list[float] = field(default_factory=list)
    dev_scores: list[float] = field(default_factory=list)
    initial_dev_score: float | None = None
    best_epoch: int = 0
    selectable_from: int = 1
    stopped_early: bool = False
    batch_shares: list[float] = field(default_factory=list)
    resumed_from: int = 0
    kept: str = ""


@dataclass
class Progress:
    """Everything the loop carries from epoch to epoch besides the head and optimizer (checkpointed with them)."""

    result: HeadTrainResult
    best_state: dict[str, Tensor]
    best_score: float = -math.inf
    stale: int = 0
    batch_counts: list[int] = field(default_factory=list)

    @property
    def epoch(self) -> int:
        return len(self.result.losses)


def run_key(head: SBMoEHead, settings: dict[str, Any], *data: Tensor | None) -> str:
    """A fingerprint of what decides a run's weights (settings, data tensors, the head's configuration and initial
    weights), bar the number of epochs: a checkpoint resumes only its own run."""
    digest = hashlib.blake2b(digest_size=16)
    head_config = head.get_config_dict() if hasattr(head, "get_config_dict") else {}
    digest.update(json.dumps([settings, head_config], sort_keys=True, default=str).encode())
    for tensor in (*(t for t in data if t is not None), *head.state_dict().values()):
        digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Loop(NamedTuple):
    """What a checkpoint saves and restores: the head, its optimizer, the batch-order generator, the progress."""

    head: SBMoEHead
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    progress: Progress


def save(file: Path, key: str, loop: Loop) -> None:
    """Write the state after an epoch to ``file`` atomically (a kill leaves the previous epoch's state)."""
    head, optimizer, generator, progress = loop
    state = {
        "format": CHECKPOINT_FORMAT,
        "key": key,
        "head": head.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "result": asdict(progress.result),
        "best_state": progress.best_state,
        "best_score": progress.best_score,
        "stale": progress.stale,
        "batch_counts": progress.batch_counts,
    }
    with atomic_file(file) as tmp:
        torch.save(state, tmp)


def resume(file: Path, key: str, loop: Loop) -> None:
    """Load the checkpoint ``file`` into head, optimizer, random generators and progress, if it is this run's."""
    head, optimizer, generator, progress = loop
    if not file.is_file():
        logger.warning("--resume: no head checkpoint at %s, starting from the first epoch", file)
        return
    try:
        state: dict[str, Any] = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as err:
        logger.warning("--resume: %s cannot be read (%s); starting from the first epoch", file, err)
        return
    if state.get("format") != CHECKPOINT_FORMAT or state.get("key") != key:
        logger.warning("--resume: %s is another run's (other settings or data); starting from the first epoch", file)
        return
    head.load_state_dict(state["head"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    progress.result = HeadTrainResult(**state["result"])
    progress.best_state, progress.best_score, progress.stale = state["best_state"], state["best_score"], state["stale"]
    progress.batch_counts = state["batch_counts"]
    progress.result.resumed_from = progress.epoch
    logger.info("--resume: continuing after epoch %d from %s", progress.epoch, file)
