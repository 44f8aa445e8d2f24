"""Expert residency at inference: the experts of MoE blocks are not all resident in float, but stored packed or on
disk and made ready (dequantised / read) only when a batch needs them.

- ``mode="on-demand"``: an expert is made ready when its block reaches it, used, and dropped.
- ``mode="ahead"``: with pre-gating, block l knows block l+1's experts (the pre-gate plan) before it computes; a
  background worker makes them ready while block l (and block l+1's attention) computes, at most ``lookahead``
  experts ahead of use. The first block, which gates itself, is served on demand. On a GPU the stored experts stay
  in host memory and the worker copies them to the device on a side CUDA stream.

Storage: ``packed`` keeps round-to-nearest low-bit codes in memory (:mod:`sbmoe.quant.linear`, 4 bits by default);
``disk`` writes float32 experts to a safetensors file and reads each one when needed (exact: embeddings equal the
all-resident model's). :class:`ExpertResidency` counts the bytes of ready experts, so ``peak_ready_bytes`` plus
``stored_bytes`` is the experts' peak memory.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from sbmoe.files import atomic_file
from sbmoe.heads.experts import FeedForwardExpert
from sbmoe.heads.moe_block import MoEBlock, Routing, moe_blocks
from sbmoe.quant.linear import dequantize, pack, quantize, unpack

RESIDENCY_MODES = ("on-demand", "ahead")
STORAGES = ("packed", "disk")
ExpertWeights = tuple[Tensor, Tensor, Tensor, Tensor]  # up weight, up bias, down weight, down bias
Key = tuple[int, int]  # (owner block index, expert)


class PackedStore:
    """Experts as packed low-bit codes (fp16 scale and offset per output channel or group) and float32 biases."""

    def __init__(self, experts: dict[Key, FeedForwardExpert], bits: int = 4, group_size: int | None = None):
        self.bits, self.group_size = bits, group_size
        self.entries: dict[Key, list[tuple[Tensor, Tensor, Tensor, tuple[int, int], Tensor]]] = {}
        for key, expert in experts.items():
            parts = []
            for linear in (expert.up, expert.down):
                codes, scale, offset = quantize(linear.weight, bits, group_size)
                bias = linear.bias.detach().cpu().clone()
                parts.append((pack(codes, bits), scale.cpu(), offset.cpu(), tuple(codes.shape), bias))
            self.entries[key] = parts
        self.nbytes = sum(t.nbytes for parts in self.entries.values() for p in parts for t in (p[0], p[1], p[2], p[4]))

    def ready(self, key: Key) -> ExpertWeights:
        """The expert's float32 weights, dequantised."""
        (up_packed, up_scale, up_offset, up_shape, up_bias), down = self.entries[key]
        up = dequantize(unpack(up_packed, self.bits, up_shape), up_scale, up_offset, self.group_size)
        down_weight = dequantize(unpack(down[0], self.bits, down[3]), down[1], down[2], self.group_size)
        return up, up_bias, down_weight, down[4]


class DiskStore:
    """Float32 experts in one safetensors file, each read (memory-mapped, then copied) when needed."""

    def __init__(self, experts: dict[Key, FeedForwardExpert], path: str | Path):
        tensors = {}
        for (block, e), expert in experts.items():
            for part in ("up", "down"):
                linear = getattr(expert, part)
                tensors[f"{block}.{e}.{part}.weight"] = linear.weight.detach().contiguous()
                tensors[f"{block}.{e}.{part}.bias"] = linear.bias.detach().contiguous()
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp))
        self.file = safe_open(str(path), framework="pt")
        self.nbytes = 0  # the page cache holds the file, not this process's heap

    def ready(self, key: Key) -> ExpertWeights:
        """The expert's float32 weights, read from the file."""
        block, e = key
        names = [f"{block}.{e}.{part}.{kind}" for part in ("up", "down") for kind in ("weight", "bias")]
        return tuple(self.file.get_tensor(name) for name in names)  # type: ignore[return-value]


class ResidentBank(nn.Module):
    """Stands in for a block's :class:`~sbmoe.heads.experts.ExpertBank`: ``bank[e](x)`` runs expert e with the
    weights its :class:`ExpertResidency` makes ready."""

    def __init__(self, residency: ExpertResidency, owner: int, size: int, activation: Callable[[Tensor], Tensor]):
        super().__init__()
        self.residency, self.owner, self.size, self.activation = residency, owner, size, activation

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, expert: int) -> Callable[[Tensor], Tensor]:
        return lambda x: self.residency.run(self.owner, expert, x, self.activation)


class ExpertResidency:
    """Moves the experts of every MoE block of ``model`` out of float residency, in place (see the module docstring).

    Args:
        model: A model whose MoE blocks are in eval mode (inference only).
        mode: ``on-demand`` or ``ahead`` (needs ``pregate``).
        storage: ``packed`` or ``disk``.
        bits: Bits per packed weight.
        group_size: Input columns per packed scale (None: one per output channel).
        path: The safetensors file of ``disk`` storage.
        lookahead: Ready experts the ``ahead`` worker may hold before they are used.

    Raises:
        ValueError: an unknown mode or storage, ``ahead`` without pre-gating, ``disk`` without a path.
    """

    def __init__(
        self,
        model: nn.Module,
        mode: str = "ahead",
        storage: str = "packed",
        bits: int = 4,
        group_size: int | None = None,
        path: str | Path | None = None,
        lookahead: int = 4,
    ):
        self.blocks = moe_blocks(model)
        if mode not in RESIDENCY_MODES or storage not in STORAGES:
            raise ValueError(f"mode must be one of {RESIDENCY_MODES} and storage one of {STORAGES}")
        if mode == "ahead" and not all(block.pregate for block in self.blocks):
            raise ValueError("ahead-of-time experts need the pre-gate plan: build the model with pregate=True")
        if storage == "disk" and path is None:
            raise ValueError("disk storage needs path=, the safetensors file to keep the experts in")
        experts = {(b.index, e): expert for b in self.blocks for e, expert in enumerate(b.experts)}
        self.resident_fp32_bytes = sum(p.nbytes for expert in experts.values() for p in expert.parameters())
        self.store = PackedStore(experts, bits, group_size) if storage == "packed" else DiskStore(experts, path)
        self.stored_bytes = self.store.nbytes
        self.mode, self.lookahead = mode, lookahead
        self.device = self.blocks[0].router.net[0].weight.device
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" and mode == "ahead" else None
        self.ready_bytes = self.peak_ready_bytes = 0
        self.served = {"ahead": 0, "on_demand": 0}
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(lookahead)
        self._pending: dict[tuple[int, Key], Future[tuple[ExpertWeights, torch.cuda.Event | None]]] = {}
        self._worker = _single_threaded_worker() if mode == "ahead" else None
        self._consumer = 0
        for block in self.blocks:
            activation = block.experts[0].act
            block.experts = ResidentBank(self, block.index, block.num_experts, activation)
            block.register_forward_pre_hook(self._enter)
            if mode == "ahead":
                block.on_plan = self._schedule

    def _enter(self, block: MoEBlock, _args: Any) -> None:
        """A block starts: the experts ``run`` serves are its (the first block also drops any stale plan)."""
        if block.index == 0:
            for future in self._pending.values():
                self._account(-_nbytes(future.result()[0]))
                self._slots.release()
            self._pending.clear()
        self._consumer = block.index

    def _schedule(self, block: MoEBlock, routing: Routing) -> None:
        """Have the worker make ready, in the order ``block`` will use them, the experts its plan names."""
        size = block.num_experts
        for candidate in torch.unique(routing.indices).tolist():
            key = (block.group[candidate // size].index, candidate % size)
            self._pending[(block.index, key)] = self._worker.submit(self._prepare_ahead, key)

    def _prepare_ahead(self, key: Key) -> tuple[ExpertWeights, torch.cuda.Event | None]:
        """Make an expert ready on the worker; on a GPU, copied on a side stream (the event marks the copy's end)."""
        self._slots.acquire()
        weights, event = self.store.ready(key), None
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                weights = tuple(t.pin_memory().to(self.device, non_blocking=True) for t in weights)
                event = torch.cuda.Event()
                event.record(self._stream)
        self._account(_nbytes(weights))
        return weights, event

    def run(self, owner: int, expert: int, x: Tensor, activation: Callable[[Tensor], Tensor]) -> Tensor:
        """Expert ``expert`` of block ``owner`` on ``x``: ready ahead when planned, else made ready now."""
        future = self._pending.pop((self._consumer, (owner, expert)), None)
        if future is None:
            weights = tuple(t.to(self.device) for t in self.store.ready((owner, expert)))
            self._account(_nbytes(weights))
            self.served["on_demand"] += 1
        else:
            weights, event = future.result()
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
            self._slots.release()
            self.served["ahead"] += 1
        up, up_bias, down, down_bias = weights
        y = F.linear(activation(F.linear(x, up, up_bias)), down, down_bias)
        self._account(-_nbytes(weights))
        return y

    def _account(self, nbytes: int) -> None:
        with self._lock:
            self.ready_bytes += nbytes
            self.peak_ready_bytes = max(self.peak_ready_bytes, self.ready_bytes)

    def reset_peak(self) -> None:
        """Start counting the peak of ready experts afresh (e.g. after a warm-up)."""
        with self._lock:
            self.peak_ready_bytes = self.ready_bytes

    def stats(self) -> dict[str, int]:
        """Bytes of all experts resident in float32, of the stored experts and of the peak of ready ones (stored +
        peak: the experts' peak memory), and how many expert runs were served ahead and on demand."""
        return {
            "resident_fp32_bytes": self.resident_fp32_bytes,
            "stored_bytes": self.stored_bytes,
            "peak_ready_bytes": self.peak_ready_bytes,
            "served_ahead": self.served["ahead"],
            "served_on_demand": self.served["on_demand"],
        }

    def close(self) -> None:
        """Stop the worker (the model keeps serving experts on demand)."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        self.mode = "on-demand"
        for block in self.blocks:
            block.on_plan = None


def _single_threaded_worker() -> ThreadPoolExecutor:
    """The ``ahead`` worker: one thread whose torch ops run single-threaded, so readying experts does not start a
    second team of compute threads on the cores the encoder uses. ``torch.set_num_threads`` is per thread for the
    team a thread starts but also sets the default of later threads, so the caller's setting is put back."""
    threads = torch.get_num_threads()
    worker = ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="expert-ready", initializer=torch.set_num_threads, initargs=(1,)
    )
    worker.submit(torch.get_num_threads).result()  # the thread exists and has run its initializer
    torch.set_num_threads(threads)
    return worker


def _nbytes(weights: ExpertWeights) -> int:
    return sum(t.nbytes for t in weights)
