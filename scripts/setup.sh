#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned stack. CPU torch first: a wider torch range would pull a
# multi-GB CUDA build. GPU users: install your CUDA torch into the venv first, then rerun this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.simmtm-setup"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[dev]"
# DeepSpeed JIT-compiles a small CPU communication op on first use (~55 s); build it once here,
# into the cache every later run reads, with the venv's ninja as the runs use (trainer/distributed.py;
# another ninja version would make the first run rebuild it).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
PATH="$(cd "$VENV/bin" && pwd):$PATH" "$VENV/bin/python" -c "
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
ShareMemCommBuilder().load(verbose=False)
" >/dev/null 2>&1 || echo "note: DeepSpeed's CPU comm op was not prebuilt; it will build on first use" >&2
echo "$want" > "$stamp"
