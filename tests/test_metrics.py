"""Downstream metrics against direct numpy reference computations on fixed arrays."""
import itertools

import numpy as np
import pytest

from trainer import metrics


def test_mse_mae_match_numpy():
    rng = np.random.default_rng(0)
    p, t = rng.normal(size=(5, 7, 12)), rng.normal(size=(5, 7, 12))
    assert metrics.mse(p, t) == pytest.approx(np.mean((p - t) ** 2), rel=1e-12)
    assert metrics.mae(p, t) == pytest.approx(np.mean(np.abs(p - t)), rel=1e-12)
    assert metrics.mse([1.0, 2.0], [1.0, 4.0]) == 2.0 and metrics.mae([1.0, 2.0], [1.0, 4.0]) == 1.0
    with pytest.raises(ValueError, match="shape"):
        metrics.mse(p, t[:, :, :3])


def test_accuracy_and_macro_f1_fixed():
    y = np.array([0, 0, 1, 1, 2, 2, 2])
    p = np.array([0, 1, 1, 1, 2, 0, 2])
    assert metrics.accuracy(y, p) == pytest.approx(5 / 7)
    # per class: c0 tp1 fp1 fn1 -> 0.5; c1 tp2 fp1 fn0 -> 0.8; c2 tp2 fp0 fn1 -> 0.8
    assert metrics.macro_f1(y, p) == pytest.approx((0.5 + 0.8 + 0.8) / 3)


def _pairwise_auc(y, s):
    pos, neg = s[y], s[~y]
    return np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg)])


def test_auroc_binary_and_ovr_match_pairwise_reference():
    y = np.array([0, 1, 1, 0, 1, 0, 0, 1])
    s = np.array([0.1, 0.9, 0.4, 0.4, 0.8, 0.3, 0.7, 0.4])  # ties included
    probs = np.stack([1 - s, s], 1)
    assert metrics.auroc(y, probs) == pytest.approx(_pairwise_auc(y == 1, s))
    rng = np.random.default_rng(1)
    y3 = rng.integers(0, 3, 40)
    p3 = metrics.softmax(rng.normal(size=(40, 3)))
    ref = np.mean([_pairwise_auc(y3 == c, p3[:, c]) for c in range(3)])
    assert metrics.auroc(y3, p3) == pytest.approx(ref)
    perfect = np.eye(3)[y3]
    assert metrics.auroc(y3, perfect) == 1.0


def test_classification_metrics_bundle():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    m = metrics.classification_metrics(np.array([0, 1, 1, 1]), logits)
    assert m["accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m["auroc"] == 1.0
