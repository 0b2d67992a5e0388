"""Forecasting baselines a pre-trained model has to beat, in plain torch, with the task models'
[B, C, L] -> [B, C, H] interface so fine-tuning and evaluation take them as they are.

Seasonal naive needs no training and is the reference of MASE and the skill score; DLinear (Zeng et al.,
"Are Transformers Effective for Time Series Forecasting?", AAAI 2023) is the linear model that long-horizon
Transformers are measured against: a series split into a moving-average trend and the remainder, one
linear map from the window to the horizon for each, weights shared by all channels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def seasonal_naive(x: torch.Tensor, season: int, horizon: int) -> torch.Tensor:
    """[..., L] windows -> [..., H]: the last `season` steps repeated, y[L + h] = x[L - m + h mod m]."""
    length = x.shape[-1]
    if not 1 <= season <= length:
        raise ValueError(f"seasonal naive: season {season} must be in [1, input length {length}]")
    return x[..., length - season + torch.arange(horizon, device=x.device) % season]


class SeasonalNaive(nn.Module):
    def __init__(self, season: int, horizon: int):
        super().__init__()
        self.season, self.horizon = season, horizon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return seasonal_naive(x, self.season, self.horizon)


class DLinear(nn.Module):
    """Trend = moving average over `kernel` steps (the window's ends repeated, as the reference pads);
    forecast = Linear(trend) + Linear(window - trend)."""

    def __init__(self, seq_len: int, horizon: int, kernel: int = 25):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"DLinear: kernel must be odd and >= 1, got {kernel}")
        self.kernel = kernel
        self.trend = nn.Linear(seq_len, horizon)
        self.seasonal = nn.Linear(seq_len, horizon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.trend.weight.dtype)  # bf16/fp16 under DeepSpeed; forecasts are returned in fp32
        pad = (self.kernel - 1) // 2
        b, c, length = x.shape
        flat = F.pad(x.reshape(b * c, 1, length), (pad, pad), mode="replicate")
        trend = F.avg_pool1d(flat, self.kernel, stride=1).view(b, c, length)
        return (self.trend(trend) + self.seasonal(x - trend)).float()
