"""int8 encoders on CPU: torch dynamic quantization in place, or ONNX Runtime with dynamic int8 quantization.

Both swap only the transformer inside the model's first module (``model[0].model``), so tokenization, pooling
and the SB-MoE head after it run unchanged. (Assigning ``model[0].auto_model`` does nothing in
sentence-transformers 6.2: it is a read-only view of ``model[0].model``.) :func:`save_with_onnx_encoder` saves a
model whose backbone reloads as an :class:`OnnxTransformer`, running through the saved ONNX file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Transformer
from torch import Tensor, nn

from sbmoe.files import sha256_file

ENCODERS = ("fp32", "torch-int8", "onnx-fp32", "onnx-int8")
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def torch_int8(model: SentenceTransformer) -> SentenceTransformer:
    """Quantize the backbone's linear layers to dynamic int8 (weights int8, activations quantized per batch)."""
    torch.ao.quantization.quantize_dynamic(model[0].model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return model


class OrtEncoder(nn.Module):
    """An ONNX Runtime session standing in for a Hugging Face encoder: returns ``last_hidden_state``.

    Args:
        path: The ``.onnx`` file.
        config: The replaced model's config (sentence-transformers reads its sizes).
        threads: ONNX Runtime intra-op threads (0: its default).
    """

    def __init__(self, path: str | os.PathLike, config: Any, threads: int = 0):
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.config = config
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> dict[str, Tensor]:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}
        if "token_type_ids" in self.input_names and given.get("token_type_ids") is None:
            given["token_type_ids"] = torch.zeros_like(input_ids)
        feed = {name: given[name].cpu().numpy().astype(np.int64) for name in self.input_names}
        (hidden,) = self.session.run(["last_hidden_state"], feed)
        return {"last_hidden_state": torch.from_numpy(hidden)}


def export_onnx(model: SentenceTransformer, folder: str | os.PathLike, int8: bool) -> Path:
    """Export the backbone to ``folder/model.onnx`` (TorchScript exporter, dynamic batch and length), and, with
    ``int8``, its dynamic int8 quantization (onnxruntime, per-channel weights) to ``folder/model_int8.onnx``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    encoder = model[0].model.eval()
    sample = model[0].preprocess(["an example sentence"])
    names = [name for name in ONNX_INPUTS if name in sample]
    args = tuple(sample[name] for name in names)
    path = folder / "model.onnx"
    axes = {name: {0: "batch", 1: "tokens"} for name in names} | {"last_hidden_state": {0: "batch", 1: "tokens"}}

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, *inputs: Tensor) -> Tensor:
            return self.encoder(**dict(zip(names, inputs, strict=True)), return_dict=True)["last_hidden_state"]

    with torch.no_grad():
        torch.onnx.export(
            Wrapped(),
            args,
            str(path),
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    if not int8:
        return path
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = folder / "model_int8.onnx"
    quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8, per_channel=True)
    return quantized


def onnx_encoder(model: SentenceTransformer, folder: str | os.PathLike, int8: bool, threads: int = 0) -> Any:
    """Put an ONNX Runtime session (exported to ``folder``) in place of the backbone, in place."""
    path = export_onnx(model, folder, int8)
    model[0].model = OrtEncoder(path, model[0].model.config, threads)
    return model


def with_encoder(model: SentenceTransformer, encoder: str, folder: str | os.PathLike, threads: int = 0) -> Any:
    """``model`` with the backbone ``encoder`` (one of :data:`ENCODERS`), changed in place."""
    if encoder == "fp32":
        return model
    if encoder == "torch-int8":
        return torch_int8(model)
    if encoder in ("onnx-fp32", "onnx-int8"):
        return onnx_encoder(model, folder, encoder == "onnx-int8", threads)
    raise ValueError(f"unknown encoder {encoder!r}: expected one of {ENCODERS}")


class OnnxTransformer(Transformer):
    """sentence-transformers' Transformer whose encoder runs through an ONNX file saved in its folder.

    The folder holds the ONNX file, the encoder's config and the tokenizer, and no float weights: the ONNX file
    holds the weights the encoder runs with, and nothing reads float ones (a folder saved by this class does not
    re-export; export again from the float model).

    Args:
        model_name_or_path: A folder saved by this class (see :func:`save_with_onnx_encoder`).
        onnx_file: The ONNX file's name in that folder.
        onnx_digest: The file's digest as saved (recomputed on load): in the config, it tells models apart in
            embedding caches (their fingerprint hashes parameters, and the ONNX session has none).
    """

    config_keys: list[str] = [*Transformer.config_keys, "onnx_file", "onnx_digest"]

    def __init__(
        self,
        model_name_or_path: str,
        *,
        onnx_file: str = "model_int8.onnx",
        onnx_digest: str | None = None,
        **kwargs: Any,
    ):
        self.onnx_path = Path(model_name_or_path) / onnx_file  # read by _load_model, which __init__ calls
        super().__init__(model_name_or_path, **kwargs)
        self.use_onnx(self.onnx_path)

    def _load_model(self, model_name_or_path: str, transformer_task: Any, config: Any, *args: Any, **kwargs: Any):
        """The ONNX Runtime session in place of the Hugging Face model (whose float weights are not saved)."""
        return OrtEncoder(self.onnx_path, config)

    def use_onnx(self, path: Path) -> None:
        """Run the encoder through ``path`` (in place), dropping the float encoder."""
        self.onnx_file, self.onnx_path = path.name, path
        self.onnx_digest = sha256_file(path)[:32]
        if not isinstance(self.model, OrtEncoder):
            self.model = OrtEncoder(path, self.model.config)

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), "onnx_file": self.onnx_file, "onnx_digest": self.onnx_digest}

    def save(self, output_path: str, *args: Any, **kwargs: Any) -> None:
        """The encoder's config, the tokenizer, this module's config and the ONNX file (no float weights)."""
        self.model.config.save_pretrained(output_path)
        self.processor.save_pretrained(output_path)
        self.save_config(output_path)
        target = Path(output_path) / self.onnx_file
        if not target.exists() or not target.samefile(self.onnx_path):
            shutil.copyfile(self.onnx_path, target)


def save_with_onnx_encoder(model: SentenceTransformer, folder: str | os.PathLike, int8: bool = True) -> Path:
    """Save ``model`` to ``folder`` with its backbone exported to ONNX (dynamic int8 with ``int8``); the folder
    reloads with :func:`sbmoe.model.load_model` as a model whose backbone runs through ONNX Runtime. ``model``'s
    first module is replaced by that :class:`OnnxTransformer` (loaded from the folder).

    Raises:
        ValueError: a backbone other than a plain Transformer (MoE encoder layers route each token by its values,
            which tracing to ONNX would freeze).
    """
    if type(model[0]) is not Transformer:
        raise ValueError(f"only a plain Transformer backbone exports to ONNX, not {type(model[0]).__name__}")
    folder = Path(folder)
    path = export_onnx(model, folder, int8)
    if int8:
        (folder / "model.onnx").unlink()  # the float export the int8 file was made from
    dense = model[0]
    dense.model.config.save_pretrained(folder)  # what OnnxTransformer reads beside the ONNX file
    dense.processor.save_pretrained(folder)
    dense.save_config(str(folder))
    model[0] = OnnxTransformer.load(str(folder), init_defaults={"onnx_file": path.name})
    model.save(str(folder))
    return folder
