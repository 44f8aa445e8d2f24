"""What every head on the pooled embedding shares: its config file, saving and loading, the embedding size."""

from __future__ import annotations

from typing import Any

from sentence_transformers.base.modules.module import Module
from torch import Tensor

from sbmoe.heads.config import HEAD_FIELDS, HeadConfig


class PooledHead(Module):
    """A sentence-transformers module that transforms ``features["sentence_embedding"]`` (size ``in_features``),
    built from a :class:`~sbmoe.heads.config.HeadConfig`, saved as its config (the subclass's ``config_keys``: the
    config's fields it uses, ``in_features`` and ``normalize_output``) and weights, and reloaded from them.

    Subclasses set these attributes:
        in_features: Embedding size H of the backbone's pooled output (also the output size).
        query_only: Whether inputs encoded as documents (``task="document"``) pass through unchanged.
        aux_loss: The last forward's load-balancing loss.
        z_loss: The last forward's router z-loss.
    """

    forward_kwargs = {"task"}
    config_file_name = "sbmoe_config.json"
    in_features: int
    query_only: bool
    aux_loss: Tensor
    z_loss: Tensor

    @property
    def config(self) -> HeadConfig:
        """The head's options as they are now (``strength`` included, which ``--tune-strength`` sets)."""
        return HeadConfig(**{name: getattr(self, name) for name in HEAD_FIELDS if hasattr(self, name)})

    def get_embedding_dimension(self) -> int:
        return self.in_features

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)
        self.save_torch_weights(output_path, safe_serialization=safe_serialization)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs) -> PooledHead:
        hub_kwargs = {k: kwargs[k] for k in ("token", "cache_folder", "revision", "local_files_only") if k in kwargs}
        saved = cls.load_config(model_name_or_path, subfolder=subfolder, **hub_kwargs)
        head = cls(**cls.init_arguments(saved))
        return cls.load_torch_weights(model_name_or_path, subfolder=subfolder, model=head, **hub_kwargs)

    @staticmethod
    def init_arguments(saved: dict[str, Any]) -> dict[str, Any]:
        """The constructor's arguments from a saved config (``sbmoe_config.json``): its :class:`HeadConfig` fields
        as ``config``, the rest (``in_features``, ``normalize_output``, a subclass's own keys) as they are."""
        options = {k: v for k, v in saved.items() if k in HEAD_FIELDS}
        return {**{k: v for k, v in saved.items() if k not in options}, "config": HeadConfig(**options)}
