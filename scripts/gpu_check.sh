#!/usr/bin/env bash
# Every CUDA number in one command, on a GPU machine without network (bench/gpu_check.py says how):
#   bash scripts/gpu_check.sh --out DIR [--budget-s 480] [--dry-run]
# Needs .whl/ from scripts/gpu_wheels.sh (installed into DIR/.pylib, nothing else touched). Python:
# $PYTHON, else .venv/bin/python when present, else python3 (the GPU image's, torch preinstalled).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x "$root/.venv/bin/python" ]; then PY=$root/.venv/bin/python; else PY=python3; fi
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m bench.gpu_check "$@"
