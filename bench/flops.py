"""Achieved FLOP/s of the pre-training step against this machine's fp32 matmul peak (same run).

peak_gflops: best of several large fp32 GEMMs (torch.mm, 2048^3), all threads.
step_gflops: analytic FLOPs of one training step (forward + backward = 3x forward for every
  matmul; attention's QK^T and AV counted too) divided by the measured step time.
dominant_layers_gflops: FLOPs / time of the step's dense matmuls (aten::mm / addmm / bmm, timed
  and FLOP-counted by torch.profiler) — the projector and decoder linears and the similarity /
  aggregation products, which hold most of the step's FLOPs.
Writes bench/results/flops.json. Target: dominant layers >= 50% of peak.
"""
from __future__ import annotations

import time

import torch

from bench.results_io import write_result
from models import SimMTM, SimMTMConfig

BATCH = 16


def matmul_peak(n: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """GFLOP/s of the best of 3 rounds of `repeats` n x n x n GEMMs (bench/gpu_check.py: bf16 on CUDA)."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        sync()
        best = min(best, (time.perf_counter() - t) / repeats)
    return 2 * n ** 3 / best / 1e9


def step_flops(cfg: SimMTMConfig, batch: int, channels: int = 7) -> dict:
    """Forward FLOPs of the dominant parts of one SimMTM step (x3 for forward + backward)."""
    n0 = batch * channels
    n = n0 * (cfg.num_views + 1)
    t, d, f = cfg.num_tokens, cfg.d_model, cfg.d_ff
    flat = t * d
    enc_linear = n * t * 2 * (3 * d * d + d * d + 2 * d * f) * cfg.e_layers
    attention = n * 2 * 2 * t * t * d * cfg.e_layers  # QK^T and AV over all heads
    projector = n * 2 * (flat * (flat // 2) + (flat // 2) * cfg.proj_dim)
    similarity = 2 * n * n * cfg.proj_dim
    aggregation = 2 * n0 * n * flat
    decoder = 2 * n0 * flat * cfg.seq_len
    parts = {"encoder_linear": enc_linear, "attention": attention, "projector": projector,
             "similarity": similarity, "aggregation": aggregation, "decoder": decoder}
    return {k: 3 * v for k, v in parts.items()}


def main() -> dict:
    torch.manual_seed(0)
    peak = matmul_peak()
    cfg = SimMTMConfig()
    model = SimMTM(cfg)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.randn(BATCH, 7, cfg.seq_len)
    g = torch.Generator().manual_seed(0)

    def step():
        out = model(x, generator=g)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    t = time.perf_counter()
    step()
    step_s = time.perf_counter() - t
    with torch.profiler.profile(with_flops=True) as prof:
        step()
    mm_flops = mm_us = 0.0
    for e in prof.key_averages():
        if e.key in ("aten::mm", "aten::addmm", "aten::bmm") and e.flops:
            mm_flops += e.flops
            mm_us += e.self_cpu_time_total
    flops = step_flops(cfg, BATCH)
    total = sum(flops.values())
    result = {"peak_gflops": peak, "step_gflops": total / step_s / 1e9,
              "dominant_layers_gflops": mm_flops / (mm_us * 1e-6) / 1e9,
              "step_s": step_s, "step_gflop": total / 1e9, "flops_by_part_gflop": {k: v / 1e9 for k, v in flops.items()},
              "matmul_gflop_profiled": mm_flops / 1e9, "matmul_s_profiled": mm_us * 1e-6, "batch": BATCH,
              "threads": torch.get_num_threads()}
    result["dominant_fraction_of_peak"] = result["dominant_layers_gflops"] / peak
    result["step_fraction_of_peak"] = result["step_gflops"] / peak
    print(f"fp32 matmul peak (this machine, {torch.get_num_threads()} threads): {peak:.1f} GFLOP/s")
    print(f"pre-training step (ETTh1 reference, batch {BATCH}): {total / 1e9:.0f} GFLOP in {step_s:.2f} s "
          f"-> {result['step_gflops']:.1f} GFLOP/s ({100 * result['step_fraction_of_peak']:.0f}% of peak)")
    for k, v in flops.items():
        print(f"    {k:<15} {v / 1e9:8.1f} GFLOP")
    print(f"dominant layers (dense matmuls, profiled): {mm_flops / 1e9:.0f} GFLOP in {mm_us * 1e-6:.2f} s -> "
          f"{result['dominant_layers_gflops']:.1f} GFLOP/s ({100 * result['dominant_fraction_of_peak']:.0f}% of peak; "
          f"target >= 50%: {'met' if result['dominant_fraction_of_peak'] >= 0.5 else 'NOT met'})")
    write_result("flops", result)
    return result


if __name__ == "__main__":
    import argparse

    # no options: only --help
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
