"""What a LoRA fine-tuning step costs against a full one: full fine-tuning and LoRA (task.mode=lora defaults) of the
bundled foundation model, steps interleaved in one process so a shared machine slows both alike.

    python -m bench.lora_step [--steps 30] [--horizon 96] [--batch 32] [--channels 7] [task.lora_rank=4 ...]

A step is forward, backward and an Adam update on one batch of the suite's shape (ETTh1: 32 windows x
7 channels of 336 steps); prints the median step of each and their ratio -> bench/results/lora_step.json.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench.results_io import write_result
from trainer.config import load_config
from trainer.finetune import FinetuneConfig, build_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--horizon", type=int, default=96)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--channels", type=int, default=7)
    ap.add_argument("overrides", nargs="*", help="fine-tuning overrides for both, e.g. task.lora_rank=4")
    a = ap.parse_args()
    runs = {}
    for mode in ("full", "lora"):
        cfg = load_config("configs/finetune_foundation.yaml", [f"task.mode={mode}", f"task.horizon={a.horizon}", *a.overrides],
                          cls=FinetuneConfig)
        model, arch = build_model(cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        runs[mode] = (model.train(), torch.optim.Adam(params, lr=1e-4), sum(p.numel() for p in params), [])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, a.channels, arch.seq_len, generator=g)
    y = torch.randn(a.batch, a.channels, a.horizon, generator=g)
    for i in range(a.steps + 3):  # the first 3 of each warm up
        for model, opt, _, times in runs.values():
            t0 = time.perf_counter()
            F.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 3:
                times.append(time.perf_counter() - t0)
    out = {mode: {"trainable_params": n, "step_s": statistics.median(t)} for mode, (_, _, n, t) in runs.items()}
    out["lora_over_full_step"] = out["lora"]["step_s"] / out["full"]["step_s"]
    out.update(steps=a.steps, batch=a.batch, channels=a.channels, horizon=a.horizon, threads=torch.get_num_threads())
    for mode in ("full", "lora"):
        print(f"{mode:5s} {out[mode]['trainable_params']:>8,} trainable, median step {out[mode]['step_s'] * 1e3:.0f} ms")
    print(f"LoRA step / full step: {out['lora_over_full_step']:.2f}")
    write_result("lora_step", out)


if __name__ == "__main__":
    main()
