#!/usr/bin/env bash
# The full fine-tuning rows at their intended size, for a lent GPU (the `device` tool): one whole epoch over both
# domains, 3 seeds, on MiniLM-L3 and MiniLM-L6, evaluated on all five collections. Run from the repository root
# after `make install`:
#   bash experiments/multidomain/gpu.sh
# Writes experiments/results/multidomain_full_<backbone>_steps-1.{json,md,png}. On two CPU cores a step took 10-20 s
# (an epoch is about 210 steps), so this was not run here; no GPU was lent to the session that wrote it.
set -euo pipefail
for backbone in minilm-l3 minilm; do
    .venv/bin/python experiments/multidomain/run.py --part full --backbone "$backbone" --max-steps -1 --full-seeds 0,1,2 \
        --full-eval scifact:test,scifact:test-unseen,nfcorpus:test,cranfield:test,msmarco-sample:test
done
