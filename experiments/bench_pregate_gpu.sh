#!/usr/bin/env bash
# Pre-gated expert residency on a lent GPU: the same three modes as on CPU (resident, on-demand, ahead), the ahead
# worker copying layer l+1's experts to the GPU on a side CUDA stream while layer l computes. Stored experts stay in
# host memory, so the memory figure is the peak of ready experts on the GPU against all experts resident.
# Writes experiments/results/bench_pregate_cuda.{json,md,png}. About 3-5 minutes on one GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: run experiments/bench_pregate.py on CPU instead"
print(torch.cuda.get_device_name(0))
PY
python experiments/bench_pregate.py --device cuda --docs 256 --batch-size 32 --repeats 7 --no-rss "$@"
