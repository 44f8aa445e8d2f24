"""What each expert linear costs when quantized: output error on calibration inputs, expert activation frequency,
and the weight outlier score (MxMoE; Li et al.'s MoE PTQ benchmark)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sbmoe.heads import SBMoEHead
from sbmoe.quant.linear import BIT_WIDTHS, dequantize, expert_linears, quantize

MAX_ROWS = 4096  # calibration inputs kept per linear
EXPERT_INDEX = re.compile(r"^(?P<owner>.*?)\.?experts\.(?P<index>\d+)\.")


@dataclass
class LinearStats:
    """Calibration figures of one expert linear.

    Attributes:
        name: Qualified module name.
        params: Weights (out x in).
        frequency: Share of the routing weight its expert receives (1 / E when all are used equally).
        outlier: ``max_j(max|W_j| / mean|W_j|)`` over output channels j.
        error: Relative output error ``||X W^T - X Q(W)^T||^2 / ||X W^T||^2`` per bit width.
    """

    name: str
    params: int
    frequency: float
    outlier: float
    error: dict[int, float] = field(default_factory=dict)


def outlier_score(weight: Tensor) -> float:
    """``max_j(max|W_j| / mean|W_j|)`` over the rows (output channels) of ``weight``."""
    magnitude = weight.detach().float().abs()
    return float((magnitude.amax(dim=1) / magnitude.mean(dim=1).clamp(min=1e-12)).max())


def output_error(linear: nn.Linear, inputs: Tensor, bits: int, group_size: int | None) -> float:
    """Relative squared output error of ``linear`` quantized to ``bits`` (round to nearest) on ``inputs``; with
    no inputs (an expert no calibration input reached), the relative weight error."""
    weight = linear.weight.detach().float()
    if not len(inputs):
        inputs = torch.eye(weight.shape[1])
    codes, scale, offset = quantize(weight, bits, group_size)
    delta = inputs @ (weight - dequantize(codes, scale, offset, group_size)).T
    reference = inputs @ weight.T
    return float(delta.square().sum() / reference.square().sum().clamp(min=1e-12))


def capture_inputs(
    model: nn.Module, run: Callable[[], object], names: Sequence[str], counts: dict[str, int] | None = None
) -> dict[str, Tensor]:
    """The inputs (rows, at most :data:`MAX_ROWS`) that the linears ``names`` of ``model`` see while ``run()``;
    ``counts``, when given, receives every linear's number of input rows (tokens routed to its expert), uncapped."""
    seen: dict[str, list[Tensor]] = {name: [] for name in names}
    counts = {} if counts is None else counts
    counts.update(dict.fromkeys(names, 0))

    def hook(name: str) -> Callable[..., None]:
        def record(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            rows = args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu()
            counts[name] += len(rows)
            if sum(len(r) for r in seen[name]) < MAX_ROWS:
                seen[name].append(rows)

        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    try:
        with torch.inference_mode():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(rows)[:MAX_ROWS] if rows else torch.zeros(0) for name, rows in seen.items()}


def head_frequencies(head: SBMoEHead, embeddings: Tensor) -> Tensor:
    """Each expert's share of the gate weight over ``embeddings`` (pooled vectors) in the head's inference mode."""
    with torch.inference_mode():
        gates, _, _ = head.eval().gates(embeddings.to(next(head.parameters()).device))
    weight = gates.float().sum(dim=0).cpu()
    return weight / weight.sum().clamp(min=1e-12)


def routed_frequencies(counts: dict[str, int]) -> dict[str, Tensor]:
    """Per owner module (the name before ``experts.``), each expert's share of the rows routed to its experts, from
    the row counts of :func:`capture_inputs` (an expert's linears count the same rows: the first one named counts)."""
    per_owner: dict[str, dict[int, int]] = {}
    for name, count in counts.items():
        match = EXPERT_INDEX.match(name)
        per_owner.setdefault(match["owner"], {}).setdefault(int(match["index"]), count)
    shares = {}
    for owner, experts in per_owner.items():
        routed = torch.zeros(max(experts) + 1)
        for index, count in experts.items():
            routed[index] = count
        shares[owner] = routed / routed.sum().clamp(min=1)
    return shares


def linear_stats(
    model: nn.Module,
    inputs: dict[str, Tensor],
    frequencies: dict[str, Tensor],
    group_size: int | None,
    bit_widths: Sequence[int] = BIT_WIDTHS,
) -> list[LinearStats]:
    """Calibration figures of the expert linears of ``model`` that ``inputs`` names.

    Args:
        inputs: Captured inputs per linear name (see :func:`capture_inputs`).
        frequencies: Per owner module name (the part before ``experts.``), each expert's share of the routing;
            an owner not listed counts its experts by the rows they saw.
        group_size: Group size of the 2-4 bit widths (8 bits is always per output channel).
    """
    linears = {name: linear for name, linear in expert_linears(model) if name in inputs}
    rows = {name: len(inputs[name]) for name in linears}
    stats = []
    for name, linear in linears.items():
        match = EXPERT_INDEX.match(name)
        owner, index = match["owner"], int(match["index"])
        if owner in frequencies:
            frequency = float(frequencies[owner][index])
        else:
            siblings = [rows[n] for n in linears if EXPERT_INDEX.match(n)["owner"] == owner]
            frequency = rows[name] / max(1, sum(siblings))
        errors = {b: output_error(linear, inputs[name], b, group_for(b, group_size)) for b in bit_widths}
        stats.append(LinearStats(name, linear.weight.numel(), frequency, outlier_score(linear.weight), errors))
    return stats


def group_for(bits: int, group_size: int | None) -> int | None:
    """The group size used at ``bits``: per output channel at 8 bits, ``group_size`` below."""
    return None if bits >= 8 else group_size
