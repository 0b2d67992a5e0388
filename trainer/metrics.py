"""Downstream metrics in plain numpy (no sklearn dependency): forecasting MSE/MAE and
classification accuracy, macro-F1 and AUROC, computed the way the SimMTM / TF-C papers report them;
and the scaled forecasting metrics fev and GIFT-Eval report beside them (MASE, sMAPE, skill against
seasonal naive), from sums a sharded evaluation can all-reduce.

Definitions, each equal to a maintained implementation (tests/test_metrics.py checks them on fixtures):
- MASE (Hyndman & Koehler 2006; fev's `MASE`, utilsforecast's `losses.mase`): per channel, the test MAE
  over the in-sample MAE of the seasonal-naive forecast on the training split, |y_t - y_{t-m}|; then the
  mean over channels. Scale-free, so it reads the same on z-scored and raw values.
- sMAPE (M4; fev's and GluonTS's `SMAPE`): mean of 2|y - yhat| / (|y| + |yhat|), in [0, 2], on the raw
  (de-normalised) values: a percentage of a z-scored level means nothing. A 0/0 term counts 0, as in
  utilsforecast, whose `losses.smape` leaves out the factor 2.
- skill (fev's leaderboard: 1 - error / error of seasonal naive, error = MASE): 1 - MASE / MASE of the
  seasonal-naive forecast on the same windows; > 0 beats it, 1 is perfect.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


def mse(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean squared error over every element (all windows, channels and horizon steps)."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if pred.shape != true.shape:
        raise ValueError(f"mse: prediction shape {pred.shape} != target shape {true.shape}")
    return float(np.mean((pred - true) ** 2))


def mae(pred: np.ndarray, true: np.ndarray) -> float:
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if pred.shape != true.shape:
        raise ValueError(f"mae: prediction shape {pred.shape} != target shape {true.shape}")
    return float(np.mean(np.abs(pred - true)))


def accuracy(labels: np.ndarray, pred: np.ndarray) -> float:
    labels, pred = np.asarray(labels), np.asarray(pred)
    return float(np.mean(labels == pred))


def macro_f1(labels: np.ndarray, pred: np.ndarray, num_classes: int | None = None) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions
    (sklearn's f1_score(average="macro") convention; a class with no TP/FP/FN is skipped)."""
    labels, pred = np.asarray(labels).astype(int), np.asarray(pred).astype(int)
    classes = np.union1d(labels, pred) if num_classes is None else np.arange(num_classes)
    f1s = []
    for c in classes:
        tp = np.sum((pred == c) & (labels == c))
        fp = np.sum((pred == c) & (labels != c))
        fn = np.sum((pred != c) & (labels == c))
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else 0.0


def _rankdata(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based), ties share the mean rank: what Mann-Whitney AUROC needs."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def binary_auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum statistic (ties count one half)."""
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _rankdata(np.asarray(score, np.float64))
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Binary: AUROC of the positive-class score; multi-class: macro one-vs-rest over the classes
    present in labels (sklearn's roc_auc_score(multi_class="ovr", average="macro") on those classes)."""
    labels, probs = np.asarray(labels).astype(int), np.asarray(probs, np.float64)
    if probs.ndim != 2:
        raise ValueError(f"auroc: expected [N, classes] scores, got shape {probs.shape}")
    if probs.shape[1] == 2:
        return binary_auroc(labels == 1, probs[:, 1])
    vals = [binary_auroc(labels == c, probs[:, c]) for c in np.unique(labels)]
    vals = [v for v in vals if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def classification_metrics(labels: np.ndarray, logits: np.ndarray) -> dict:
    probs = softmax(logits)
    pred = probs.argmax(1)
    return {"accuracy": accuracy(labels, pred), "macro_f1": macro_f1(labels, pred),
            "auroc": auroc(labels, probs)}


# ----------------------------------------------------------------------------- scaled forecasting metrics

_PER_DAY = {"h", "min", "s", "ms", "us", "ns"}  # sub-daily units: the season is one day
_SEASON = {"D": 7, "B": 5, "W": 52, "ME": 12, "MS": 12, "QE": 4, "QS": 4, "YE": 1, "YS": 1}


def season_length(freq: Optional[str]) -> int:
    """Season m of a pandas frequency string: a day of sub-daily steps (hourly 24, 15-minute 96), a
    week of days (7; business days 5), a year of weeks (52), months (12) or quarters (4), utilsforecast's
    and M4's table. 1 (the plain naive forecast) for an unknown or irregular frequency."""
    import pandas as pd

    if not freq:
        return 1
    try:
        off = pd.tseries.frequencies.to_offset(freq)
    except ValueError:
        return 1
    code = off.rule_code.split("-")[0]
    if code in _PER_DAY:
        day, step = pd.Timedelta(days=1), pd.Timedelta(off)
        return int(day // step) if day % step == pd.Timedelta(0) and step < day else 1
    return _SEASON.get(code, 1) if off.n == 1 else 1


def seasonal_scale(train: np.ndarray, season: int) -> np.ndarray:
    """[C, T] training split -> [C] in-sample seasonal-naive MAE, mean |y_t - y_{t-m}| (MASE's scale)."""
    train = np.asarray(train, np.float64)
    if train.shape[-1] <= season:
        raise ValueError(f"seasonal_scale: a training split of {train.shape[-1]} steps has no season of {season}")
    return np.abs(train[:, season:] - train[:, :-season]).mean(1)


@dataclass(frozen=True)
class SeasonalScale:
    """What the scaled metrics need from a forecasting set's training split, per channel."""
    season: int  # m: the seasonal-naive forecast repeats the input's last m steps
    scale: np.ndarray  # [C] seasonal_scale of the training split, in the units the model sees
    mean: np.ndarray  # [C] model units -> raw values (x * std + mean), for sMAPE
    std: np.ndarray


SUMS = 5  # rows of `forecast_sums`: squared error, absolute error, naive absolute error, sMAPE terms, count


def forecast_sums(pred: np.ndarray, true: np.ndarray, naive: np.ndarray, ref: SeasonalScale) -> np.ndarray:
    """[B, C, H] forecasts, targets and seasonal-naive forecasts -> [SUMS, C] per-channel sums, which add
    over batches and ranks; `forecast_metrics` turns them into the metrics."""
    pred, true, naive = (np.asarray(a, np.float64) for a in (pred, true, naive))
    err = pred - true
    raw = lambda a: a * ref.std[:, None] + ref.mean[:, None]  # noqa: E731
    num, den = 2.0 * np.abs(raw(pred) - raw(true)), np.abs(raw(pred)) + np.abs(raw(true))
    smape_terms = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    count = np.full(err.shape[1], float(err.shape[0] * err.shape[2]))
    return np.stack([(err ** 2).sum((0, 2)), np.abs(err).sum((0, 2)), np.abs(naive - true).sum((0, 2)),
                     smape_terms.sum((0, 2)), count])


def forecast_metrics(sums: np.ndarray, ref: SeasonalScale) -> dict:
    """MSE, MAE, MASE, sMAPE and skill from `forecast_sums` (summed over every window). Channels whose
    training split is constant (scale 0) are left out of MASE and skill, as fev leaves out non-finite terms."""
    sse, sae, sae_naive, smape_sum, count = np.asarray(sums, np.float64)
    n = count.sum()
    ok = ref.scale > 0
    mase_ = float(np.mean(sae[ok] / count[ok] / ref.scale[ok])) if ok.any() else float("nan")
    naive = float(np.mean(sae_naive[ok] / count[ok] / ref.scale[ok])) if ok.any() else float("nan")
    return {"mse": float(sse.sum() / n), "mae": float(sae.sum() / n), "mase": mase_,
            "smape": float(smape_sum.sum() / n), "skill": 1.0 - mase_ / naive if naive > 0 else float("nan")}
