#!/usr/bin/env bash
# Set up, then pre-train SimMTM on the bundled ETTh1 (CPU, short schedule) and print the summary.
# Run again, it continues the same run in runs/etth1-cpu (a finished one prints its summary again);
# ckpt.overwrite=true starts over, ckpt.dir=runs/other starts a second run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
exec .venv/bin/python trainer/pretrain.py --config configs/etth1_cpu.yaml ckpt.resume=auto "$@"
