"""Fine-tune a published SimMTM encoder (or a random one, for baselines) on forecasting or classification.

    python trainer/finetune.py --config configs/finetune_etth1.yaml init=runs/etth1/published task.horizon=96
    deepspeed --num_gpus 2 trainer/finetune.py --config configs/finetune_etth1.yaml init=... (CPU: any --num_gpus)
    python trainer/finetune.py --config configs/finetune_foundation.yaml task.mode=lora task.lora_rank=8

Why it looks like this: the result must say what a checkpoint is worth downstream, so model selection
and early stopping read the validation split only and the test split is evaluated exactly once, at the
end, on every window (stride 1). Each rank trains on a stride of one shared per-epoch permutation of
the training windows (the same number of steps everywhere); evaluation is sharded and all-reduced.
Forecasts are scored by MSE/MAE and by MASE, sMAPE and skill against seasonal naive (trainer/metrics.py),
whose scale and season come from the training split.

LoRA (task.mode=lora) wraps the encoder with peft adapters on the projections named by task.lora_targets;
the base weights stay frozen, the head trains fully, and the adapters take the encoder's place in LP-FT:
the encoder group, its rate (encoder_lr_mult x optim.lr), joining after the head warm-up.
`merged_for_export` folds them into the weights for a model that loads without peft.
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline import load_split_array, resolve_manifest
from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.fs import atomic_write
from data_pipeline.downstream import (classification_sets, forecast_windows, label_subset,
                                      stream_forecast_windows)
from models import Encoder
from models.config import SimMTMConfig
from models.baselines import DLinear, seasonal_naive
from models.heads import Classifier, Forecaster
from models.hub import load_state
from trainer import distributed as dist
from trainer.config import DistConfig, OptimConfig, TrainConfig, load_config, repo_path, split_cli, to_dict
from trainer.engine import NonFiniteError, NonFiniteGuard, build_engine, step_unless_nonfinite
from trainer.metrics import (SUMS, SeasonalScale, classification_metrics, forecast_metrics, forecast_sums,
                             season_length, seasonal_scale)
from trainer.monitor import progress_bar


@dataclass
class TaskConfig:
    kind: Literal["forecast", "classify"] = "forecast"
    horizon: int = 96  # forecast steps H (any positive value)
    # linear_probe: frozen encoder, only the head trains; lora: frozen encoder + trained LoRA adapters
    mode: Literal["full", "linear_probe", "lora"] = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0  # adapter scale alpha / rank
    lora_dropout: float = 0.0  # peft's default; 0.05 made a CPU step ~1.6x a full one, not 1.2-1.3x (bench/lora_step.py)
    # encoder modules that get adapters (peft target_modules: a name or dotted suffix): attention's input
    # and output projections and both feed-forward layers (nn.Linear in models/encoder.py)
    lora_targets: list[str] = field(default_factory=lambda: ["attn.qkv", "attn.out", "ff.0", "ff.3"])
    # dlinear: the linear baseline (models/baselines.py) in place of encoder + head, same data and
    # selection (forecast, mode full; the window length is that of arch, init or model.seq_len)
    baseline: Literal["", "dlinear"] = ""
    # seasonal-naive period m for MASE / skill: 0 reads it from the data's frequency (metrics.season_length);
    # a season longer than the input window falls back to 1 (the naive forecast must come from the window)
    season: int = 0
    label_fraction: float = 1.0  # share of the training split used, drawn reproducibly (seeded by train.seed)
    head_dropout: float = 0.1  # the authors' forecasting-head dropout (their head_dropout)
    dropout: Optional[float] = 0.2  # the authors' encoder dropout (None: keep the checkpoint's pre-training value)
    # LP-FT: for the first `head_warmup_epochs` epochs only the new head trains (the encoder's learning
    # rate is 0 and its dropout off: a linear probe), then the whole model, the encoder at
    # `encoder_lr_mult` x optim.lr. Keeps pre-trained features from being disturbed by a random head.
    head_warmup_epochs: int = 1
    encoder_lr_mult: float = 0.25  # measured best on validation for pre-trained encoders (bench/lpft_defaults.py)
    # cosine: optim.warmup_steps linear warm-up then cosine to optim.min_lr_ratio (the encoder's phase
    # restarts the warm-up when it joins); authors: the authors' schedule as their code runs it (first
    # epoch at optim.lr / 25, then optim.lr halving every epoch), per epoch for encoder and head alike,
    # with no head warm-up (head_warmup_epochs does not apply).
    schedule: Literal["cosine", "authors"] = "cosine"
    patience: int = 3  # early stopping: epochs without a better validation score
    val_stride: int = 1  # stride of validation windows (budget runs)
    # stride of test windows: 1 (every window, the standard) unless a budget harness subsamples them
    test_stride: int = 1
    eval_batch_size: int = 64
    fit_length: Literal["error", "interpolate"] = "error"  # classification series whose length != seq_len
    # classification head: flatten the tokens (what pre-training's projector reads) or mean-pool them
    pool: Literal["flatten", "mean"] = "flatten"
    val_fraction: float = 0.2  # classification sets without a validation file: carved (stratified) from train
    # false: stop after selection without touching the test split (for choosing settings on validation)
    evaluate_test: bool = True

    def validate(self) -> None:
        if self.horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {self.horizon}")
        if not 0.0 < self.label_fraction <= 1.0:
            raise ValueError(f"label_fraction must be in (0, 1], got {self.label_fraction}")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"head_dropout must be in [0, 1), got {self.head_dropout}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.patience < 1 or self.val_stride < 1 or self.test_stride < 1 or self.eval_batch_size < 1:
            raise ValueError("patience, val_stride, test_stride and eval_batch_size must be >= 1")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.head_warmup_epochs < 0:
            raise ValueError(f"head_warmup_epochs must be >= 0, got {self.head_warmup_epochs}")
        if not self.encoder_lr_mult >= 0.0:
            raise ValueError(f"encoder_lr_mult must be >= 0, got {self.encoder_lr_mult}")
        if self.lora_rank < 1 or not self.lora_alpha > 0 or not 0.0 <= self.lora_dropout < 1.0 or not self.lora_targets:
            raise ValueError(f"task.lora_rank must be >= 1, lora_alpha > 0, lora_dropout in [0, 1), lora_targets "
                             f"not empty; got {self.lora_rank}, {self.lora_alpha}, {self.lora_dropout}, {self.lora_targets}")
        if self.baseline and (self.kind != "forecast" or self.mode != "full"):
            raise ValueError(f"task.baseline={self.baseline} is a forecasting model trained whole: "
                             f"needs task.kind=forecast and task.mode=full")
        if self.season < 0:
            raise ValueError(f"task.season must be >= 0 (0: from the data's frequency), got {self.season}")


def _ft_optim() -> OptimConfig:
    return OptimConfig(lr=1e-4, warmup_steps=1)


def _ft_train() -> TrainConfig:
    return TrainConfig(batch_size=16, epochs=10, log_every=50)


@dataclass
class FinetuneConfig:
    name: str = "finetune"
    # a published folder/URL (models.load_pretrained), or "random" for the random-initialisation baseline
    init: str = "random"
    # random init copies the architecture of this published folder/URL; empty: use model.*
    arch: str = ""
    task: TaskConfig = field(default_factory=TaskConfig)
    model: SimMTMConfig = field(default_factory=SimMTMConfig)
    # data.source: forecast: a TSLib CSV, a shard manifest/folder/glob (time-split); classify: a folder
    # with TF-C {train,val,test}.pt or UCR NAME_TRAIN.tsv/NAME_TEST.tsv. data.window_stride: training windows.
    data: DataConfig = field(default_factory=lambda: DataConfig(shuffle=False))
    optim: OptimConfig = field(default_factory=_ft_optim)
    train: TrainConfig = field(default_factory=_ft_train)  # batch_size, epochs (max), seed, num_threads
    dist: DistConfig = field(default_factory=DistConfig)
    # folder for result.json (metrics, history, resolved config) and the selected model (model/, for
    # python -m trainer.predict); empty: none
    out: str = ""
    storage_options: dict = field(default_factory=dict)  # fsspec options for a URL init


# ----------------------------------------------------------------------------- data

@dataclass
class Split:
    x: torch.Tensor  # [N, C, L]
    y: torch.Tensor  # forecast: [N, C, H] float; classify: [N] long
    seasonal: Optional[SeasonalScale] = None  # forecast: MASE's scale etc.; None: MSE/MAE only


def _seasonal(cfg: FinetuneConfig, source: str, train: np.ndarray, seq_len: int) -> SeasonalScale:
    """The training split's seasonal scale, with the season from task.season or the manifest's frequency
    and the manifest's statistics (to undo the z-scoring for sMAPE)."""
    dc = cfg.data
    m = resolve_manifest(source, cache_dir=repo_path(dc.cache_dir, anchor=True), storage_options=dc.storage_options or None)
    season = cfg.task.season or season_length(m.get("freq"))
    season = season if season <= seq_len else 1
    st = m["stats"]
    return SeasonalScale(season, seasonal_scale(train, season), np.asarray(st["mean"], np.float64),
                         np.asarray(st["std"], np.float64))


def forecast_data(cfg: FinetuneConfig, seq_len: int) -> dict[str, Split]:
    """train (data.window_stride), val (task.val_stride) and test (task.test_stride, default every
    window), z-scored on train stats; single-series sets carry their training split's seasonal scale."""
    dc, h = replace(cfg.data, source=repo_path(cfg.data.source)), cfg.task.horizon
    strides = {"train": dc.window_stride, "val": cfg.task.val_stride, "test": cfg.task.test_stride}
    out, seasonal = {}, None
    for split, stride in strides.items():
        try:
            arr = load_split_array(dc.source, split, seq_len, cache_dir=repo_path(dc.cache_dir, anchor=True),
                                   storage_options=dc.storage_options or None)
            if split == "train":
                seasonal = _seasonal(cfg, dc.source, arr, seq_len)
            out[split] = Split(*forecast_windows(arr, seq_len, h, stride), seasonal=seasonal)
        except DataError as e:
            if "exactly one time-split series" not in str(e):
                raise
            out[split] = Split(*stream_forecast_windows(dc, split, seq_len, h, stride))
    return out


def classify_data(cfg: FinetuneConfig) -> dict[str, Split]:
    """The labelled set in data.source (data_pipeline/downstream.py), labels as read (remapped in finetune())."""
    sets = classification_sets(repo_path(cfg.data.source), cfg.task.val_fraction, cfg.train.seed)
    return {k: Split(*v) for k, v in sets.items()}


def fit_length(split: Split, seq_len: int, how: str, what: str) -> Split:
    length = split.x.shape[-1]
    if length == seq_len:
        return split
    if how == "error":
        raise ValueError(f"{what}: series length {length} does not match the checkpoint's seq_len {seq_len} "
                         f"(set task.fit_length=interpolate to resample, or pre-train with model.seq_len={length})")
    return Split(F.interpolate(split.x, size=seq_len, mode="linear", align_corners=True), split.y)


# ----------------------------------------------------------------------------- model

def with_lora(encoder: torch.nn.Module, task: TaskConfig) -> torch.nn.Module:
    """The encoder wrapped by peft: LoRA adapters on task.lora_targets, every base weight frozen."""
    from peft import LoraConfig, get_peft_model  # imported here: peft pulls in transformers (seconds)

    config = LoraConfig(r=task.lora_rank, lora_alpha=task.lora_alpha, lora_dropout=task.lora_dropout,
                        target_modules=list(task.lora_targets), bias="none")
    try:
        return get_peft_model(encoder, config)
    except ValueError as e:
        names = sorted({n for n, _ in encoder.named_modules() if n})
        raise ValueError(f"task.lora_targets={task.lora_targets}: {e} (encoder modules: {names[:12]} ...)") from None


def merged_for_export(module: torch.nn.Module) -> torch.nn.Module:
    """The model to save or serve: LoRA adapters merged into the encoder's weights (W + scale * BA, on a
    copy, so the trained module keeps its adapters), a plain Forecaster/Classifier that loads without
    peft. Any other model is returned as it is."""
    if not hasattr(getattr(module, "encoder", None), "merge_and_unload"):
        return module
    merged = copy.deepcopy(module)
    merged.encoder = merged.encoder.merge_and_unload().requires_grad_(True)
    return merged


def build_model(cfg: FinetuneConfig, num_classes: int = 0) -> tuple[torch.nn.Module, SimMTMConfig]:
    """Encoder from a published checkpoint (or random, same architecture) plus a fresh head; LoRA
    adapters on the encoder (task.mode=lora); or the DLinear baseline (task.baseline)."""
    if cfg.task.baseline:  # the window length of the model it stands in for
        src = cfg.arch or ("" if cfg.init == "random" else cfg.init)
        arch = load_state(repo_path(src), cfg.storage_options or None)[0] if src else cfg.model
        torch.manual_seed(cfg.train.seed + 1)
        return DLinear(arch.seq_len, cfg.task.horizon), arch
    if cfg.init == "random":
        arch = load_state(repo_path(cfg.arch), cfg.storage_options or None)[0] if cfg.arch else cfg.model
    else:
        arch, state, _ = load_state(repo_path(cfg.init), cfg.storage_options or None)
    if cfg.task.dropout is not None:  # a fine-tuning setting, not part of the weights
        arch = replace(arch, dropout=cfg.task.dropout)
    if cfg.init == "random":
        torch.manual_seed(cfg.train.seed)
    encoder = Encoder(arch)
    if cfg.init != "random":
        enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        if not enc:
            raise ValueError(f"init {cfg.init}: the checkpoint holds no encoder.* weights")
        encoder.load_state_dict(enc)
    torch.manual_seed(cfg.train.seed + 1)  # the head: same initial weights for every init and rank
    if cfg.task.kind == "forecast":
        model = Forecaster(encoder, cfg.task.horizon, cfg.task.head_dropout)
    else:
        model = Classifier(encoder, num_classes, cfg.task.head_dropout, cfg.task.pool)
    if cfg.task.mode == "linear_probe":
        encoder.requires_grad_(False)
    elif cfg.task.mode == "lora":  # after the head: its initial weights are those of every mode
        model.encoder = with_lora(encoder, cfg.task)
    return model, arch


# ----------------------------------------------------------------------------- train / evaluate

@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, kind: str, batch_size: int, env,
             desc: Optional[str] = None) -> dict:
    """Sharded over ranks (item i on rank i % world), sums all-reduced: identical on every rank.
    `desc`: label of a progress bar on rank 0 (a long test split otherwise runs silently for minutes)."""
    was_training = model.training
    model.eval()
    idx = torch.arange(env.rank, len(split.x), env.world_size)
    starts = range(0, len(idx), batch_size)
    bar = progress_bar(len(starts), desc or "", desc is not None and env.is_main, unit="batch")
    if kind == "forecast":  # without a seasonal scale (multi-series sources): MSE and MAE only
        channels = split.x.shape[1]
        ref = split.seasonal or SeasonalScale(1, np.ones(channels), np.zeros(channels), np.ones(channels))
        acc = torch.zeros(SUMS, channels, dtype=torch.float64)
        for i in starts:
            b = idx[i:i + batch_size]
            pred = model(split.x[b].to(env.device)).double().cpu()
            naive = seasonal_naive(split.x[b], ref.season, pred.shape[-1])
            acc += torch.from_numpy(forecast_sums(pred.numpy(), split.y[b].numpy(), naive.numpy(), ref))
            bar.update()
        bar.close()
        if env.distributed:
            dist.all_reduce_sum_(acc)
        model.train(was_training)
        m = forecast_metrics(acc.numpy(), ref)
        if split.seasonal is None:
            m.update(mase=None, smape=None, skill=None)
        return {**m, "loss": m["mse"]}
    logits = []
    for i in starts:
        logits.append(model(split.x[idx[i:i + batch_size]].to(env.device)).float().cpu())
        bar.update()
    bar.close()
    mine = (idx.numpy(), torch.cat(logits).numpy() if logits else np.zeros((0, 0), np.float32))
    parts = dist.all_gather_object(mine) if env.distributed else [mine]
    order = np.concatenate([p[0] for p in parts])
    logit = np.concatenate([p[1] for p in parts if len(p[0])])[np.argsort(order)]
    labels = split.y.numpy()
    m = classification_metrics(labels, logit)
    m["loss"] = float(F.cross_entropy(torch.from_numpy(logit), torch.from_numpy(labels)))
    model.train(was_training)
    return m


def _score(kind: str, m: dict) -> tuple:
    """Lower is better: validation MSE, or (-accuracy, cross-entropy) for classification; NaN (a
    diverged epoch) ranks last, so a later finite epoch can still be selected."""
    score = (m["mse"],) if kind == "forecast" else (-m["accuracy"], m["loss"])
    return tuple(math.inf if v != v else v for v in score)


def _set_train_mode(model: torch.nn.Module, mode: str, probing: bool = False) -> None:
    model.train()
    if mode == "linear_probe" or probing:
        model.encoder.eval()  # a frozen encoder also keeps dropout off: a true feature extractor


def lr_schedule(task: TaskConfig, optim, steps_per_epoch: int, total: int) -> tuple[list, int]:
    """Per-group step -> LR multiplier functions [encoder, head], and the step the encoder joins.

    During the head warm-up (LP-FT's linear-probe phase) the encoder's multiplier is exactly 0, so
    Adam leaves its weights untouched whatever the engine or ZeRO stage."""
    from trainer.engine import authors_finetune, warmup_cosine

    # the authors' schedule has no separate head phase: its first epoch runs head and encoder at lr / 25;
    # a baseline has no encoder to hold back
    warmup_epochs = 0 if task.schedule == "authors" or task.baseline else task.head_warmup_epochs
    join = 0 if task.mode == "linear_probe" else warmup_epochs * steps_per_epoch
    if join >= total:  # a run too short for a head phase and a full phase: full fine-tuning throughout
        join = 0
    warm, floor = max(1, optim.warmup_steps), optim.min_lr_ratio
    if task.schedule == "authors":
        def head(s: int) -> float:
            return authors_finetune(s, steps_per_epoch)
        enc_base = head
    else:
        def head(s: int) -> float:
            return warmup_cosine(s, total, warm, floor)

        def enc_base(s: int) -> float:
            return warmup_cosine(s - join, total - join, warm, floor)

    def encoder(s: int) -> float:
        return 0.0 if (task.mode == "linear_probe" or s < join) else enc_base(s)
    return [encoder, head], join


def _update(engine, loss: torch.Tensor) -> Optional[str]:
    """Backward and optimizer step, unless the loss (on any rank) or the gradient norm is non-finite:
    then the update is dropped on every rank and the answer names what was non-finite."""
    if dist.all_reduce_sum_(torch.tensor([float(not torch.isfinite(loss.detach()))]))[0] > 0:
        return "loss"
    engine.backward(loss)
    return None if step_unless_nonfinite(engine) else "gradient norm"


METRICS = ("mse", "mae", "mase", "smape", "skill", "accuracy", "macro_f1", "auroc")  # test metrics in a result


def finetune(cfg: FinetuneConfig, data: Optional[dict[str, Split]] = None) -> dict:
    """Train with validation-only selection, evaluate the selected weights once on test; the result
    dict (same on every rank) has the metrics, timings, history and the selected epoch."""
    cfg.task.validate()  # again for callers that built the config in code (load_config validated it)
    if cfg.train.epochs < 1:
        raise ValueError(f"train.epochs must be >= 1, got {cfg.train.epochs}")
    env = dist.start(cfg.dist, cfg.train.num_threads)
    kind = cfg.task.kind
    seed = cfg.train.seed
    if data is None:
        if kind == "forecast":
            seq_len = (load_state(repo_path(cfg.arch or cfg.init), cfg.storage_options or None)[0].seq_len
                       if (cfg.init != "random" or cfg.arch) else cfg.model.seq_len)
            data = forecast_data(cfg, seq_len)
        else:
            data = classify_data(cfg)
    num_classes = 0
    if kind == "classify":  # classes are those seen in training and validation; test labels must be among them
        classes = np.unique(np.concatenate([data["train"].y.numpy(), data["val"].y.numpy()]))
        unseen = sorted(set(np.unique(data["test"].y.numpy())) - set(classes))
        if unseen:
            raise DataError(f"{cfg.data.source}: test labels {unseen} never occur in train/val")
        lookup = {int(c): i for i, c in enumerate(classes)}  # any integer labels -> 0..K-1
        data = {k: Split(v.x, torch.tensor([lookup[int(c)] for c in v.y.numpy()], dtype=torch.long))
                for k, v in data.items()}
        num_classes = len(classes)
    model, arch = build_model(cfg, num_classes)
    if kind == "classify":
        data = {k: fit_length(v, arch.seq_len, cfg.task.fit_length, f"{cfg.data.source} {k}")
                for k, v in data.items()}
    for k, v in data.items():
        if v.x.shape[-1] != arch.seq_len:
            raise ValueError(f"{k} split: input length {v.x.shape[-1]} does not match the checkpoint's "
                             f"seq_len {arch.seq_len}")
    train = data["train"]
    keep = label_subset(len(train.x), cfg.task.label_fraction, seed,
                        train.y.numpy() if kind == "classify" else None)
    train = Split(train.x[keep], train.y[keep])
    per_rank = len(train.x) // env.world_size
    if per_rank < 1:
        raise ValueError(f"{len(train.x)} training items cannot be split over {env.world_size} ranks")
    bs = cfg.train.batch_size
    steps_per_epoch = math.ceil(per_rank / bs)
    total = cfg.train.max_steps if cfg.train.max_steps > 0 else cfg.train.epochs * steps_per_epoch
    torch.manual_seed(seed + env.rank)  # dropout streams
    lambdas, join = lr_schedule(cfg.task, cfg.optim, steps_per_epoch, total)
    # the encoder's trainable weights (all of them, its LoRA adapters, or none) and the rest: the head,
    # or a whole baseline model
    in_encoder = {id(p) for p in model.encoder.parameters()} if hasattr(model, "encoder") else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) in in_encoder], "lr": cfg.optim.lr * cfg.task.encoder_lr_mult},
              {"params": [p for p in trainable if id(p) not in in_encoder], "lr": cfg.optim.lr}]
    keep = [i for i, g in enumerate(groups) if g["params"]]  # a frozen encoder (linear probe): no group (ZeRO needs none empty)
    lr_keys = [("lr_encoder", "lr_head")[i] for i in keep]
    engine, _ = build_engine(model, cfg, env.device, total, param_groups=[groups[i] for i in keep],
                             lr_lambda=[lambdas[i] for i in keep])
    module = engine.module
    log = print if env.is_main else (lambda *a, **k: None)
    log(f"finetune[{kind}{'/H=' + str(cfg.task.horizon) if kind == 'forecast' else ''}]: "
        f"{'baseline=' + cfg.task.baseline if cfg.task.baseline else 'init=' + cfg.init} "
        f"mode={cfg.task.mode} {len(train.x)} train items ({env.world_size} rank(s), {steps_per_epoch} steps/epoch), "
        f"val {len(data['val'].x)}, test {len(data['test'].x)}, engine={'deepspeed' if cfg.dist.deepspeed else 'torch'}, "
        f"schedule={cfg.task.schedule}" + (f", head warm-up {join} steps" if join and cfg.task.mode != "linear_probe" else ""),
        flush=True)

    best, best_score, best_epoch, bad, step, history = None, None, -1, 0, 0, []
    guard = NonFiniteGuard(cfg.train.on_nonfinite, cfg.train.max_nonfinite_in_row)
    show = cfg.train.progress and env.is_main
    bar = progress_bar(total, "fine-tune", show)
    t0 = time.perf_counter()
    for epoch in range(cfg.train.epochs):
        _set_train_mode(module, cfg.task.mode, probing=step < join)  # join falls on an epoch boundary
        perm = torch.randperm(len(train.x), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        mine = perm[:per_rank * env.world_size][env.rank::env.world_size]
        losses, lr = [], {}  # the epoch's applied updates: their losses, the rates the last one used
        for i in range(0, per_rank, bs):
            b = mine[i:i + bs]
            out = engine(train.x[b].to(env.device))
            target = train.y[b].to(env.device)
            loss = F.mse_loss(out, target) if kind == "forecast" else F.cross_entropy(out, target)
            rates = engine.get_lr()  # the rates this step's update uses (read before the schedule moves)
            step += 1
            what = _update(engine, loss)
            guard.check(what, f"fine-tuning step {step} (epoch {epoch})", "nothing saved")
            if what is None:
                losses.append(float(loss.detach()))
                lr = dict(zip(lr_keys, rates))
            bar.update()
            bar.set_postfix(loss=losses[-1] if losses else float("nan"), refresh=False)
            if step >= total:
                break
        val = evaluate(module, data["val"], kind, cfg.task.eval_batch_size, env,
                       desc=f"val (epoch {epoch})" if show else None)
        score = _score(kind, val)
        # a non-finite validation score means diverged weights: never selected
        improved = all(map(math.isfinite, score)) and (best_score is None or score < best_score)
        history.append({"epoch": epoch, "train_loss": sum(losses) / len(losses) if losses else float("nan"), **lr,
                        **{f"val_{k}": v for k, v in val.items()}, "seconds": time.perf_counter() - t0})
        log(f"  epoch {epoch}: train {history[-1]['train_loss']:.4f} val {score[0]:.4f}"
            f"{' *' if improved else ''} lr {lr.get('lr_head', float('nan')):.2e} "
            f"({history[-1]['seconds']:.0f}s)", flush=True)
        if improved:
            best_score, best_epoch, bad = score, epoch, 0
            best = {k: v.detach().clone() for k, v in module.state_dict().items()}
        elif step > join:  # epochs of the head warm-up do not count: the encoder has not trained yet
            bad += 1
        if bad >= cfg.task.patience or step >= total:
            break
    bar.close()
    train_seconds = time.perf_counter() - t0
    if best is None:
        raise NonFiniteError(f"fine-tuning: no epoch of {len(history)} ended with a finite validation score "
                             f"(the weights diverged); stopped, nothing saved")
    module.load_state_dict(best)  # the validation-selected weights; test is read only below, once
    t1 = time.perf_counter()
    test = (evaluate(module, data["test"], kind, cfg.task.eval_batch_size, env, desc="test" if show else None)
            if cfg.task.evaluate_test else {})
    result = {
        "task": kind, "init": cfg.init, "mode": cfg.task.mode, "label_fraction": cfg.task.label_fraction,
        "horizon": cfg.task.horizon if kind == "forecast" else None,
        "baseline": cfg.task.baseline or None,
        "mse": test.get("mse"), "mae": test.get("mae"), "mase": test.get("mase"), "smape": test.get("smape"),
        "skill": test.get("skill"), "accuracy": test.get("accuracy"),
        "macro_f1": test.get("macro_f1"), "auroc": test.get("auroc"),
        "best_val": {k: v for k, v in history[best_epoch].items() if k.startswith("val_")} if history else None,
        "train_seconds": train_seconds, "test_seconds": time.perf_counter() - t1,
        "best_epoch": best_epoch, "epochs_run": len(history), "steps": step, "n_train": len(train.x),
        "n_val": len(data["val"].x), "n_test": len(data["test"].x), "world_size": env.world_size,
        "engine": "deepspeed" if cfg.dist.deepspeed else "torch", "skipped_steps": guard.skipped, "history": history,
        "seq_len": arch.seq_len, "num_classes": num_classes or None,
        "season": data["test"].seasonal.season if data["test"].seasonal else None,
        "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
    }
    for k in METRICS:  # e.g. AUROC of a one-class test set: null, not NaN
        if isinstance(result[k], float) and result[k] != result[k]:
            result[k] = None
    if env.is_main:
        metrics = {k: result[k] for k in METRICS if result[k] is not None}
        log(f"  test ({result['n_test']} items, epoch {best_epoch} weights): "
            + (" ".join(f"{k} {v:.4f}" for k, v in metrics.items()) if cfg.task.evaluate_test else "not evaluated")
            + f"; train {train_seconds:.0f}s", flush=True)
        if cfg.out:
            atomic_write(f"{cfg.out}/result.json", json.dumps({**result, "config": to_dict(cfg)}, indent=2).encode())
            if not cfg.task.baseline:  # a baseline is a reference row in results, not a model to keep
                from trainer.predict import save_finetuned  # trainer.predict imports this module

                saved = save_finetuned(merged_for_export(module), cfg, train.x.shape[1],
                                       classes if kind == "classify" else None)
                log(f"  model (for python -m trainer.predict): {saved}", flush=True)
    engine.destroy()
    result["_model"] = module
    return result


def main(argv: Optional[list[str]] = None) -> Optional[dict]:
    from trainer.cli import show_help

    argv = sys.argv[1:] if argv is None else argv
    if show_help(argv, __doc__, FinetuneConfig):
        return None
    path, overrides = split_cli(argv)
    cfg = load_config(path, overrides, cls=FinetuneConfig)
    result = finetune(cfg)
    dist.barrier()
    result.pop("_model", None)
    return result


if __name__ == "__main__":
    from trainer import cli

    dist.exit_process(cli.run(main))
