#!/usr/bin/env bash
# Build the wheel, install it into a fresh venv outside the repository, and index + search from there.
# Usage: bash experiments/check_wheel.sh [WORKDIR]   (default: a new temporary folder; prints each step's outcome)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
data="${SBMOE_DATA:-$repo/../shared/data}"
mkdir -p "$work"
"$repo/.venv/bin/python" -m build --wheel --outdir "$work/dist" "$repo" > "$work/build.log" 2>&1
wheel="$(ls "$work"/dist/sbmoe-*.whl)"
echo "built $(basename "$wheel")"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q torch==2.13.0
"$work/venv/bin/pip" install -q "${wheel}[cpu]"
cd "$work"
export SBMOE_CACHE="$work/cache" HF_HUB_OFFLINE=1
"$work/venv/bin/sbmoe" --help > help.txt && head -3 help.txt
head -200 "$data/scifact/corpus.jsonl" > docs.jsonl
"$work/venv/bin/sbmoe" index --model minilm --corpus docs.jsonl --output idx --quiet
"$work/venv/bin/sbmoe" search idx "stem cells in glioblastoma" -k 3 --json > hits.json && head -8 hits.json
echo "wheel check passed in $work"
