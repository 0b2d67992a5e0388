"""On-paper projection for GPUs (nothing here is measured on a GPU).

For the ETTh1 and Traffic references at 8, 64 and 512 GPUs (H100 SXM / H200), from the model's
FLOP and byte counts: step compute time at an assumed achieved bf16 throughput, memory per GPU
(ZeRO-2: bf16 weights + fp32 master/Adam state sharded), gradient and constraint-loss traffic, and
the communication share of the step without overlap. Writes bench/results/projection.json.

Assumptions (stated, not measured): achieved bf16 dense throughput 40% of the datasheet peak
(989 TFLOP/s H100, same for H200); attention with head dim 2 runs at memory bandwidth (we count
its bytes, not its FLOPs); NVLink within a node of 8 GPUs at 350 GB/s per GPU algorithm bandwidth;
InfiniBand NDR 400 Gb/s per GPU (45 GB/s achieved) across nodes; ring collectives.
"""
from __future__ import annotations

from bench.flops import step_flops
from bench.results_io import write_result
from models import SimMTMConfig

GPUS = {"H100": {"peak_tflops": 989.0, "hbm_gb": 80.0, "hbm_tbs": 3.35},
        "H200": {"peak_tflops": 989.0, "hbm_gb": 141.0, "hbm_tbs": 4.8}}
ACHIEVED = 0.40
NVLINK_GBS, IB_GBS = 350.0, 45.0

REFS = {
    "etth1": {"cfg": SimMTMConfig(), "channels": 7, "batch": 16},
    "traffic": {"cfg": SimMTMConfig(d_model=128, n_heads=16, e_layers=3, d_ff=256), "channels": 862, "batch": 24},
}


def params(cfg: SimMTMConfig) -> int:
    flat = cfg.num_tokens * cfg.d_model
    enc = cfg.e_layers * (4 * cfg.d_model ** 2 + 2 * cfg.d_model * cfg.d_ff) + 3 * cfg.d_model
    return enc + flat * (flat // 2) + (flat // 2) * cfg.proj_dim + flat * cfg.seq_len


def activation_gb(cfg: SimMTMConfig, n: int, bytes_per: int = 2) -> float:
    """Saved activations: ~12 tensors of [N, T, d] per layer (+ d_ff ones), the flat z and projector hidden."""
    t, d = cfg.num_tokens, cfg.d_model
    per_layer = n * t * (10 * d + 2 * cfg.d_ff)
    flat = t * d
    return (cfg.e_layers * per_layer + n * (2 * flat + flat // 2)) * bytes_per / 1e9


def project(ref: str, gpu: str, world: int, batch: int) -> dict:
    r = REFS[ref]
    cfg, c = r["cfg"], r["channels"]
    g = GPUS[gpu]
    fl = step_flops(cfg, batch, c)
    n = batch * c * (cfg.num_views + 1)
    dense = sum(v for k, v in fl.items() if k != "attention")
    attn_bytes = 3 * cfg.e_layers * n * cfg.n_heads * cfg.num_tokens ** 2 * 2 * 2  # scores read/write, bf16, fwd+bwd
    compute_s = dense / (g["peak_tflops"] * 1e12 * ACHIEVED) + attn_bytes / (g["hbm_tbs"] * 1e12)
    p = params(cfg)
    ring = 2 * (world - 1) / world
    grad_bytes = ring * p * 2  # bf16 gradients
    s_bytes = 2 * (world - 1) * n * cfg.proj_dim * 2  # all-gather + reduce-scatter of s (bf16)
    bw = (NVLINK_GBS if world <= 8 else IB_GBS) * 1e9
    comm_s = (grad_bytes + s_bytes) / bw
    mem = p * 2 + p * 2 + 12 * p / world + activation_gb(cfg, n) * 1e9  # weights, grads, sharded fp32 state
    return {"reference": ref, "gpu": gpu, "world": world, "batch_per_gpu": batch, "series_per_gpu": n,
            "params": p, "step_tflop": sum(fl.values()) / 1e12, "compute_s": compute_s, "comm_s": comm_s,
            "step_s_no_overlap": compute_s + comm_s, "comm_share": comm_s / (compute_s + comm_s),
            "memory_gb": mem / 1e9, "fits": mem / 1e9 < g["hbm_gb"] * 0.9,
            "global_series_per_s": world * batch * c / (compute_s + comm_s)}


def main() -> list:
    rows = []
    for ref, batches in (("etth1", (16,)), ("traffic", (1, 2, 24))):
        for gpu in GPUS:
            for world in (8, 64, 512):
                for b in batches:
                    rows.append(project(ref, gpu, world, b))
    print(f"{'ref':>7} {'gpu':>4} {'world':>5} {'batch':>5} {'series/gpu':>10} {'step s':>8} {'comm %':>6} "
          f"{'mem GB':>8} fits")
    for r in rows:
        print(f"{r['reference']:>7} {r['gpu']:>4} {r['world']:>5} {r['batch_per_gpu']:>5} {r['series_per_gpu']:>10} "
              f"{r['step_s_no_overlap']:8.3f} {100 * r['comm_share']:6.1f} {r['memory_gb']:8.1f} {r['fits']}")
    write_result("projection", rows)
    return rows


if __name__ == "__main__":
    import argparse

    # no options: only --help
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
