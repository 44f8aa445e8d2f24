"""Round-to-nearest weight quantization (2 to 8 bits, per output channel or per group) and a packed linear layer.

A weight ``W`` (out x in) is cut into groups of ``group_size`` input columns (the whole row when None); each
group keeps an fp16 ``scale`` and ``offset`` and integer codes ``q = round((W - offset) / scale)`` in
``[0, 2**bits - 1]``, so ``W ~ q * scale + offset`` and the error is at most ``scale / 2`` per weight. Codes are
bit-packed: ``out * in * bits / 8`` bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

BIT_WIDTHS = (2, 3, 4, 8)
EXPERT_MARK = "experts."  # linears whose qualified name contains this are experts
KEEP_MARK = "router"  # ... unless it contains this: routers stay in full precision


def groups_of(in_features: int, group_size: int | None) -> int:
    """Groups per row: 1 per output channel (``group_size`` None) or ``ceil(in / group_size)``."""
    return 1 if group_size is None else math.ceil(in_features / group_size)


def quantize(weight: Tensor, bits: int, group_size: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest asymmetric quantization of ``weight`` (out x in).

    Returns:
        ``(codes, scale, offset)``: uint8 codes (out x in), fp16 scale and offset (out x groups).
    """
    if bits not in BIT_WIDTHS:
        raise ValueError(f"bits={bits}: expected one of {BIT_WIDTHS}")
    grouped = _grouped(weight.detach().float(), group_size)  # out x groups x size
    low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
    levels = 2**bits - 1
    scale = ((high - low) / levels).clamp(min=1e-8).half()
    offset = low.half()
    codes = ((grouped - offset.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)).round().clamp(0, levels)
    return codes.reshape(grouped.shape[0], -1)[:, : weight.shape[1]].to(torch.uint8), scale, offset


def dequantize(codes: Tensor, scale: Tensor, offset: Tensor, group_size: int | None = None) -> Tensor:
    """The float32 weight ``codes * scale + offset`` (the inverse of :func:`quantize` up to rounding)."""
    out, in_features = codes.shape
    grouped = _grouped(codes.float(), group_size)
    weight = grouped * scale.float().unsqueeze(-1) + offset.float().unsqueeze(-1)
    return weight.reshape(out, -1)[:, :in_features].contiguous()


def _grouped(x: Tensor, group_size: int | None) -> Tensor:
    """``x`` (out x in) as out x groups x size, the last group zero-padded."""
    out, in_features = x.shape
    size = in_features if group_size is None else group_size
    pad = groups_of(in_features, group_size) * size - in_features
    if pad:
        x = torch.cat([x, x[:, -1:].expand(out, pad)], dim=1)  # repeat the last column: no effect on min/max
    return x.reshape(out, -1, size)


def pack(codes: Tensor, bits: int) -> Tensor:
    """Codes (< 2**bits) -> a flat uint8 tensor of ``ceil(codes.numel() * bits / 8)`` bytes."""
    flat = codes.reshape(-1).cpu().numpy().astype(np.uint8)
    planes = np.unpackbits(flat[:, None], axis=1, bitorder="little")[:, :bits]
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack(packed: Tensor, bits: int, shape: tuple[int, int]) -> Tensor:
    """The inverse of :func:`pack`: uint8 codes of ``shape`` (4 and 8 bits by whole nibbles and bytes)."""
    count = shape[0] * shape[1]
    if bits == 8:
        return packed[:count].reshape(shape).clone()
    if bits == 4:  # code 2j is byte j's low nibble, code 2j + 1 its high nibble (little bit order)
        return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1)[:count].reshape(shape)
    planes = np.unpackbits(packed.cpu().numpy(), bitorder="little")[: count * bits].reshape(count, bits)
    codes = np.packbits(planes, axis=1, bitorder="little")[:, 0]
    return torch.from_numpy(codes).reshape(shape)


class PackedLinear(nn.Module):
    """A linear layer whose weight is stored as packed low-bit codes with fp16 group scales and offsets.

    The float weight is rebuilt on first use and kept (not saved) for later calls.

    Args:
        in_features: Input size.
        out_features: Output size.
        bits: Bits per weight (2, 3, 4 or 8).
        group_size: Input columns per scale (None: one scale per output channel).
        bias: Whether the layer has a (float32) bias.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None, bias: bool = True):
        super().__init__()
        if bits not in BIT_WIDTHS:
            raise ValueError(f"bits={bits}: expected one of {BIT_WIDTHS}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = groups_of(in_features, group_size)
        self.register_buffer(
            "packed", torch.zeros(math.ceil(in_features * out_features * bits / 8), dtype=torch.uint8)
        )
        self.register_buffer("scale", torch.zeros(out_features, groups, dtype=torch.float16))
        self.register_buffer("offset", torch.zeros(out_features, groups, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._weight: Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None = None) -> PackedLinear:
        """Quantize ``linear`` to ``bits`` (round to nearest)."""
        packed = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None)
        codes, scale, offset = quantize(linear.weight, bits, group_size)
        packed.packed.copy_(pack(codes, bits))
        packed.scale.copy_(scale)
        packed.offset.copy_(offset)
        if linear.bias is not None:
            packed.bias.data.copy_(linear.bias.detach())
        return packed.to(linear.weight.device)

    def weight(self) -> Tensor:
        """The dequantized float32 weight (out x in)."""
        if self._weight is None or self._weight.device != self.scale.device:
            codes = unpack(self.packed, self.bits, (self.out_features, self.in_features)).to(self.scale.device)
            self._weight = dequantize(codes, self.scale, self.offset, self.group_size)
        return self._weight

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._weight = None  # new codes: rebuild the weight on next use
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


def expert_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every expert linear (plain or packed) in ``model``: a name containing
    ``experts.`` and no ``router``."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | PackedLinear) and EXPERT_MARK in name and KEEP_MARK not in name:
            yield name, module


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule called ``name`` (in place)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_experts(module: nn.Module, bits: dict[str, int], group_size: dict[str, int | None]) -> nn.Module:
    """Quantize, in place, the expert linears of any module (the head's, or experts inside encoder layers) that
    ``bits`` names; routers and other linears keep full precision."""
    for name, linear in list(expert_linears(module)):
        if name in bits and isinstance(linear, nn.Linear):
            replace_module(module, name, PackedLinear.from_linear(linear, bits[name], group_size[name]))
    return module
