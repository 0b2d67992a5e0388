"""Where benchmark results go: bench/results/<name>.json (one shared writer for every benchmark)."""
from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.fs import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, obj) -> Path:
    path = RESULTS / f"{name}.json"
    atomic_write(str(path), json.dumps(obj, indent=2).encode())
    return path
