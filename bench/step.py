"""Seconds per pre-training step and peak memory at the ETTh1 reference (fp32, CPU or GPU).

Each batch size runs in its own process so peak resident memory is that configuration's alone.
Writes bench/results/step.json: a list of {"batch", "step_s", "series_per_s", "peak_gb"}.
For scale, the authors' code on this kind of machine (2 cores): ~19 s/step at batch 2, ~39 s at
batch 4 (peak ~9.8 GB), killed for memory at batch 16 (24 GB).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

from bench.results_io import write_result

AUTHORS = {2: 19.0, 4: 39.0}  # s/step measured with the authors' code on this machine kind


def one(batch: int, steps: int) -> dict:
    import torch

    from models import SimMTM, SimMTMConfig
    from trainer.monitor import peak_memory_gb

    torch.manual_seed(0)
    cfg = SimMTMConfig()  # the ETTh1 reference: L 336, d_model 32, 16 heads, 3 layers, d_ff 64, M 3
    model = SimMTM(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 7, cfg.seq_len)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        out = model(x, generator=g)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t)
    step_s = sorted(times)[len(times) // 2]
    return {"batch": batch, "step_s": step_s, "series_per_s": batch * 7 / step_s,
            "windows_per_s": batch / step_s, "peak_gb": peak_memory_gb(torch.device("cpu")),
            "threads": torch.get_num_threads()}


def main() -> list:
    records = []
    for batch, steps in ((4, 3), (16, 3)):
        out = subprocess.run([sys.executable, __file__, "--one", str(batch), str(steps)], capture_output=True,
                             text=True, check=True)
        records.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("pre-training step, ETTh1 reference (fp32):")
    print(f"  {'batch':>5} {'s/step':>8} {'series/s':>9} {'peak GB':>8} {'vs authors per series':>22}")
    for r in records:
        authors_per_series = AUTHORS[4] / (4 * 7)
        speedup = authors_per_series / (r["step_s"] / (r["batch"] * 7))
        r["speedup_vs_authors_per_series"] = speedup
        print(f"  {r['batch']:>5} {r['step_s']:8.2f} {r['series_per_s']:9.2f} {r['peak_gb']:8.2f} {speedup:21.1f}x")
    b16 = next(r for r in records if r["batch"] == 16)
    print(f"  targets: batch 16 under 8 GB: {'met' if b16['peak_gb'] < 8 else 'NOT met'}; "
          f">= 5x per series: {'met' if min(r['speedup_vs_authors_per_series'] for r in records) >= 5 else 'NOT met'}")
    write_result("step", records)
    return records


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", nargs=2, type=int, metavar=("BATCH", "STEPS"),
                    help="measure one batch size in this process and print its record (main runs each so)")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(*a.one)))
    else:
        main()
