#!/usr/bin/env bash
# The newcomer's own-corpus task: build the stdlib corpus, index and search it with the CLI, score the run file and
# the model with `sbmoe evaluate` (both must agree). Writes experiments/newcomer/results/*.json (+ .md).
# Usage: bash experiments/newcomer/run.sh   (from the repository root, sbmoe installed; about a minute on 2 cores)
set -euo pipefail
here=experiments/newcomer
work="${WORK:-$(mktemp -d)}"
metrics=Success@1,Success@5,MRR@10,nDCG@10,Recall@10
python "$here/build_corpus.py" "$here/stdlib"
sbmoe index --model minilm --corpus "$here/stdlib" --output "$work/index" --quiet
sbmoe search "$work/index" --queries "$here/stdlib/queries.jsonl" -k 100 --output "$work/run.trec"
sbmoe evaluate --run "$work/run.trec" --datasets "$here/stdlib" --metrics "$metrics" \
    --output "$here/results/search_run.json" --overwrite
sbmoe evaluate --model minilm --datasets "$here/stdlib" --metrics "$metrics" --output "$here/results/minilm.json" \
    --overwrite --quiet
