#!/usr/bin/env bash
# Set up, then pre-train SimMTM on the bundled ETTh1 (CPU, short schedule) and print the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
exec .venv/bin/python trainer/pretrain.py --config configs/etth1_cpu.yaml "$@"
