"""The optimisation engine behind one interface: a DeepSpeed engine, or plain PyTorch for one process.

Both read the same DeepSpeed JSON (optimizer, warmup-cosine schedule, clipping, accumulation) after
the training config has filled its "auto" entries, so a run means the same thing either way.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch

from .config import REPO_ROOT, Config


def _resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() or p.exists() else REPO_ROOT / p


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier, identical to DeepSpeed's WarmupCosineLR (linear warmup from 0, cosine to min_ratio)."""
    if step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup + 1) / max(1, total - warmup))
    return max(0.0, min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def epoch_cosine(step: int, steps_per_epoch: int, epochs: int, min_ratio: float = 0.0) -> float:
    """LR multiplier constant within an epoch, cosine over epochs: the authors' pre-training schedule
    (CosineAnnealingLR with T_max = epochs, stepped once per epoch)."""
    epoch = step // max(1, steps_per_epoch)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(epoch, epochs) / max(1, epochs)))


def authors_finetune(step: int, steps_per_epoch: int) -> float:
    """LR multiplier of the authors' fine-tuning as it runs: the first epoch at OneCycleLR's initial
    rate (max_lr / 25, the scheduler is built but never stepped), then `adjust_learning_rate` type1,
    halving per epoch from the full rate."""
    epoch = step // max(1, steps_per_epoch)
    return 1.0 / 25.0 if epoch == 0 else 0.5 ** (epoch - 1)


def deepspeed_config(cfg: Config, total_steps: int) -> dict:
    """The JSON named by dist.ds_config with every "auto" entry filled from the training config."""
    path = _resolve(cfg.dist.ds_config)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"dist.ds_config: {path} not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"dist.ds_config: {path} is not valid JSON: {e}") from None
    ds = copy.deepcopy(ds)

    def fill(d: dict, key: str, value: Any) -> None:
        if d.get(key, "auto") == "auto":
            d[key] = value

    fill(ds, "train_micro_batch_size_per_gpu", cfg.train.batch_size)
    fill(ds, "gradient_accumulation_steps", cfg.train.grad_accum)
    fill(ds, "gradient_clipping", cfg.optim.grad_clip)
    ds.pop("train_batch_size", None) if ds.get("train_batch_size") == "auto" else None
    opt = ds.setdefault("optimizer", {"type": "Adam", "params": {}})
    params = opt.setdefault("params", {})
    fill(params, "lr", cfg.optim.lr)
    fill(params, "betas", list(cfg.optim.betas))
    fill(params, "weight_decay", cfg.optim.weight_decay)
    sched = ds.setdefault("scheduler", {"type": "WarmupCosineLR", "params": {}})
    sp = sched.setdefault("params", {})
    fill(sp, "total_num_steps", total_steps)
    fill(sp, "warmup_num_steps", max(1, cfg.optim.warmup_steps))  # DeepSpeed requires >= 1
    fill(sp, "cos_min_ratio", cfg.optim.min_lr_ratio)
    precision = cfg.train.precision
    for key in ("bf16", "fp16"):
        ds.setdefault(key, {})
        if ds[key].get("enabled", "auto") == "auto":
            ds[key]["enabled"] = precision == key
    if cfg.dist.zero_stage >= 0:
        ds.setdefault("zero_optimization", {})["stage"] = cfg.dist.zero_stage
    return ds


class PlainEngine:
    """Single-process PyTorch: Adam, warmup-cosine, clipping, accumulation; same knobs as DeepSpeed."""

    def __init__(self, model: torch.nn.Module, ds: dict, device: torch.device, params=None, lr_lambda=None):
        self.module = model.to(device)
        p = ds["optimizer"]["params"]
        if ds["optimizer"]["type"].lower() not in ("adam", "adamw"):
            raise ValueError(f"optimizer {ds['optimizer']['type']!r}: the plain engine supports Adam/AdamW")
        cls = torch.optim.AdamW if ds["optimizer"]["type"].lower() == "adamw" else torch.optim.Adam
        self.optimizer = cls(model.parameters() if params is None else params, lr=p["lr"],
                             betas=tuple(p.get("betas", (0.9, 0.999))), eps=p.get("eps", 1e-8),
                             weight_decay=p.get("weight_decay", 0.0))
        if lr_lambda is None:
            sp = ds["scheduler"]["params"]
            total, warm, floor = sp["total_num_steps"], sp.get("warmup_num_steps", 0), sp.get("cos_min_ratio", 0.0)
            lr_lambda = lambda s: warmup_cosine(s, total, warm, floor)  # noqa: E731
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        self.clip = float(ds.get("gradient_clipping", 0.0) or 0.0)
        self.accum = int(ds.get("gradient_accumulation_steps", 1))
        self.micro = 0
        self.global_steps = 0
        self.grad_norm = float("nan")

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self) -> None:
        self.module.train()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro + 1) % self.accum == 0

    def step(self) -> None:
        boundary = self.is_gradient_accumulation_boundary()
        self.micro += 1
        if not boundary:
            return
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip if self.clip > 0 else float("inf"))
        self.grad_norm = float(norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> float:
        return self.grad_norm


def build_engine(model: torch.nn.Module, cfg: Config, device: torch.device, total_steps: int,
                 load_universal: bool = False, param_groups: list[dict] | None = None, lr_lambda=None):
    """`param_groups`: torch optimizer groups (e.g. an encoder group with its own lr); `lr_lambda`: a
    step -> multiplier function, or one per group, replacing the JSON's warmup-cosine schedule."""
    ds = deepspeed_config(cfg, total_steps)
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    params = param_groups if param_groups is not None else [p for p in model.parameters()]
    if not cfg.dist.deepspeed:
        if cfg.train.precision != "fp32":
            raise ValueError("train.precision bf16/fp16 needs dist.deepspeed=true (DeepSpeed manages mixed precision)")
        return PlainEngine(model, ds, device, params, lr_lambda), ds
    import deepspeed

    scheduler = None
    if lr_lambda is not None:  # a client schedule: DeepSpeed steps it after every optimizer step
        ds.pop("scheduler", None)
        scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)  # noqa: E731
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds, lr_scheduler=scheduler)
    return engine, ds
