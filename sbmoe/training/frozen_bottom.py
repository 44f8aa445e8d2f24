"""Frozen bottom layers whose token states are computed once per distinct text and then looked up.

Fine-tuning only the layers from K up (MoE layers included) leaves the embeddings and layers 0..K-1 unchanged, so
their output for a given token sequence is the same at every step, every epoch and every run of the same backbone.
Inside :class:`FrozenBottom`, layer 0 of the encoder returns those states from a store (computing, in eval mode and
without gradients, only the rows it has not seen) and layers 1..K-1 pass them on; the layers above run as usual.
No module is replaced (only the instances' ``forward``), so the state dict, saving and checkpoints are untouched.

Rows are keyed by their token ids up to the last real token (right padding, as BERT tokenizers pad), so a text
hits the store whatever batch it comes in. :class:`StateStore` keeps the states in memory up to a byte budget, or
in a SQLite file named after a hash of the frozen weights, which later runs of the same backbone reuse.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import nn

from sbmoe.heads.moe_block import moe_blocks
from sbmoe.heads.upcycle import encoder_layers

MEMORY_BYTES = 2**31
SQL_BATCH = 500


class StateStore:
    """Token states (float32 arrays of shape tokens x hidden) by row key: in memory up to ``memory_bytes``, or in the
    SQLite file ``path`` (created if missing) without a limit."""

    def __init__(self, hidden: int, path: str | Path | None = None, memory_bytes: int = MEMORY_BYTES) -> None:
        self.hidden, self.path, self.memory_bytes = hidden, path, memory_bytes
        self.memory: dict[bytes, np.ndarray] = {}
        self.stored_bytes = 0
        self.db = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(path), timeout=120)
            self.db.execute("CREATE TABLE IF NOT EXISTS states (key BLOB PRIMARY KEY, data BLOB NOT NULL)")

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        """The stored states of those ``keys`` that are stored."""
        if self.db is None:
            return {k: self.memory[k] for k in keys if k in self.memory}
        found: dict[bytes, np.ndarray] = {}
        unique = list(dict.fromkeys(keys))
        for i in range(0, len(unique), SQL_BATCH):
            chunk = unique[i : i + SQL_BATCH]
            marks = ",".join("?" * len(chunk))
            for key, data in self.db.execute(f"SELECT key, data FROM states WHERE key IN ({marks})", chunk):
                found[key] = np.frombuffer(data, dtype=np.float32).reshape(-1, self.hidden)
        return found

    def put_many(self, items: dict[bytes, np.ndarray]) -> None:
        """Store ``items`` (in memory: until the byte budget is spent, then no more)."""
        if self.db is not None:
            rows = [(k, np.ascontiguousarray(v, dtype=np.float32).tobytes()) for k, v in items.items()]
            with self.db:
                self.db.executemany("INSERT OR IGNORE INTO states (key, data) VALUES (?, ?)", rows)
            return
        for key, value in items.items():
            if key not in self.memory and self.stored_bytes + value.nbytes <= self.memory_bytes:
                self.memory[key] = value
                self.stored_bytes += value.nbytes

    def close(self) -> None:
        """Close the SQLite file, if any."""
        if self.db is not None:
            self.db.close()
            self.db = None


def frozen_fingerprint(model: nn.Module, layers: int) -> str:
    """A hash of the embeddings' and the first ``layers`` layers' weights: equal fingerprints, equal token states."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(f"{type(model).__name__}:{layers}".encode())
    for module in (model.embeddings, *encoder_layers(model)[:layers]):
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def row_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[list[bytes], list[int]] | None:
    """Per row, a key of its token ids up to its last real token, and that length; None if a row is not padded on
    the right (its real tokens are not a prefix), which the store cannot key."""
    counts = attention_mask.sum(dim=1, keepdim=True)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not torch.equal(attention_mask.bool(), positions[None, :] < counts):
        return None
    lengths = [int(n) for n in counts.squeeze(1).tolist()]
    ids = input_ids.to(torch.int64).cpu().numpy()
    keys = [hashlib.blake2b(ids[i, :n].tobytes(), digest_size=16).digest() for i, n in enumerate(lengths)]
    return keys, lengths


class FrozenBottom:
    """Within ``with FrozenBottom(hf_model, K, store):`` the embeddings and layers 0..K-1 of the BERT-style
    ``hf_model`` are frozen and their token states come from ``store``; on exit everything is as before (and the
    store is closed).

    Attributes:
        hits: Rows whose states came from the store.
        misses: Rows computed by the frozen layers (then stored).

    Raises:
        ValueError: ``layers`` outside 1..(number of layers - 1), or MoE layers among the frozen ones.
    """

    def __init__(self, model: nn.Module, layers: int, store: StateStore) -> None:
        self.model, self.layers, self.store = model, layers, store
        self.stack = encoder_layers(model)
        if not 0 < layers < len(self.stack):
            raise ValueError(f"frozen layers must be 1..{len(self.stack) - 1} for this {len(self.stack)}-layer model")
        frozen_moe = [b for layer in self.stack[:layers] for b in moe_blocks(layer)]
        if frozen_moe:
            raise ValueError(f"the first {layers} layers hold MoE layers, whose routers and experts must train")
        self.hits = self.misses = 0
        self.inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.requires_grad: dict[nn.Parameter, bool] = {}

    def frozen_parameters(self) -> list[nn.Parameter]:
        """The embeddings' and the frozen layers' parameters."""
        modules = (self.model.embeddings, *self.stack[: self.layers])
        return [p for module in modules for p in module.parameters()]

    def __enter__(self) -> FrozenBottom:
        for parameter in self.frozen_parameters():
            self.requires_grad[parameter] = parameter.requires_grad
            parameter.requires_grad_(False)
        self.model.forward = self._model_forward  # sentence-transformers calls forward itself: no hooks
        self.stack[0].forward = self._bottom_states
        for layer in self.stack[1 : self.layers]:
            layer.forward = _pass_on
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None):
        for layer in self.stack[: self.layers]:
            del layer.forward
        del self.model.forward
        for parameter, flag in self.requires_grad.items():
            parameter.requires_grad_(flag)
        self.requires_grad.clear()
        self.store.close()

    def stats(self) -> dict[str, Any]:
        """Frozen layers, rows looked up and rows computed."""
        return {"frozen_layers": self.layers, "hits": self.hits, "misses": self.misses}

    def _model_forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's own forward, after noting its token ids and attention mask for :meth:`_bottom_states`."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if ids is not None and mask is None:
            mask = torch.ones_like(ids)
        self.inputs = (ids, mask) if ids is not None else None
        return type(self.model).forward(self.model, *args, **kwargs)

    def _bottom_states(self, hidden_states: torch.Tensor, attention_mask: Any = None, *args: Any, **kwargs: Any):
        keyed = row_keys(*self.inputs) if self.inputs is not None else None
        if keyed is None:  # no ids (inputs_embeds) or left padding: compute, store nothing
            self.misses += len(hidden_states)
            return self._run_frozen(hidden_states, attention_mask, *args, **kwargs)
        keys, lengths = keyed
        found = self.store.get_many(keys)
        missing = [i for i, key in enumerate(keys) if key not in found]
        out = hidden_states.detach().clone()
        if missing:
            rows = torch.tensor(missing, device=hidden_states.device)
            computed = self._run_frozen(hidden_states[rows], _mask_rows(attention_mask, rows), *args, **kwargs)
            new = {keys[i]: computed[j, : lengths[i]].cpu().numpy().copy() for j, i in enumerate(missing)}
            self.store.put_many(new)
            found = {**found, **new}
        for i, key in enumerate(keys):
            out[i, : lengths[i]] = torch.tensor(found[key], dtype=out.dtype, device=out.device)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        return out

    def _run_frozen(self, hidden: torch.Tensor, attention_mask: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The frozen layers' real output (eval mode: no dropout, so the states do not depend on the step)."""
        modes = [layer.training for layer in self.stack[: self.layers]]
        try:
            with torch.no_grad():
                for layer in self.stack[: self.layers]:
                    layer.train(False)
                    hidden = type(layer).forward(layer, hidden, attention_mask, *args, **kwargs)
                    hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        finally:
            for layer, mode in zip(self.stack[: self.layers], modes, strict=True):
                layer.train(mode)
        return hidden


def _pass_on(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A frozen layer above layer 0: its output is already in the states layer 0 returned."""
    return hidden_states


def _mask_rows(mask: Any, rows: torch.Tensor) -> Any:
    """The attention mask of the chosen rows (a mask broadcast over the batch, or None, is kept as is)."""
    if isinstance(mask, torch.Tensor) and mask.dim() > 0 and mask.shape[0] > 1:
        return mask[rows]
    return mask


def open_store(model: nn.Module, layers: int, folder: str | Path | None) -> StateStore:
    """A store for ``model``'s frozen bottom: in memory, or ``folder/<fingerprint>.sqlite`` when ``folder`` is set."""
    hidden = model.config.hidden_size
    if folder is None:
        return StateStore(hidden)
    return StateStore(hidden, Path(folder) / f"{frozen_fingerprint(model, layers)}.sqlite")


def frozen_bottom(model: nn.Module, layers: int, folder: str | Path | None) -> FrozenBottom | nullcontext[None]:
    """``sbmoe finetune --frozen-layers K [--token-cache-dir DIR]``: a :class:`FrozenBottom` over ``open_store``, or
    for ``layers == 0`` a context that does nothing (and yields None)."""
    return FrozenBottom(model, layers, open_store(model, layers, folder)) if layers else nullcontext()
