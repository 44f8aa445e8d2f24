"""MoE layers inside a BERT-style encoder by sparse upcycling, and the Transformer module that saves and reloads them.

:func:`upcycle_encoder` replaces the feed-forward block (``intermediate`` + ``output.dense``) of the chosen layers
with a :class:`~sbmoe.heads.moe_block.MoEBlock` whose experts start from the dense weights, so that at
initialisation the encoder computes what the backbone did:

- ``init="copies"``: every expert is a copy of the dense block; top-k gates renormalised over the chosen experts
  sum to 1, so any choice gives the dense output (Komatsuzaki et al.).
- ``init="fine"``: the dense block's hidden units are split into ``top_k`` slices; expert e holds slice ``e % top_k``
  (output bias divided by ``top_k``) and each token takes the best expert of every slice class, so the chosen slices
  add up to the dense block (ReXMoE's fine-grained experts; active compute equals the dense layer's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from sentence_transformers.sentence_transformer.modules import Transformer
from torch import nn

from sbmoe.heads.config import MoELayers, MoELayersConfig
from sbmoe.heads.moe_block import MoEBlock, link_blocks, moe_blocks, set_psr
from sbmoe.heads.usage import RoutingRecorder
from sbmoe.quiet import quiet_loading


def moe_layer_indices(spec: MoELayers, num_layers: int) -> list[int]:
    """Layer indices from ``"all"``, ``"every-K"`` (layers K-1, 2K-1, ...: every second layer from the second for
    K = 2, as Nomic Embed v2), a comma-separated string or a list of indices.

    Raises:
        ValueError: an unknown spec, an index out of range, or no layer at all.
    """
    if isinstance(spec, str):
        if spec == "all":
            indices = list(range(num_layers))
        elif spec.startswith("every-") and spec[6:].isdigit() and int(spec[6:]) > 0:
            step = int(spec[6:])
            indices = [i for i in range(num_layers) if i % step == step - 1]
        elif all(part.strip().lstrip("-").isdigit() for part in spec.split(",")):
            indices = [int(part) for part in spec.split(",")]
        else:
            raise ValueError(f"moe_layers must be 'all', 'every-K' or layer indices like '1,3', got {spec!r}")
    else:
        indices = [int(i) for i in spec]
    indices = sorted({i % num_layers if -num_layers <= i < num_layers else i for i in indices})
    if not indices or indices[0] < 0 or indices[-1] >= num_layers:
        raise ValueError(f"moe_layers {spec!r} names no layer in 0..{num_layers - 1}")
    return indices


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of a BERT-style model whose feed-forward block is ``intermediate`` + ``output.dense``.

    Raises:
        ValueError: for an architecture without that block, naming it.
    """
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    block = layers[0] if isinstance(layers, nn.ModuleList) and len(layers) else None
    has_ffn = block is not None and all(
        isinstance(getattr(getattr(block, part, None), "dense", None), nn.Linear)
        for part in ("intermediate", "output")
    )
    if not has_ffn:
        name = type(model).__name__
        raise ValueError(
            f"MoE layers need a BERT-style feed-forward block (encoder.layer[i].intermediate.dense + "
            f"output.dense); the {name} architecture has none, so it cannot be upcycled: use a BERT-style "
            "backbone (minilm, bert-*, contriever) or the SB-MoE head / stacked head instead"
        )
    return layers


def upcycle_encoder(model: nn.Module, config: MoELayersConfig, noise: bool = False) -> list[MoEBlock]:
    """Replace the feed-forward block of the chosen layers of ``model`` with upcycled MoE blocks, in place.

    Args:
        model: A Hugging Face BERT-style encoder (``BertModel`` and the like).
        config: Which layers (see :func:`moe_layer_indices`), experts per layer, top-k, init (see the module
            docstring), ReXMoE group size, PSR schedule and pre-gating.
        noise: Learned router noise while training.

    Returns:
        The new blocks, in depth order.

    Raises:
        ValueError: an architecture without a BERT-style feed-forward block, or inconsistent settings.
    """
    layers = encoder_layers(model)
    slices = config.top_k if config.init == "fine" else 1
    blocks = []
    for index in moe_layer_indices(config.moe_layers, len(layers)):
        layer = layers[index]
        up, down = layer.intermediate.dense, layer.output.dense
        hidden = up.out_features // slices
        if hidden * slices != up.out_features:
            raise ValueError(f"intermediate size {up.out_features} does not split into {slices} slices")
        block = MoEBlock(
            up.in_features, hidden, config.num_experts, config.top_k, model.config.hidden_act, slices, noise
        )
        with torch.no_grad():
            for e, expert in enumerate(block.experts):
                part = slice((e % slices) * hidden, (e % slices + 1) * hidden)
                expert.up.weight.copy_(up.weight[part])
                expert.up.bias.copy_(up.bias[part])
                expert.down.weight.copy_(down.weight[:, part])
                expert.down.bias.copy_(down.bias / slices)
        block.to(up.weight.device)
        layer.intermediate, layer.output.dense = block, nn.Identity()
        blocks.append(block)
    link_blocks(blocks, config.reuse_group, config.pregate)
    set_psr(model, config.psr)
    return blocks


class MoETransformer(Transformer):
    """sentence-transformers' Transformer with the MoE feed-forward layers of ``moe`` (saved as its fields, under
    ``moe`` in ``sentence_bert_config.json``). Built from a dense folder it upcycles it; loaded from its own saved
    folder it restores the experts."""

    config_keys: list[str] = [*Transformer.config_keys, "moe"]

    def __init__(self, model_name_or_path: str, *, moe: MoELayersConfig, **kwargs: Any) -> None:
        weights = Path(model_name_or_path) / "model.safetensors"
        saved = weights.is_file() and _holds_experts(weights)
        with quiet_loading(load_report=not saved):  # the dense architecture's report would list every expert weight
            super().__init__(model_name_or_path, **kwargs)
        self.moe = moe
        upcycle_encoder(self.auto_model, moe)
        if saved:
            state = load_file(str(weights), device=str(next(self.auto_model.parameters()).device))
            missing, unexpected = self.auto_model.load_state_dict(state, strict=False)
            moe_missing = [k for k in missing if ".intermediate." in k]
            if moe_missing or unexpected:
                raise ValueError(f"{weights} does not match the MoE settings {self.moe}: {moe_missing or unexpected}")

    @classmethod
    def _load_init_kwargs(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The saved config's arguments, its ``moe`` fields as a :class:`MoELayersConfig`."""
        init_kwargs = super()._load_init_kwargs(*args, **kwargs)
        return {**init_kwargs, "moe": MoELayersConfig(**init_kwargs["moe"])}

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), "moe": asdict(self.moe)}

    def recorder(self) -> RoutingRecorder:
        """A :class:`~sbmoe.heads.usage.RoutingRecorder` over this encoder's MoE layers, in depth order."""
        return RoutingRecorder(moe_blocks(self.auto_model))

    def expert_utilization(self, recorder: RoutingRecorder) -> list[dict[str, Any]]:
        """Per MoE layer: its layer index and :func:`~sbmoe.heads.usage.block_utilization` of ``recorder``'s counts
        (a :meth:`recorder` of this encoder)."""
        owner = {id(layer.intermediate): i for i, layer in enumerate(self.auto_model.encoder.layer)}
        return [{"layer": owner[id(b)], **u} for b, u in zip(recorder.blocks, recorder.utilization(), strict=True)]


def _holds_experts(weights: Path) -> bool:
    """Whether a safetensors file holds MoE expert weights (a saved upcycled model, not a dense backbone)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return any(".intermediate.experts." in key for key in f.keys())  # noqa: SIM118 (no __iter__)


def expert_plan(model: nn.Module, texts: Sequence[str], batch_size: int = 32) -> list[dict[str, Any]]:
    """Per MoE layer of ``model``, the experts each batch of ``texts`` needs, known before that layer starts.

    Returns:
        One dict per MoE layer: ``block`` (its depth among the MoE layers), ``decided_by`` (the MoE layer whose input
        chose them: the layer before it under pre-gating, itself otherwise) and ``batches``: per batch, the sorted
        candidate indices (``g * N + e``: expert e of group member g) any token uses.
    """
    blocks = moe_blocks(model)
    plans: list[dict[str, Any]] = [{"block": b.index, "decided_by": b.index, "batches": []} for b in blocks]

    def record(block: MoEBlock, _inputs: Any, _output: Any) -> None:
        plan = plans[block.index]
        plan["decided_by"] = block.last_decided_by
        plan["batches"].append(torch.unique(block.last_routing.indices).tolist())

    hooks = [b.register_forward_hook(record) for b in blocks]
    try:
        model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True)
    finally:
        for hook in hooks:
            hook.remove()
    return plans
