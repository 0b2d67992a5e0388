#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU; several-process runs included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
exec .venv/bin/python -m pytest -q tests "$@"
