"""The optimisation engine behind one interface: a DeepSpeed engine, or plain PyTorch for one process.

Both read the same DeepSpeed JSON (optimizer, warmup-cosine schedule, clipping, accumulation) after
the training config has filled its "auto" entries, so a run means the same thing either way.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from . import distributed as dist
from .config import REPO_ROOT, Config, ConfigError, repo_path


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient norm (train.on_nonfinite); nothing non-finite
    was saved. The message names the step and the last good checkpoint."""


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
    """The JSON named by dist.ds_config with every "auto" entry filled from the training config.

    The config is the one place for the optimizer, schedule, batch and precision: a JSON entry may
    repeat a value but not contradict it (a concrete lr in the JSON used to win silently over optim.lr)."""
    path = Path(repo_path(cfg.dist.ds_config))
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"dist.ds_config: {path} not found (from here or in {REPO_ROOT})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"dist.ds_config: {path} is not valid JSON: {e}") from None

    def fill(d: dict, key: str, value: Any, name: str, where: str = "") -> None:
        given = d.get(key, "auto")
        if given == "auto":
            d[key] = value
        elif (list(given) if isinstance(given, (list, tuple)) else given) != \
                (list(value) if isinstance(value, (list, tuple)) else value):
            raise ConfigError(f"dist.ds_config: {path} sets {where}{key}={given!r} but {name} is {value!r}; "
                              f"set it in one place: {name} (with \"auto\" in the JSON)")

    fill(ds, "train_micro_batch_size_per_gpu", cfg.train.batch_size, "train.batch_size")
    fill(ds, "gradient_accumulation_steps", cfg.train.grad_accum, "train.grad_accum")
    fill(ds, "gradient_clipping", cfg.optim.grad_clip, "optim.grad_clip")
    ds.pop("train_batch_size", None) if ds.get("train_batch_size") == "auto" else None
    params = ds.setdefault("optimizer", {"type": "Adam", "params": {}}).setdefault("params", {})
    fill(params, "lr", cfg.optim.lr, "optim.lr", "optimizer.params.")
    fill(params, "betas", list(cfg.optim.betas), "optim.betas", "optimizer.params.")
    fill(params, "weight_decay", cfg.optim.weight_decay, "optim.weight_decay", "optimizer.params.")
    sp = ds.setdefault("scheduler", {"type": "WarmupCosineLR", "params": {}}).setdefault("params", {})
    fill(sp, "total_num_steps", total_steps, "the run's length (train.max_steps or train.epochs)", "scheduler.params.")
    # DeepSpeed requires >= 1
    fill(sp, "warmup_num_steps", max(1, cfg.optim.warmup_steps), "optim.warmup_steps (at least 1)", "scheduler.params.")
    fill(sp, "cos_min_ratio", cfg.optim.min_lr_ratio, "optim.min_lr_ratio", "scheduler.params.")
    for key in ("bf16", "fp16"):
        fill(ds.setdefault(key, {}), "enabled", cfg.train.precision == key, f"train.precision ({cfg.train.precision})",
             f"{key}.")
    if cfg.dist.zero_stage >= 0:
        ds.setdefault("zero_optimization", {})["stage"] = cfg.dist.zero_stage
    return ds


def fused_adam(device: torch.device) -> bool:
    """Torch's fused Adam kernel on CUDA: one launch for all parameters, it honours `found_inf` (so a
    non-finite update is dropped on the device), and nothing JIT-compiles (a DeepSpeed op build
    costs minutes on a fresh GPU machine). Elsewhere torch's default kernel: the CPU numbers stay
    those of the for-loop implementation, which the fused one does not match bitwise."""
    return torch.device(device).type == "cuda"


def build_optimizer(ds: dict, params, device: torch.device) -> torch.optim.Optimizer:
    """The JSON's optimizer as torch's Adam/AdamW, for both engines (DeepSpeed takes it as its client
    optimizer; ZeRO 1/2 wrap it), so they run the same kernels. "Adam" is torch's Adam (L2 weight
    decay) unless params.adam_w_mode is true: DeepSpeed itself reads "Adam" as AdamW; the two agree
    at weight_decay 0 (the default)."""
    kind = ds["optimizer"]["type"]
    if kind.lower() not in ("adam", "adamw"):
        raise ValueError(f"dist.ds_config: optimizer {kind!r} is not supported (Adam or AdamW)")
    p = dict(ds["optimizer"].get("params", {}))
    p.pop("torch_adam", None)  # DeepSpeed's switch for torch's implementation: always so here
    adam_w = p.pop("adam_w_mode", False)  # popped whatever the type: torch's classes do not take it
    cls = torch.optim.AdamW if kind.lower() == "adamw" or adam_w else torch.optim.Adam
    if "betas" in p:
        p["betas"] = tuple(p["betas"])
    if fused_adam(device) and "foreach" not in p:
        p.setdefault("fused", True)
    try:
        return cls(params, **p)
    except TypeError as e:
        raise ValueError(f"dist.ds_config: optimizer params: {e}") from None


def torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that updates the weights (DeepSpeed's client optimizer inside any wrapper)."""
    return getattr(engine, "basic_optimizer", None) or engine.optimizer


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return all(g.get("fused") for g in optimizer.param_groups)


@contextlib.contextmanager
def kernels_kept(optimizer: torch.optim.Optimizer):
    """Loading optimizer state puts back the saved param groups' `fused`/`foreach` (torch's and
    DeepSpeed's loaders both do): keep this run's choice, so a checkpoint written on the CPU resumes
    with the fused kernel on CUDA and the other way round; the fused kernel keeps `step` on the device."""
    chosen = [(g.get("fused"), g.get("foreach")) for g in optimizer.param_groups]
    yield
    for g, (fused, foreach) in zip(optimizer.param_groups, chosen):
        if bool(g.get("fused")) != bool(fused):
            for q in g["params"]:
                state = optimizer.state.get(q, {})
                if "step" in state:
                    state["step"] = torch.as_tensor(state["step"], dtype=torch.float32,
                                                    device=q.device if fused else "cpu")
        g["fused"], g["foreach"] = fused, foreach


class PlainEngine:
    """Single-process PyTorch: Adam, warmup-cosine, clipping, accumulation; same knobs as DeepSpeed."""

    def __init__(self, model: torch.nn.Module, ds: dict, device: torch.device, params=None, lr_lambda=None):
        self.module = model.to(device)
        self.optimizer = build_optimizer(ds, model.parameters() if params is None else params, device)
        if lr_lambda is None:
            raise ValueError(f"scheduler {ds.get('scheduler', {}).get('type')!r}: the plain engine supports "
                             f"WarmupCosineLR or a client schedule")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        self.clip = float(ds.get("gradient_clipping", 0.0) or 0.0)
        self.accum = int(ds.get("gradient_accumulation_steps", 1))
        self.micro = 0
        self.global_steps = 0
        self.grad_norm: torch.Tensor | None = None

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self) -> None:
        self.module.train()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro + 1) % self.accum == 0

    def step(self, defer: bool = False):
        """At an accumulation boundary: clip, then update unless the gradient norm is NaN/inf (as
        DeepSpeed's ZeRO optimizers do). Returns whether the update was applied: a bool, or with
        `defer` and a fused optimizer a device tensor (the kernel skips the update where `found_inf`
        is set, so the host never waits for the norm; the schedule moves on either way)."""
        boundary = self.is_gradient_accumulation_boundary()
        self.micro += 1
        if not boundary:
            return True
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip if self.clip > 0 else float("inf"))
        self.grad_norm = norm.detach()
        finite = torch.isfinite(self.grad_norm)
        on_device = defer and is_fused(self.optimizer)
        self.optimizer.found_inf = (~finite).float() if on_device else None
        applied = finite if on_device else bool(finite)
        if on_device or applied:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1
        return applied

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> torch.Tensor | None:
        """The last update's gradient norm, on the device (reading it is a host sync)."""
        return self.grad_norm

    def destroy(self) -> None:
        """DeepSpeed's engine unhooks itself from the model here (so a caller keeping the model does not
        keep the optimizer state); the plain engine holds no hooks."""

    # DeepSpeed's checkpoint interface, so checkpoint.py treats both engines alike
    def save_checkpoint(self, save_dir: str, tag: str, **_) -> None:
        """The weights as model.safetensors; optimizer, schedule and step counters as optimizer.pt."""
        from safetensors.torch import save_file

        folder = Path(save_dir) / tag
        save_file({k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()},
                  str(folder / "model.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "micro": self.micro, "global_steps": self.global_steps}, folder / "optimizer.pt")

    def load_checkpoint(self, load_dir: str, tag: str, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True) -> tuple[str, dict]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(load_dir) / tag
        try:
            self.module.load_state_dict(load_file(str(folder / "model.safetensors")))
        except (SafetensorError, OSError) as e:
            from .checkpoint import CheckpointError

            raise CheckpointError(f"{folder / 'model.safetensors'}: unreadable ({e})") from None
        if load_optimizer_states:
            opt = torch.load(folder / "optimizer.pt")
            self.optimizer.load_state_dict(opt["optimizer"])
            if load_lr_scheduler_states:
                self.scheduler.load_state_dict(opt["scheduler"])
            self.micro, self.global_steps = opt["micro"], opt["global_steps"]
        return str(folder), {}


def step_unless_nonfinite(engine, defer: bool = False):
    """engine.step(), except that an update whose gradient norm is NaN/inf is never applied
    (gradients cleared, optimizer state untouched) on every engine: the plain engine drops it itself;
    DeepSpeed's mixed-precision and ZeRO optimizers do too, deciding on the host (a sync of their own
    every step); DeepSpeed fp32 without ZeRO steps our torch optimizer directly and is checked here.
    Returns whether the update was applied. Under fp16 DeepSpeed's loss scaler owns overflows
    (routine, not divergence).

    `defer` (train.on_nonfinite=stop): where the optimizer is fused, the verdict stays on the device,
    returned as a bool tensor, and the schedule moves on regardless; the stop policy reads it later."""
    boundary = engine.is_gradient_accumulation_boundary()
    if isinstance(engine, PlainEngine):
        return engine.step(defer)
    if not boundary or engine.fp16_enabled():
        engine.step()
        return True
    optimizer = torch_optimizer(engine)
    direct = engine.optimizer is optimizer  # fp32 without ZeRO: no DeepSpeed wrapper checks the update
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if grads and not engine.zero_optimization() and (direct or not defer):  # whole, all-reduced gradients
        finite = torch.isfinite(torch.nn.utils.get_total_norm(grads))
        on_device = defer and is_fused(optimizer)
        optimizer.found_inf = (~finite).float() if on_device else None
        if on_device:
            engine.step()
            return finite
        if not finite:
            engine.zero_grad()
            engine.micro_steps += 1  # what its step() counts: the next accumulation window stays aligned
            return False
    engine.step()
    norm = engine.get_global_grad_norm()
    if isinstance(norm, torch.Tensor):
        return torch.isfinite(norm) & engine.was_step_applied() if defer else \
            engine.was_step_applied() and bool(torch.isfinite(norm))
    return engine.was_step_applied() and (norm is None or math.isfinite(norm))


class NonFiniteGuard:
    """train.on_nonfinite for one run: `stop` raises at the first non-finite loss or gradient norm;
    `skip_step` counts the dropped updates and raises after `max_in_row` of them in a row.

    Pre-training (`step`, `flag`, `verdict`) reads nothing per step under `stop`: the update is
    dropped on the device and the first bad step is noted there; the host learns of it at the next
    read (log steps, and always before saving, validating or publishing) and raises the error it
    would have raised at that step. `skip_step` must know at once whether a step counts (the step
    number, the schedule), so it reads every step (`sync`)."""

    shared = True  # run state: the count of dropped updates goes into state.json

    def __init__(self, policy: str, max_in_row: int, device: torch.device | str = "cpu"):
        self.policy, self.max_in_row = policy, max_in_row
        self.skipped = self.in_row = 0
        self.sync = policy != "stop"
        # (step, 1: loss | 2: gradient norm) of the first non-finite update since the last read; step 0: none
        self.first = torch.zeros(2, dtype=torch.long, device=device)

    def step(self, engine, at: int, losses: torch.Tensor):
        """step_unless_nonfinite (its answer returned) for optimizer step `at`, whose losses on this
        rank are `losses` (on the device); a non-finite update is noted on the device."""
        applied = step_unless_nonfinite(engine, defer=not self.sync)
        bad = ~torch.isfinite(losses).all()
        if isinstance(applied, torch.Tensor):
            bad = bad | ~applied
        elif not applied:
            bad = torch.ones_like(bad)
        what = torch.where(torch.isfinite(losses[0]), 2, 1)
        self.first = torch.where(bad & (self.first[0] == 0), torch.stack([torch.full_like(what, at), what]),
                                 self.first)
        return applied

    def state_dict(self) -> dict:
        return {"nonfinite_skipped": self.skipped} if self.skipped else {}

    def load_state_dict(self, sd: dict) -> None:
        self.skipped = sd.get("nonfinite_skipped", 0)

    def flag(self) -> torch.Tensor:
        """[1] float32 on the device: 1 when a non-finite update was noted since the last read."""
        return (self.first[:1] > 0).float()

    def verdict(self, flagged: bool, means: dict, at: int, saved: str) -> bool:
        """At a read of step `at`: `flagged` is `flag()` reduced over ranks, `means` the step's mean
        losses. Raises as `check` does, naming the first non-finite step; True when step `at`'s
        update was dropped (skip_step). Collective when flagged (the ranks' notes are gathered)."""
        if not flagged and all(map(math.isfinite, means.values())):
            self.in_row = 0
            return False
        step, code = at, 1 if not math.isfinite(means["loss"]) else 2
        if flagged:
            step, code = min(tuple(r) for r in dist.all_gather_object(self.first.tolist()) if r[0] > 0)
        self.first.zero_()
        self.check("loss" if code == 1 else "gradient norm", f"step {step}", saved)
        return True

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


def compile_model(engine) -> None:
    """train.compile: torch.compile the model in place, so its state_dict keys (the checkpoints) stay
    those of the eager module. A DeepSpeed engine compiles its module itself (with the accelerator's
    backend, inductor), after initialisation, so its ZeRO hooks are part of what is traced."""
    if isinstance(engine, PlainEngine):
        engine.module.compile()
    else:
        engine.compile()


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
    # Our torch optimizer as DeepSpeed's client optimizer (its ZeRO and mixed-precision wrappers wrap
    # it): built from the JSON's entry, which DeepSpeed then must not see as a second optimizer.
    model.to(device)  # in place: `params` are the moved tensors
    optimizer = build_optimizer(ds, params, device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config={k: v for k, v in ds.items() if k != "optimizer"})
    return engine, ds
