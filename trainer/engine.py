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


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient norm (train.on_nonfinite); nothing non-finite
    was saved. The message names the step and the last good checkpoint."""


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
            raise ValueError(f"scheduler {ds.get('scheduler', {}).get('type')!r}: the plain engine supports "
                             f"WarmupCosineLR or a client schedule")
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
        if math.isfinite(self.grad_norm):  # a non-finite update is dropped, as DeepSpeed's ZeRO optimizers do
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> float:
        return self.grad_norm


def step_unless_nonfinite(engine) -> bool:
    """engine.step(), except that an update whose gradient norm is NaN/inf is dropped (gradients
    cleared, optimizer state and schedule untouched) on every engine: the plain engine and DeepSpeed's
    ZeRO optimizers drop it themselves, DeepSpeed without ZeRO is checked here before its step.
    False when dropped. Under fp16 DeepSpeed's loss scaler owns overflows (routine, not divergence)."""
    boundary = engine.is_gradient_accumulation_boundary()
    if isinstance(engine, PlainEngine):
        engine.step()
        return not boundary or math.isfinite(engine.grad_norm)
    if not boundary or engine.fp16_enabled():
        engine.step()
        return True
    if not engine.zero_optimization():  # the gradients are whole (and all-reduced) on every rank here
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            engine.zero_grad()
            engine.micro_steps += 1  # what its step() counts: the next accumulation window stays aligned
            return False
    engine.step()
    norm = engine.get_global_grad_norm()
    return engine.was_step_applied() and (norm is None or math.isfinite(norm))


class NonFiniteGuard:
    """train.on_nonfinite for one run: `stop` raises at the first non-finite loss or gradient norm;
    `skip_step` counts the dropped updates and raises after `max_in_row` of them in a row."""

    def __init__(self, policy: str, max_in_row: int):
        self.policy, self.max_in_row = policy, max_in_row
        self.skipped = self.in_row = 0

    def check(self, what: str | None, where: str, saved: str) -> None:
        """`what`: "loss" or "gradient norm" when non-finite, None for a good update; `where` (the step)
        and `saved` (what the run kept) go into the error."""
        if what is None:
            self.in_row = 0
            return
        self.skipped += 1
        self.in_row += 1
        if self.policy == "stop":
            raise NonFiniteError(f"non-finite {what} at {where}; stopped, {saved} "
                                 f"(train.on_nonfinite=skip_step skips such updates instead)")
        if self.in_row >= self.max_in_row:
            raise NonFiniteError(f"non-finite {what} at {where}, {self.in_row} skipped updates in a row "
                                 f"(train.max_nonfinite_in_row={self.max_in_row}); stopped, {saved}")


def build_engine(model: torch.nn.Module, cfg: Config, device: torch.device, total_steps: int,
                 load_universal: bool = False, param_groups: list[dict] | None = None, lr_lambda=None):
    """`param_groups`: torch optimizer groups (e.g. an encoder group with its own lr); `lr_lambda`: a
    step -> multiplier function, or one per group, replacing the JSON's warmup-cosine schedule."""
    ds = deepspeed_config(cfg, total_steps)
    sched = ds.get("scheduler", {})
    if lr_lambda is None and sched.get("type") == "WarmupCosineLR":
        # Ours in both engines: DeepSpeed's own class applies its first rate (0) for two updates, so
        # every later rate one update late against the plain engine's LambdaLR.
        sp = sched["params"]
        total, warm, floor = sp["total_num_steps"], sp.get("warmup_num_steps", 0), sp.get("cos_min_ratio", 0.0)
        lr_lambda = lambda s: warmup_cosine(s, total, warm, floor)  # noqa: E731
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
