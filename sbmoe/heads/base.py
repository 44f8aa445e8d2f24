"""What every head on the pooled embedding shares: its config file, saving and loading, the embedding size."""

from __future__ import annotations

from sentence_transformers.base.modules.module import Module
from torch import Tensor


class PooledHead(Module):
    """A sentence-transformers module that transforms ``features["sentence_embedding"]`` (size ``in_features``),
    saved as its config (the subclass's ``config_keys``) and weights, and reloaded from them.

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

    def get_embedding_dimension(self) -> int:
        return self.in_features

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)
        self.save_torch_weights(output_path, safe_serialization=safe_serialization)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs) -> PooledHead:
        hub_kwargs = {k: kwargs[k] for k in ("token", "cache_folder", "revision", "local_files_only") if k in kwargs}
        config = cls.load_config(model_name_or_path, subfolder=subfolder, **hub_kwargs)
        head = cls(**config)
        return cls.load_torch_weights(model_name_or_path, subfolder=subfolder, model=head, **hub_kwargs)
