"""Downstream metrics in plain numpy (no sklearn dependency): forecasting MSE/MAE and
classification accuracy, macro-F1 and AUROC, computed the way the SimMTM / TF-C papers report them.
"""
from __future__ import annotations

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
