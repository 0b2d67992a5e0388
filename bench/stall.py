"""Share of pre-training wall time the trainer waits on data, at the ETTh1 reference.

Runs the real trainer (reference model, batch 16, the bundled ETTh1 shards) for a few steps and
reads the loader's blocked time and the wall time from the run summary. Writes
bench/results/stall.json: {"stall_fraction": ...}. Target < 2%.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.results_io import write_result

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6


def main() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        subprocess.run([sys.executable, "trainer/pretrain.py", "--config", "configs/etth1.yaml",
                        f"train.max_steps={STEPS}", "train.progress=false", "log.tensorboard=false",
                        f"ckpt.dir={tmp}"], cwd=ROOT, env=env, check=True, capture_output=True)
        s = json.loads((Path(tmp) / "summary.json").read_text())
    result = {"stall_fraction": s["data_wait_fraction"], "steps": STEPS, "batch": 16, "wall_s": s["elapsed_s"],
              "wait_s": s["data_wait_fraction"] * s["elapsed_s"], "series_per_s": s["series_per_s"]}
    print(f"data wait: {100 * result['stall_fraction']:.3f}% of {result['wall_s']:.1f} s over {STEPS} steps "
          f"(target < 2%: {'met' if result['stall_fraction'] < 0.02 else 'NOT met'})")
    write_result("stall", result)
    return result


if __name__ == "__main__":
    import argparse

    # no options: only --help
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
