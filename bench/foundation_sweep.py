"""The short sweep that chose the foundation configuration (docs/results.md, "foundation model").

Each candidate (patch tokens, width, depth, batch) pre-trains on the corpus for the same wall-clock
budget on this machine, then is scored on what a user gets from it, on validation data only:
  - the corpus's held-out `val` series: reconstruction loss and how far the constraint loss has gone
    from chance (M ln(N-1)) towards perfect grouping (M ln M), same windows and masks for every candidate;
  - a ridge probe on frozen features: ETTh1 H=96, fitted on train windows, MSE on the val split,
    beside the same probe on a random encoder of the same architecture (the gain pre-training buys).

    python -m bench.foundation_sweep --corpus runs/corpus/foundation --budget-s 240
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from bench.results_io import write_result
from data_pipeline import build_loader, load_split_array
from data_pipeline.config import DataConfig
from models import SimMTM, SimMTMConfig
from models.encoder import instance_norm
from trainer.engine import warmup_cosine

# step_s: seconds per step measured on the idle machine (2 threads, random [B, 1, 336] input); every
# candidate gets budget_s / step_s steps, so the budgets are equal wall time even when the sweep
# itself shares the cores with other work.
CANDIDATES = {
    "p16s8-d64-l3-b64": dict(patch_stride=8, d_model=64, n_heads=4, d_ff=128, e_layers=3, batch=64, step_s=0.216),
    "p16s16-d128-l3-b64": dict(patch_stride=16, d_model=128, n_heads=8, d_ff=256, e_layers=3, batch=64,
                               step_s=0.247),
    "p16s8-d128-l3-b32": dict(patch_stride=8, d_model=128, n_heads=8, d_ff=256, e_layers=3, batch=32, step_s=0.386),
    "p16s8-d64-l2-b128": dict(patch_stride=8, d_model=64, n_heads=4, d_ff=128, e_layers=2, batch=128, step_s=0.299),
}


def corpus_cfg(source: str, split: str) -> DataConfig:
    return DataConfig(source=source, split=split, channels="independent", normalize=False, series_norm=True,
                      window_stride=64, shuffle=split == "train", infinite=split == "train", short_series="drop")


def model_cfg(c: dict, seq_len: int) -> SimMTMConfig:
    kw = {k: v for k, v in c.items() if k not in ("batch", "step_s")}
    return SimMTMConfig(seq_len=seq_len, encoder="patch", patch_len=16, dropout=0.1, **kw)


@torch.no_grad()
def val_losses(model: SimMTM, batches: list[torch.Tensor]) -> dict:
    model.eval()
    g = torch.Generator().manual_seed(17)
    acc = {"loss_rec": 0.0, "loss_cl": 0.0}
    n = 0
    for b in batches:
        out = model(b, generator=g)
        for k in acc:
            acc[k] += float(out[k])
        n = out["num_series"] * (model.cfg.num_views + 1)
    model.train()
    m = model.cfg.num_views
    cl = acc["loss_cl"] / len(batches)
    perfect, chance = m * math.log(m), m * math.log(n - 1)
    return {"val_rec": acc["loss_rec"] / len(batches), "val_cl": cl, "cl_perfect": perfect, "cl_chance": chance,
            "cl_formed": (chance - cl) / (chance - perfect)}


@torch.no_grad()
def features(enc, x: torch.Tensor) -> torch.Tensor:
    """[N, C, L] -> [N*C, T*d] frozen token features of instance-normalised channels."""
    enc.eval()
    xn, _, _ = instance_norm(x.reshape(-1, x.shape[-1]))
    return torch.cat([enc(xn[i:i + 2048]).flatten(1) for i in range(0, len(xn), 2048)])


def ridge_probe(enc, seq_len: int, horizon: int = 96, lam: float = 1e-3) -> float:
    """ETTh1: ridge on frozen features (train windows at stride 8), MSE on the val split (stride 8),
    forecasts de-normalised per window as the fine-tuning heads do."""
    def windows(split: str, stride: int):
        a = torch.from_numpy(np.ascontiguousarray(load_split_array("data/ETTh1.csv", split, seq_len,
                                                                  cache_dir="data/shards")))
        w = a.unfold(1, seq_len + horizon, stride).permute(1, 0, 2).float()
        return w[..., :seq_len], w[..., seq_len:]
    (xt, yt), (xv, yv) = windows("train", 8), windows("val", 8)

    def norm_target(x, y):
        flat = x.reshape(-1, x.shape[-1])
        mean, std = flat.mean(-1, keepdim=True), flat.std(-1, unbiased=False, keepdim=True) + 1e-5
        return (y.reshape(-1, horizon) - mean) / std, mean, std
    ft, fv = features(enc, xt).double(), features(enc, xv).double()
    tt, _, _ = norm_target(xt, yt)
    mu, sd = ft.mean(0), ft.std(0) + 1e-6  # standardised features: one ridge strength fits every width
    ft, fv = (ft - mu) / sd, (fv - mu) / sd
    a = ft.T @ ft + lam * len(ft) * torch.eye(ft.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(a, ft.T @ (tt.double() - tt.double().mean(0)))
    _, mean, std = norm_target(xv, yv)
    pred = (fv @ w + tt.double().mean(0)) * std.double() + mean.double()
    return float(((pred - yv.reshape(-1, horizon).double()) ** 2).mean())


def run(name: str, c: dict, corpus: str, budget_s: float, seq_len: int, val_batches: list[torch.Tensor]) -> dict:
    torch.manual_seed(0)
    cfg = model_cfg(c, seq_len)
    model = SimMTM(cfg)
    rand_probe = ridge_probe(model.encoder, seq_len)  # the same initial weights as the run below
    loader = build_loader(corpus_cfg(corpus, "train"), seq_len=seq_len, batch_size=c["batch"], seed=0)
    g = torch.Generator().manual_seed(0)
    it = iter(loader)
    total = max(10, int(budget_s / c["step_s"]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, max(1, total // 20), 0.1))
    t0 = time.perf_counter()
    for step in range(total):
        out = model(next(it), generator=g)
        out["loss"].backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    loader.close()
    train_s = time.perf_counter() - t0
    res = {"name": name, **c, "tokens": cfg.num_tokens, "steps": total, "step_s": train_s / total,
           "windows_seen": total * c["batch"], "train_s": train_s,
           "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
           "encoder_params_M": sum(p.numel() for p in model.encoder.parameters()) / 1e6,
           **val_losses(model, val_batches), "probe_val_mse": ridge_probe(model.encoder, seq_len),
           "probe_val_mse_random": rand_probe}
    print(f"{name}: {total} steps ({res['step_s']:.3f} s), val rec {res['val_rec']:.4f} cl {res['val_cl']:.3f} "
          f"(formed {100 * res['cl_formed']:.0f}%), ETTh1 probe val MSE {res['probe_val_mse']:.4f} "
          f"(random {rand_probe:.4f})", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default="runs/corpus/foundation")
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--seq-len", type=int, default=336)
    ap.add_argument("--only", nargs="*")
    a = ap.parse_args()
    torch.set_num_threads(2)
    vl = build_loader(corpus_cfg(a.corpus, "val"), seq_len=a.seq_len, batch_size=64, seed=0)
    val_batches = [b for _, b in zip(range(8), vl)]
    vl.close()
    out = [run(n, c, a.corpus, a.budget_s, a.seq_len, val_batches) for n, c in CANDIDATES.items()
           if not a.only or n in a.only]
    write_result("foundation_sweep", {"budget_s": a.budget_s, "seq_len": a.seq_len, "corpus": a.corpus,
                                      "candidates": out})


if __name__ == "__main__":
    main()
