"""Full fine-tuning (backbone and head) with the SentenceTransformerTrainer, the qrel-aware loss, and model
selection on dev: the model before training and every ``--eval-steps`` checkpoint are candidates, the best is kept."""

from __future__ import annotations

import copy
import functools
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from sbmoe.files import last_complete_checkpoint
from sbmoe.heads.base import PooledHead
from sbmoe.heads.moe_block import moe_blocks, set_psr
from sbmoe.model import SBMoEModel
from sbmoe.training.arguments import FinetuneArguments
from sbmoe.training.losses import MoEContrastiveLoss, QrelAwareInfoNCE
from sbmoe.training.prepared import PreparedData, dev_ndcg_full
from sbmoe.training.sampling import WeightedSourceBatchSampler, batches_per_source, parse_weights

logger = logging.getLogger(__name__)


def train_full_mode(
    model: SBMoEModel, args: FinetuneArguments, prepared: PreparedData, callbacks: list[TrainerCallback]
) -> dict[str, Any]:
    """Train backbone and head with the SentenceTransformerTrainer (checkpoints, resume, mixed precision); with a
    dev split, end holding the best dev candidate (step 0, the untrained model, included)."""
    from datasets import DatasetDict
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers

    settings = args.training
    train_dataset = DatasetDict({source.name: _columns(prepared, i) for i, source in enumerate(prepared.sources)})
    if len(prepared.sources) == 1:
        train_dataset = train_dataset[prepared.sources[0].name]
    sizes = [source.examples for source in prepared.sources]
    weights = parse_weights(args.data.train_weights, sizes)
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    head_name = next((name for name, module in model.named_children() if isinstance(module, PooledHead)), None)
    rates = {rf"^model\.{head_name}\.": settings.learning_rate} if head_name else {}
    if moe_blocks(model[0]):  # the MoE layers' fresh routers learn at the head's rate
        rates[r"\.intermediate\.router\."] = settings.learning_rate
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(Path(settings.output_dir) / "checkpoints"),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.backbone_learning_rate,
        learning_rate_mapping=rates,
        weight_decay=settings.weight_decay,
        warmup_steps=0.1,
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=bf16,
        fp16=cuda and not bf16,
        use_cpu=not cuda,  # without it the Trainer ignores torchrun on CPU (each rank trains alone); with it, gloo
        dataloader_pin_memory=cuda,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        router_mapping={c: "query" if c == "query" else "document" for c in _text_columns(prepared)},
        multi_dataset_batch_sampler=functools.partial(WeightedSourceBatchSampler, weights=weights),
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=2,
        logging_steps=settings.logging_steps,
        logging_nan_inf_filter=False,
        report_to="none",
    )
    contrastive = QrelAwareInfoNCE(
        settings.similarity, settings.temperature, prepared.relevant, len(prepared.docs), settings.symmetric_loss
    )
    loss = MoEContrastiveLoss(model, contrastive, prepared.rows, settings.aux_loss_weight, settings.z_loss_weight)
    selection = DevSelection(model, prepared, args) if prepared.dev_queries else None
    extra = [PSRProgress(model), *([selection] if selection else [])]
    trainer = SentenceTransformerTrainer(
        model=model, args=training_args, train_dataset=train_dataset, loss=loss, callbacks=[*callbacks, *extra]
    )
    checkpoint = last_complete_checkpoint(training_args.output_dir) if settings.resume else None
    if settings.resume and checkpoint is None:
        logger.warning("--resume: no complete checkpoint under %s, starting from scratch", training_args.output_dir)
    elif checkpoint is not None:
        logger.info("--resume: continuing from %s", checkpoint)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    counts = batches_per_source(sizes, settings.batch_size, weights)
    history: dict[str, Any] = {"log_history": trainer.state.log_history, "global_step": trainer.state.global_step}
    history["batch_shares"] = [c / sum(counts) for c in counts]
    if selection is not None:
        history.update(selection.finish())
    return history


class PSRProgress(TrainerCallback):
    """Tells every MoE block of the model the training progress (for progressive scaling routing) at each step:
    the share of the run's planned steps done."""

    def __init__(self, model: SBMoEModel):
        self.model = model

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        set_psr(self.model, progress=state.global_step / max(state.max_steps, 1))


class DevSelection(TrainerCallback):
    """Scores dev before training (step 0) and every ``--eval-steps`` steps (0: at each epoch's end) and at the
    last step, keeping the weights of the best candidate; with PSR, steps before every MoE block's pool is fully
    open are scored but not candidates. :meth:`finish` loads the best weights and says which step won."""

    def __init__(self, model: SBMoEModel, prepared: PreparedData, args: FinetuneArguments) -> None:
        self.model, self.prepared, self.args = model, prepared, args
        self.scores: dict[int, float] = {}
        self.best_step, self.best_score, self.best_state = 0, float("-inf"), None
        opens = [block.psr_until for block in moe_blocks(model) if block.psr != "none"]
        self.opens_at = max(opens, default=0.0)

    def _score(self, step: int, max_steps: int) -> None:
        if step in self.scores:
            return
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            score = dev_ndcg_full(self.model, self.prepared, weighting=self.args.data.dev_weighting)["metrics"][
                "nDCG@10"
            ]
        self.model.train(was_training)
        self.scores[step] = score
        candidate = step == 0 or step / max(max_steps, 1) >= self.opens_at
        if candidate and score > self.best_score:
            self.best_step, self.best_score = step, score
            self.best_state = copy.deepcopy(self.model.state_dict())
        logger.info("step %d/%d: dev nDCG@10 %.4f%s", step, max_steps, score, "" if candidate else " (PSR: not open)")

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._score(state.global_step, state.max_steps)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        every = self.args.training.eval_steps
        if (every and state.global_step % every == 0) or state.global_step == state.max_steps:
            self._score(state.global_step, state.max_steps)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.args.training.eval_steps:
            self._score(state.global_step, state.max_steps)

    def finish(self) -> dict[str, Any]:
        """Load the best candidate's weights; what run.json records of the selection."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        last = max(self.scores)
        if self.best_step == 0:
            kept = f"kept step 0, the model before training: best dev nDCG@10 {self.best_score:.4f}"
        else:
            kept = f"kept step {self.best_step} of {last}: best dev nDCG@10 {self.best_score:.4f}"
        if self.best_step != last:
            kept += f"; the last step scored {self.scores[last]:.4f}"
        logger.info(kept)
        return {
            "dev_scores": {str(k): v for k, v in sorted(self.scores.items())},
            "best_step": self.best_step,
            "kept": kept,
        }


def _text_columns(prepared: PreparedData) -> list[str]:
    """The text columns of every source's dataset: query, positive, negative_1..."""
    width = prepared.rows.shape[1]
    return ["query", "positive", *(f"negative_{j - 1}" for j in range(2, width))]


def _columns(prepared: PreparedData, source: int) -> Any:
    """One source's rows as a ``datasets.Dataset`` of texts (query, positive, negative_1...) and ``label``, the
    row's index into ``prepared.rows`` (the loss looks its qrels up by it)."""
    from datasets import Dataset

    indices = torch.nonzero(prepared.row_source == source).squeeze(1)
    rows = prepared.rows[indices].tolist()
    names = _text_columns(prepared)
    columns = {"query": [prepared.anchor_texts[r[0]] for r in rows]}
    for j, name in enumerate(names[1:], start=1):
        columns[name] = [prepared.doc_texts[r[j]] for r in rows]
    columns["label"] = indices.tolist()
    return Dataset.from_dict(columns)
