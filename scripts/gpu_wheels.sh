#!/usr/bin/env bash
# Fill .whl/ with the wheels the GPU image lacks, for CPython 3.12 on manylinux x86-64, so that
# scripts/gpu_check.sh can install them there without registry access. Run here, with PyPI access.
#
# The image has torch 2.11 + CUDA, pyarrow, fsspec, tensorboard, safetensors, pandas and pytest (so
# numpy and packaging too); it lacks DeepSpeed, WebDataset and what they need besides, listed below.
# DeepSpeed ships only an sdist: it is built here into a pure-Python wheel (DS_BUILD_OPS=0: no op
# compiled, none needed on CUDA) against the torch already in .venv, so nothing pulls torch.
# Versions: constraints.txt, one each. .whl/ is git-ignored; the device tool carries it (carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=.whl
LIMIT_MB=60
NEEDED=(webdataset braceexpand PyYAML hjson ninja py-cpuinfo pydantic pydantic_core annotated-types
        typing-inspection typing_extensions msgpack einops psutil tqdm
        huggingface_hub hf-xet httpx2 httpcore2 anyio h11 idna click truststore)  # models/ loads via the Hub mixin

pin() {  # NAME -> NAME==VERSION from constraints.txt
  grep -i -m1 "^$1==" constraints.txt || { echo "gpu_wheels: $1 is not pinned in constraints.txt" >&2; return 1; }
}

git check-ignore -q "$OUT/" || { echo "gpu_wheels: $OUT/ is not git-ignored (add /$OUT/ to .gitignore)" >&2; exit 1; }
pins=()
for name in "${NEEDED[@]}"; do pins+=("$(pin "$name")"); done
deepspeed=$(pin deepspeed)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf "$OUT" && mkdir -p "$OUT"

"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$OUT" "${pins[@]}"

"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "$deepspeed"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$tmp"/deepspeed-*.tar.gz \
    > "$tmp/build.log" 2>&1 || { tail -30 "$tmp/build.log" >&2; exit 1; }

# DeepSpeed's wheel: pure Python, no prebuilt op, and it imports (with .venv's torch) from a target dir.
ds_whl=$(ls "$OUT"/deepspeed-*.whl)
[[ $ds_whl == *-py3-none-any.whl ]] || { echo "gpu_wheels: $ds_whl is not a pure-Python wheel" >&2; exit 1; }
"$PY" -m pip install -q --no-index --no-deps --target "$tmp/check" "$ds_whl" "$OUT"/webdataset-*.whl \
    "$OUT"/huggingface_hub-*.whl
PYTHONPATH="$tmp/check" "$PY" -c "
import deepspeed, webdataset, huggingface_hub
from deepspeed.git_version_info import installed_ops
assert deepspeed.__file__.startswith('$tmp/check'), deepspeed.__file__
assert not any(installed_ops.values()), installed_ops
print(f'gpu_wheels: deepspeed {deepspeed.__version__} imports (no prebuilt ops), webdataset ok')
" 2>/dev/null

dups=$(ls "$OUT" | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dups" ] || { echo "gpu_wheels: more than one version of: $dups" >&2; exit 1; }
count=$(ls "$OUT"/*.whl | wc -l)
[ "$count" -eq $((${#NEEDED[@]} + 1)) ] || { echo "gpu_wheels: $count wheels, expected $((${#NEEDED[@]} + 1))" >&2; exit 1; }
bytes=$(cat "$OUT"/*.whl | wc -c)
ls -1 "$OUT"
echo "gpu_wheels: $count wheels, $((bytes / 1000000)).$(((bytes % 1000000) / 100000)) MB in $OUT/ (limit $LIMIT_MB MB)"
[ "$bytes" -lt $((LIMIT_MB * 1000000)) ] || { echo "gpu_wheels: over $LIMIT_MB MB" >&2; exit 1; }
