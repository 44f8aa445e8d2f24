"""faiss on GPU: how many GPUs it sees, and a CPU index copied to one GPU or sharded over all of them."""

from __future__ import annotations

from typing import Any

import faiss


def gpu_count() -> int:
    """GPUs faiss can use: 0 when faiss is a CPU build or no GPU is visible."""
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def to_gpu(index: Any, float16: bool) -> tuple[Any, list[Any]]:
    """``index`` on the GPU (sharded over all GPUs when there are several), and the resources it needs kept alive."""
    if gpu_count() > 1:
        options = faiss.GpuMultipleClonerOptions()
        options.shard, options.useFloat16 = True, float16
        return faiss.index_cpu_to_all_gpus(index, co=options), []
    options = faiss.GpuClonerOptions()
    options.useFloat16 = float16
    resources = [faiss.StandardGpuResources()]
    return faiss.index_cpu_to_gpu(resources[0], 0, index, options), resources
