#!/usr/bin/env bash
# A newcomer's install: build the wheel, install it into a fresh virtualenv outside the repository (no system site
# packages), then index and search from there. torch==2.13.0 goes in first (the CPU build pip finds on local disk;
# a bare `torch` requirement would pull a CUDA build), then the wheel with its dependencies, faiss-cpu included.
# Usage: bash experiments/check_wheel.sh [WORKDIR]   (default: a new temporary folder; writes WORKDIR/result.json)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
data="${SBMOE_DATA:-$repo/../shared/data}"
builder="${PYTHON:-$repo/.venv/bin/python}"   # any Python with the `build` package
case "$(cd "$(dirname "$work")" && pwd)/" in "$repo"/*) echo "WORKDIR must lie outside $repo" >&2; exit 2;; esac
mkdir -p "$work"
start=$(date +%s)
"$builder" -m build --wheel --outdir "$work/dist" "$repo" > "$work/build.log" 2>&1
wheel="$(ls "$work"/dist/sbmoe-*.whl)"
echo "built $(basename "$wheel")"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q torch==2.13.0
"$work/venv/bin/pip" install -q "$wheel"
installed=$(date +%s)
cd "$work"
export SBMOE_CACHE="$work/cache" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$work/venv/bin/python" -c "import sbmoe, faiss, sys; assert sbmoe.__file__.startswith(sys.prefix), sbmoe.__file__"
"$work/venv/bin/sbmoe" --help > help.txt && head -3 help.txt
head -200 "$data/scifact/corpus.jsonl" > docs.jsonl
"$work/venv/bin/sbmoe" index --model minilm --corpus docs.jsonl --output idx --quiet
"$work/venv/bin/sbmoe" search idx "stem cells in glioblastoma" -k 3 --json > hits.json && head -8 hits.json
hits=$("$work/venv/bin/python" -c "import json; print(len(json.load(open('hits.json'))['hits']))")
cat > result.json <<JSON
{"wheel": "$(basename "$wheel")", "venv": "$work/venv", "system_site_packages": false,
 "install_s": $((installed - start)), "index_and_search_s": $(($(date +%s) - installed)), "hits": $hits,
 "packages": $("$work/venv/bin/python" -c "import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in ('sbmoe', 'faiss-cpu', 'torch', 'sentence-transformers')}))")}
JSON
echo "wheel check passed in $work (install $((installed - start)) s; index + search $(($(date +%s) - installed)) s)"
