"""Downstream metrics against direct numpy reference computations on fixed arrays."""
import itertools

import numpy as np
import pytest
import torch

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


# ----------------------------------------------------------------------------- scaled forecasting metrics

def _ref(scale, season=1, mean=0.0, std=1.0):
    c = len(scale)
    return metrics.SeasonalScale(season, np.asarray(scale, float), np.full(c, mean), np.full(c, std))


def test_season_length_from_frequency():
    assert [metrics.season_length(f) for f in ("h", "15min", "30min", "D", "B", "W-TUE", "ME", "QE", "YE")] == \
        [24, 96, 48, 7, 5, 52, 12, 4, 1]
    assert [metrics.season_length(f) for f in (None, "", "5h", "2D", "not-a-freq")] == [1, 1, 1, 1, 1]


def test_mase_smape_skill_hand_computed():
    assert metrics.seasonal_scale(np.array([[1.0, 2, 4, 7, 11]]), 1).tolist() == [2.5]  # |diffs| 1, 2, 3, 4
    assert metrics.seasonal_scale(np.array([[1.0, 2, 4, 7, 11]]), 2).tolist() == [5.0]  # 3, 5, 7
    pred, true, naive = np.array([[[2.0, 4.0]]]), np.array([[[1.0, 5.0]]]), np.array([[[0.0, 3.0]]])
    m = metrics.forecast_metrics(metrics.forecast_sums(pred, true, naive, _ref([2.5])), _ref([2.5]))
    assert m["mse"] == 1.0 and m["mae"] == 1.0
    assert m["mase"] == pytest.approx(1.0 / 2.5)  # MAE 1 over the scale
    assert m["skill"] == pytest.approx(1 - (1.0 / 2.5) / (1.5 / 2.5))  # naive MAE 1.5: 1/3
    assert m["smape"] == pytest.approx((2 * 1 / 3 + 2 * 1 / 9) / 2)
    # sMAPE reads raw values: z * std + mean (pred 14, 18; true 12, 20); MASE does not change
    raw = _ref([2.5], mean=10.0, std=2.0)
    m = metrics.forecast_metrics(metrics.forecast_sums(pred, true, naive, raw), raw)
    assert m["smape"] == pytest.approx((4 / 26 + 4 / 38) / 2) and m["mase"] == pytest.approx(0.4)
    zero = metrics.forecast_sums(np.zeros((1, 1, 2)), np.array([[[0.0, 1.0]]]), np.zeros((1, 1, 2)), _ref([1.0]))
    assert metrics.forecast_metrics(zero, _ref([1.0]))["smape"] == pytest.approx(1.0)  # 0/0 counts 0: (0 + 2) / 2


def test_mase_and_smape_equal_utilsforecast():
    """Per (channel, window) series with the channel's training split: utilsforecast's mean MASE is ours;
    its sMAPE leaves out the factor 2 of M4's / fev's."""
    pd = pytest.importorskip("pandas")
    losses = pytest.importorskip("utilsforecast.losses")
    rng = np.random.default_rng(0)
    c, t, b, h, m = 3, 60, 4, 5, 7
    train = rng.normal(size=(c, t)).cumsum(1) + 5
    pred, true = rng.normal(size=(b, c, h)) + 3, rng.normal(size=(b, c, h)) + 3
    ids = [(f"{ch}-{w}", ch, w) for ch in range(c) for w in range(b)]
    df = pd.DataFrame([(u, t + k, true[w, ch, k], pred[w, ch, k]) for u, ch, w in ids for k in range(h)],
                      columns=["unique_id", "ds", "y", "model"])
    train_df = pd.DataFrame([(u, k, train[ch, k]) for u, ch, _ in ids for k in range(t)], columns=["unique_id", "ds", "y"])
    ref = _ref(metrics.seasonal_scale(train, m), season=m)
    ours = metrics.forecast_metrics(metrics.forecast_sums(pred, true, true, ref), ref)
    assert ours["mase"] == pytest.approx(losses.mase(df, ["model"], m, train_df)["model"].mean(), rel=1e-12)
    assert ours["smape"] == pytest.approx(2 * losses.smape(df, ["model"])["model"].mean(), rel=1e-12)


def _periodic_windows(length=48, horizon=24, period=24, n=10):
    t = torch.arange(period, dtype=torch.float64)  # one period, tiled: exactly periodic, zeros included
    series = torch.stack([torch.sin(2 * np.pi * t / period), 2 + torch.cos(2 * np.pi * t / period)])
    series = series.repeat(1, (n + length + horizon) // period + 1)
    w = series.unfold(1, length + horizon, 1)[:, :n].permute(1, 0, 2)
    return w[..., :length].float(), w[..., length:].float()


def test_seasonal_naive_of_a_periodic_series_is_exact():
    from models.baselines import SeasonalNaive
    from trainer.distributed import DistEnv
    from trainer.finetune import Split, evaluate

    x, y = _periodic_windows()
    ref = _ref([0.5, 0.5], season=24)  # the scale from a (noisier) training split
    m = evaluate(SeasonalNaive(24, 24), Split(x, y, ref), "forecast", 4, DistEnv())
    assert m["mse"] == pytest.approx(0.0, abs=1e-12) and m["mae"] == pytest.approx(0.0, abs=1e-6)
    assert m["mase"] == pytest.approx(0.0, abs=1e-5) and m["smape"] == pytest.approx(0.0, abs=1e-5)
    assert evaluate(SeasonalNaive(12, 24), Split(x, y, ref), "forecast", 4, DistEnv())["mse"] > 0.5


def test_dlinear_beats_the_mean_forecast_and_seasonal_naive():
    """DLinear trained by finetune() (task.baseline=dlinear) on trend + season + noise: lower test MSE than
    repeating the window's mean, and skill > 0 against seasonal naive."""
    from trainer.config import load_config
    from trainer.finetune import FinetuneConfig, Split, finetune
    from models.config import SimMTMConfig

    g = torch.Generator().manual_seed(0)
    t = torch.arange(1200, dtype=torch.float32)
    series = torch.stack([0.004 * t + torch.sin(2 * np.pi * t / 12), -0.003 * t + 0.5 * torch.cos(2 * np.pi * t / 12)])
    series = series + 0.2 * torch.randn(series.shape, generator=g)
    ref = _ref(metrics.seasonal_scale(series[:, :800].numpy(), 12), season=12)

    def windows(a, b, stride):
        w = series[:, a:b].unfold(1, 56, stride).permute(1, 0, 2)
        return Split(w[..., :48].contiguous(), w[..., 48:].contiguous(), ref)
    data = {"train": windows(0, 800, 2), "val": windows(800, 1000, 4), "test": windows(1000, 1200, 1)}
    cfg = load_config(None, ["task.baseline=dlinear", "task.horizon=8", "train.epochs=8", "task.patience=8",
                             "train.batch_size=32", "optim.lr=1e-2", "train.num_threads=1"], cls=FinetuneConfig)
    cfg.model = SimMTMConfig(seq_len=48)
    r = finetune(cfg, data)
    mean = data["test"].x.mean(-1, keepdim=True).expand_as(data["test"].y)
    assert r["mse"] < 0.5 * metrics.mse(mean.numpy(), data["test"].y.numpy())
    assert r["skill"] > 0 and r["season"] == 12 and r["trainable_params"] == 2 * (48 * 8 + 8)


def test_forecast_data_carries_the_training_split_scale():
    """ETTh1 is hourly: season 24; the scale is the z-scored training split's, the statistics the manifest's."""
    from data_pipeline import load_split_array, resolve_manifest
    from trainer.config import REPO_ROOT, load_config
    from trainer.finetune import FinetuneConfig, forecast_data

    src = str(REPO_ROOT / "data" / "ETTh1.csv")
    cfg = load_config(None, [f"data.source={src}", "task.horizon=24", "data.window_stride=64",
                             "task.val_stride=64", "task.test_stride=64"], cls=FinetuneConfig)
    data = forecast_data(cfg, 48)
    ref = data["test"].seasonal
    assert ref is data["train"].seasonal and ref.season == 24
    cache = str(REPO_ROOT / cfg.data.cache_dir)
    train = load_split_array(src, "train", 48, cache_dir=cache)
    np.testing.assert_allclose(ref.scale, metrics.seasonal_scale(train, 24))
    np.testing.assert_allclose(ref.std, resolve_manifest(src, cache_dir=cache)["stats"]["std"])
    cfg.task.season = 168  # a week of hours: longer than the 48-step window, so the naive forecast (m=1)
    assert forecast_data(cfg, 48)["test"].seasonal.season == 1
