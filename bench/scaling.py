"""Data-parallel scaling: measured 1 vs 2 ranks on this machine, and bytes communicated per step.

Runs: the ETTh1 reference model under the real `deepspeed` launcher, ZeRO 0 and 2, batch 4
windows per rank, fp32. Series/s is measured in steady state (after the first two steps) from the
trainer's own per-step timestamps. On this 2-core machine 1 rank uses both cores (2 threads) and
2 ranks use one core each, so the ideal ratio is 1.0.

Communication is computed (not measured) per rank and step, for ring collectives:
  gradients (ZeRO 0-2: all-reduce, or reduce-scatter + all-gather): 2 (W-1)/W * P * 4 bytes (fp32 grads)
  ZeRO-3 adds the parameter all-gathers of forward and backward:     2 (W-1)/W * P * 2-4 bytes
  constraint loss: all-gather of s (W-1) * N_local * h * 4, and its gradient reduce-scatter (NCCL) the same
  projector BatchNorm statistics: 3 small all-reduces of the hidden width.
Writes bench/results/scaling.json: {"runs": [{"ranks", "zero", "series_per_s"}], "comm": [{"world", "reference", "bytes_per_step"}]}.
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
STEPS = 8
BATCH = 4

# The two references: parameters P, series per rank N_local = B * C * (M + 1), projector width.
REFERENCES = {
    # ETTh1: L 336, d_model 32, batch 16 x 7 channels x 4 (original + 3 views)
    "etth1": {"params": 62_145_938, "n_local": 16 * 7 * 4, "h": 128, "bn_hidden": 336 * 32 // 2},
    # Traffic: L 336, d_model 128 (projector 43,008 -> 21,504 -> 128: ~925M), 24 x 862 x 4 series
    "traffic": {"params": 43_008 * 21_504 + 21_504 + 21_504 * 128 + 128 + 43_008 * 336 + 336 + 2_000_000,
                "n_local": 24 * 862 * 4, "h": 128, "bn_hidden": 21_504},
}


def comm_bytes(world: int, params: int, n_local: int, h: int, bn_hidden: int, zero: int = 2,
               grad_bytes: int = 4) -> dict:
    if world == 1:
        return {"gradients": 0, "constraint": 0, "batchnorm": 0, "total": 0}
    ring = 2 * (world - 1) / world
    grads = ring * params * grad_bytes
    if zero == 3:
        grads += ring * params * grad_bytes
    gather = 2 * (world - 1) * n_local * h * 4
    bn = 3 * ring * bn_hidden * 4 * 2  # forward sums + their backward
    return {"gradients": grads, "constraint": gather, "batchnorm": bn, "total": grads + gather + bn}


def run(ranks: int, zero: int, out: Path) -> float:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    env["OMP_NUM_THREADS"] = str(max(1, 2 // ranks))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port),
           "trainer/pretrain.py", "--config", "configs/etth1.yaml", f"train.batch_size={BATCH}",
           f"train.max_steps={STEPS}", "train.log_every=1", "train.progress=false", "log.tensorboard=false",
           f"dist.zero_stage={zero}", "dist.deepspeed=true", f"train.num_threads={max(1, 2 // ranks)}",
           "optim.warmup_steps=2", f"ckpt.dir={out}"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    hist = json.loads((out / "summary.json").read_text())["history"]
    a, b = hist[1], hist[-1]  # steady state: from the end of step 2 to the end
    series = (b["step"] - a["step"]) * BATCH * 7 * ranks
    return series / (b["time_s"] - a["time_s"])


def measure() -> list:
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for zero in (0, 2):
            for ranks in (1, 2):
                sps = run(ranks, zero, Path(tmp) / f"r{ranks}z{zero}")
                runs.append({"ranks": ranks, "zero": zero, "series_per_s": sps})
                print(f"  ranks {ranks} zero {zero}: {sps:.2f} series/s", flush=True)
    return runs


def main(comm_only: bool = False) -> dict:
    runs = []
    previous = ROOT / "bench" / "results" / "scaling.json"
    if comm_only and previous.exists():  # recompute the model, keep the measured runs
        runs = json.loads(previous.read_text())["runs"]
    else:
        runs = measure()
    comm = []
    for ref, r in REFERENCES.items():
        for world in (8, 64, 512):
            c = comm_bytes(world, r["params"], r["n_local"], r["h"], r["bn_hidden"])
            comm.append({"world": world, "reference": ref, "bytes_per_step": c["total"], "breakdown": c})
    print("\nscaling on this machine (ETTh1 reference model, batch 4 windows per rank, fp32):")
    for zero in (0, 2):
        one = next(r for r in runs if r["ranks"] == 1 and r["zero"] == zero)["series_per_s"]
        two = next(r for r in runs if r["ranks"] == 2 and r["zero"] == zero)["series_per_s"]
        print(f"  ZeRO {zero}: 1 rank {one:.2f} series/s, 2 ranks {two:.2f} series/s -> ratio {two / one:.2f} "
              f"(target >= 0.77: {'met' if two / one >= 0.77 else 'NOT met'})")
    print("\nbytes communicated per rank per step (computed, ZeRO-2, fp32 gradients):")
    for c in comm:
        b = c["breakdown"]
        print(f"  {c['reference']:>7} world {c['world']:>3}: {c['bytes_per_step'] / 1e9:7.3f} GB "
              f"(gradients {b['gradients'] / 1e9:.3f}, constraint all-gather {b['constraint'] / 1e9:.4f})")
    result = {"runs": runs, "comm": comm, "batch_per_rank": BATCH, "steps": STEPS}
    write_result("scaling", result)
    return result


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comm-only", action="store_true",
                    help="recompute the communication model, keep the measured runs of bench/results/scaling.json")
    main(ap.parse_args().comm_only)
