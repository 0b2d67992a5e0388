"""Downstream data for fine-tuning, as tensors: forecasting windows (input, target) of a time-split
series or of a shard stream, and labelled classification sets (TF-C `.pt` folders, UCR/UEA archives).

Why here and not in the trainer: these are readers and window arithmetic; fine-tuning decides only
what to train on them (trainer/finetune.py wraps them with its seasonal scale and label mapping).
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import DataConfig
from .errors import DataError
from .loader import build_loader
from .readers import load_pt, read_input

Pair = tuple[torch.Tensor, torch.Tensor]  # inputs [N, C, L] and targets [N, C, H] or labels [N]


def forecast_windows(arr: np.ndarray, seq_len: int, horizon: int, stride: int) -> Pair:
    """[C, T] -> every window of L+H rows starting at 0, stride, ... (split into input and target)."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.shape[1] < seq_len + horizon:
        raise DataError(f"a split of {t.shape[1]} rows is shorter than input {seq_len} + horizon {horizon}")
    w = t.unfold(1, seq_len + horizon, stride).permute(1, 0, 2).contiguous()  # [N, C, L+H]
    return w[..., :seq_len], w[..., seq_len:]


def stream_forecast_windows(cfg: DataConfig, split: str, seq_len: int, horizon: int, stride: int) -> Pair:
    """Multi-series shard sources: the pre-training stream, in order, with forecasting windows."""
    dc = replace(cfg, window_stride=stride, shuffle=False, infinite=False, channels="multivariate")
    loader = build_loader(dc, seq_len=seq_len + horizon, batch_size=256, split=split, overlap=seq_len,
                          shuffle=False, drop_last=False)
    batches = [b if isinstance(b, torch.Tensor) else torch.as_tensor(b) for b in loader]
    if not batches:
        raise DataError(f"{cfg.source}: no {split} windows of length {seq_len + horizon}")
    w = torch.cat(batches).float()
    return w[..., :seq_len].contiguous(), w[..., seq_len:].contiguous()


def _pt_set(path: Path) -> Pair:
    x, y = load_pt(str(path), labels=True)
    x = torch.as_tensor(x).float()
    return (x[:, None] if x.dim() == 2 else x), torch.as_tensor(y).long().view(-1)


def _archive_set(path: Path) -> Pair:
    """UCR `.tsv` or UEA `.ts` (the pre-training readers): [N, C, L] and labels; ragged, NaN-holding
    or unlabelled sets are refused, naming the file."""
    raw = read_input(str(path))
    shapes = {s.values.shape for s in raw.series}
    if len(shapes) != 1:
        raise DataError(f"{path}: series of different shapes {sorted(shapes)[:4]}: fine-tuning needs equal "
                        f"channels and length (resample the set first)")
    if any(s.label is None for s in raw.series):
        raise DataError(f"{path}: unlabelled series")
    x = np.stack([s.values for s in raw.series])
    if not np.isfinite(x).all():
        raise DataError(f"{path}: NaN/missing values are not supported for fine-tuning")
    return torch.from_numpy(x).float(), torch.tensor([s.label for s in raw.series])


def _carve_val(x: torch.Tensor, y: torch.Tensor, frac: float, seed: int) -> tuple[Pair, Pair]:
    """Stratified, seeded validation split out of the training set (sets that ship none)."""
    rng = np.random.default_rng(seed)
    val_idx = []
    for c in np.unique(y.numpy()):
        idx = np.flatnonzero(y.numpy() == c)
        rng.shuffle(idx)
        val_idx.extend(idx[:max(1, int(round(frac * len(idx))))] if len(idx) > 1 else [])
    mask = np.zeros(len(y), bool)
    mask[val_idx] = True
    return (x[~mask], y[~mask]), (x[mask], y[mask])


def classification_sets(source: str, val_fraction: float, seed: int) -> dict[str, Pair]:
    """train/val/test of a TF-C `.pt` folder (test := val.pt when no test.pt ships, e.g. Epilepsy, then
    val is carved from train) or of a UCR `*_TRAIN.tsv` / UEA `*_TRAIN.ts` + `*_TEST` folder (val
    carved from train, stratified and seeded)."""
    root = Path(source)
    if not root.is_dir():
        raise DataError(f"data.source {root}: classification expects a folder of TF-C .pt, UCR .tsv or UEA .ts files")
    if (root / "train.pt").exists():
        tr = _pt_set(root / "train.pt")
        if (root / "test.pt").exists():
            te = _pt_set(root / "test.pt")
            va = _pt_set(root / "val.pt") if (root / "val.pt").exists() else None
        elif (root / "val.pt").exists():
            te, va = _pt_set(root / "val.pt"), None
        else:
            raise DataError(f"{root}: train.pt without test.pt or val.pt")
    else:
        ext = next((e for e in (".tsv", ".tsv.gz", ".ts", ".ts.gz") if list(root.glob(f"*_TRAIN{e}"))), ".ts")
        trains, tests = sorted(root.glob(f"*_TRAIN{ext}")), sorted(root.glob(f"*_TEST{ext}"))
        if len(trains) != 1 or len(tests) != 1:
            raise DataError(f"{root}: expected train.pt (TF-C), or one NAME_TRAIN.tsv + NAME_TEST.tsv (UCR), "
                            f"or one NAME_TRAIN.ts + NAME_TEST.ts (UEA), optionally gzipped (.gz)")
        tr, te, va = _archive_set(trains[0]), _archive_set(tests[0]), None
    if va is None:
        tr, va = _carve_val(*tr, val_fraction, seed)
    return {"train": tr, "val": va, "test": te}


def label_subset(n: int, fraction: float, seed: int, labels: Optional[np.ndarray] = None) -> np.ndarray:
    """Sorted indices of a reproducible `fraction` of n training items: ceil(fraction * n) overall, or
    per class (at least one each) when labels are given, so every class keeps an example."""
    if fraction >= 1.0:
        return np.arange(n)
    rng = np.random.default_rng(seed + 9973)
    if labels is None:
        return np.sort(rng.permutation(n)[:max(1, math.ceil(fraction * n))])
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.extend(rng.permutation(idx)[:max(1, math.ceil(fraction * len(idx)))])
    return np.sort(np.asarray(keep))
