"""Similarity + aggregation + constraint loss, forward + backward: peak memory and time, ours vs dense.

Why: issue 7. Dense N x N matrices do not fit at the Electricity/Traffic references; the blockwise
path (models/blockwise.py) must keep memory linear in N. Each configuration runs in its own process
so its peak RSS is its own; "peak_gb" is the peak RSS increase over the allocated inputs (the
peak mark is reset with /proc/self/clear_refs after the inputs exist, then read as ru_maxrss).

Shapes, as the model calls it: series representations s [N, 128] (keys and constraint-loss queries,
Nq = N), point-wise values z [N, value_width], aggregation for the N0 = N/4 original rows, M = 3.
"needed_gb": dense rows give the authors' approach (2 float64 N x N host masks + 3 fp32 N x N
matrices); ours gives its block working set (2 fp32 block x N buffers), the only part not O(N x width).
"dense_est_gb" (dense rows): this project's dense path, ~6 fp32 N x N matrices at peak (logits, masked
logits, log-softmax and their gradients; 6.2x measured at N = 4096); run only if <= 16 GB.
"gflops": forward = 2 N^2 h (similarity) + 2 N0 N value_width (aggregation); forward + backward is
taken as 3x forward (approximate: our backward also recomputes the similarity blocks).
Writes bench/results/memory.json. Threads: 2 (the machine is shared; timings vary with its load).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from bench.results_io import write_result

H, M, TAU, BLOCK, THREADS = 128, 3, 0.2, 1024, 2
DENSE_LIMIT_GB = 16.0
CONFIGS = [(4096, 1024), (16384, 1024), (32768, 1024), (4096, 10752)]


def authors_needed_gb(n: int) -> float:
    return (2 * 8 + 3 * 4) * n * n / 1e9


def dense_est_gb(n: int) -> float:
    return 6 * 4 * n * n / 1e9


def ours_needed_gb(n: int) -> float:
    return 2 * min(BLOCK, n) * n * 4 / 1e9


def forward_flops(n: int, width: int) -> float:
    return 2 * n * n * H + 2 * (n // 4) * n * width


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def one(n: int, width: int, path: str, device: str = "cpu", dtype: str = "fp32", block: int | None = BLOCK) -> dict:
    """Runs in a child process (or, on CUDA, anywhere: the peak is the allocator's): inputs, reset the
    peak mark, forward + backward, report. `dtype`: of s, z and the matmuls (bf16 as under DeepSpeed);
    `block`: rows per block (None: the model's automatic choice). "inputs_gb": s, z and the upstream
    gradient, so peak_gb + inputs_gb is everything this call held."""
    import torch

    from models.blockwise import similarity_and_losses
    from models.simmtm import _DTYPES
    from models.similarity import positive_index

    cuda = device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(THREADS)
    dense_bytes = 1 << 62 if path == "dense" else 0
    dt = _DTYPES[dtype]
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(s, z, up, si, pos, n0):
        loss_cl, z_agg, _ = similarity_and_losses(s, s, z, si, pos, TAU, n_agg=n0, dtype=dt, block=block,
                                                  dense_bytes=dense_bytes)
        (loss_cl + (z_agg * up).sum()).backward()

    def inputs(n, width):
        g = torch.Generator(device=device).manual_seed(0)
        n0 = n // 4
        s = torch.randn(n, H, generator=g, device=device, dtype=dt).requires_grad_()
        z = torch.randn(n, width, generator=g, device=device, dtype=dt).requires_grad_()
        up = torch.randn(n0, width, generator=g, device=device, dtype=dt) / n0
        return s, z, up, torch.arange(n, device=device), positive_index(n, n0, M, 0, device), n0

    step(*inputs(256, 16))  # warm up kernels and thread pools outside the measurement
    x = inputs(n, width)
    reps = 3 if n <= 4096 or cuda else 1  # CUDA: milliseconds each; the best of 3
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        open("/proc/self/clear_refs", "w").write("5")  # peak RSS mark := current RSS (inputs allocated)
        base = _rss_gb()
    times = []
    for _ in range(reps):
        x[0].grad = x[1].grad = None
        t = time.perf_counter()
        step(*x)
        sync()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 1e9 if cuda else _rss_gb() - base
    secs = min(times)
    return {"n": n, "value_width": width, "path": path, "peak_gb": peak, "dtype": dtype,
            "inputs_gb": sum(t.numel() * t.element_size() for t in x[:3]) / 1e9,
            "fwd_bwd_s": secs, "gflops": 3 * forward_flops(n, width) / secs / 1e9}


def mem_available_gb() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("inf")


def main() -> list:
    records = []
    for n, width in CONFIGS:
        for path in ("ours", "dense"):
            rec = {"n": n, "value_width": width, "path": path, "peak_gb": None,
                   "needed_gb": authors_needed_gb(n) if path == "dense" else ours_needed_gb(n),
                   "fwd_bwd_s": None, "gflops": None}
            if path == "dense":
                rec["dense_est_gb"] = dense_est_gb(n)
                limit = min(DENSE_LIMIT_GB, 0.8 * mem_available_gb())
                if rec["dense_est_gb"] > limit:
                    rec["note"] = f"not run: needs ~{rec['dense_est_gb']:.1f} GB > {limit:.1f} GB"
                    records.append(rec)
                    continue
            env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
            out = subprocess.run([sys.executable, __file__, "--one", str(n), str(width), path], capture_output=True,
                                 text=True, env=env)
            if out.returncode:
                rec["note"] = f"failed (rc {out.returncode}): {out.stderr.strip().splitlines()[-1:]}"
            else:
                rec.update(json.loads(out.stdout.strip().splitlines()[-1]))
            rec["load_avg"] = os.getloadavg()[0]
            records.append(rec)
            print(json.dumps(rec), flush=True)
    print(f"\nsimilarity + aggregation + constraint loss, fwd+bwd, h={H}, M={M}, block={BLOCK}, {THREADS} threads")
    print(f"  {'N':>6} {'width':>6} {'path':>6} {'peak GB':>8} {'needed GB':>10} {'s':>8} {'GFLOP/s':>8}  note")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in records:
        print(f"  {r['n']:>6} {r['value_width']:>6} {r['path']:>6} {fmt(r['peak_gb'], '8.3f')} "
              f"{r['needed_gb']:10.3f} {fmt(r['fwd_bwd_s'], '8.2f')} {fmt(r['gflops'], '8.1f')}  {r.get('note', '')}")
    big = next(r for r in records if r["n"] == 32768 and r["path"] == "ours")
    print(f"  target: ours under 2 GB at N = 32,768: "
          f"{'met' if big['peak_gb'] is not None and big['peak_gb'] < 2 else 'NOT met'}")
    write_result("memory", records)
    return records


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", nargs=3, metavar=("N", "WIDTH", "PATH"),
                    help="measure one configuration (PATH: ours or dense) in this process and print its record")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(int(a.one[0]), int(a.one[1]), a.one[2])))
    else:
        main()
