"""Task heads on the pre-trained encoder: the fine-tuning side of the encoder API.

The encoder maps [N, L] univariate series to [N, T, d] tokens; heads read those tokens. Both
task models normalise each input series (instance norm, as in pre-training) and keep channels
independent, so a checkpoint pre-trained on C channels fine-tunes on any channel count. Both are
published models too (`from_pretrained` / `save_pretrained`, models/hub.py): config.json's "task"
section holds what rebuilds the head.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .config import SimMTMConfig
from .encoder import Encoder, instance_norm
from .hub_mixin import HubMixin


class ForecastHead(nn.Module):
    """Flatten [N, T, d] + linear to the horizon (the reference)."""

    def __init__(self, num_tokens: int, d_model: int, horizon: int, dropout: float = 0.0):
        super().__init__()
        self.linear = nn.Linear(num_tokens * d_model, horizon)
        self.drop = nn.Dropout(dropout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.drop(self.linear(z.flatten(1)))


class ClassifyHead(nn.Module):
    """Tokens -> class logits, averaged over channels. `pool="flatten"`: the flattened [T*d] tokens, the
    representation SimMTM's projector and aggregation read in pre-training; `"mean"`: mean over tokens."""

    def __init__(self, d_model: int, num_classes: int, dropout: float = 0.0, pool: str = "flatten",
                 num_tokens: int = 1):
        super().__init__()
        if pool not in ("flatten", "mean"):
            raise ValueError(f"pool must be flatten or mean, got {pool!r}")
        self.pool = pool
        self.drop = nn.Dropout(dropout)
        self.linear = nn.Linear(d_model * (num_tokens if pool == "flatten" else 1), num_classes)

    def forward(self, z: torch.Tensor, channels: int) -> torch.Tensor:
        pooled = z.flatten(1) if self.pool == "flatten" else z.mean(1)  # [B*C, T*d] or [B*C, d]
        pooled = pooled.view(-1, channels, pooled.shape[-1]).mean(1)
        return self.linear(self.drop(pooled))


def task_section(config: dict, kind: str, folder: str) -> dict:
    """config.json's "task" section, which must describe a `kind` model."""
    task = config.get("task")
    if not task:
        raise ValueError(f"{folder}: config.json has no 'task' section: a pre-trained encoder, not a fine-tuned "
                         f"model (load it with models.load_pretrained, or fine-tune it with trainer/finetune.py)")
    if task.get("kind") != kind:
        raise ValueError(f"{folder}: a {task.get('kind')!r} model, not a {kind!r} model")
    return task


class Forecaster(nn.Module, HubMixin):
    """[B, C, L] history -> [B, C, H] forecast, channel-independent, de-normalised."""

    def __init__(self, encoder: Encoder, horizon: int, dropout: float = 0.0):
        super().__init__()
        self.encoder = encoder
        self.head = ForecastHead(encoder.num_tokens, encoder.cfg.d_model, horizon, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, length = x.shape
        xn, mean, std = instance_norm(x.reshape(b * c, length).float())
        dtype = self.encoder.embed.weight.dtype  # bf16/fp16 under DeepSpeed; statistics stay fp32
        y = self.head(self.encoder(xn.to(dtype))).float() * std + mean
        return y.view(b, c, -1)

    def config_sections(self) -> dict:
        return {"model": dataclasses.asdict(self.encoder.cfg),
                "task": {"kind": "forecast", "horizon": self.head.linear.out_features, "dropout": self.head.drop.p}}

    @classmethod
    def from_config(cls, cfg: SimMTMConfig, config: dict, folder: str) -> "Forecaster":
        task = task_section(config, "forecast", folder)
        return cls(Encoder(cfg), task["horizon"], task["dropout"])


class Classifier(nn.Module, HubMixin):
    """[B, C, L] -> [B, classes] logits."""

    def __init__(self, encoder: Encoder, num_classes: int, dropout: float = 0.0, pool: str = "flatten"):
        super().__init__()
        self.encoder = encoder
        self.head = ClassifyHead(encoder.cfg.d_model, num_classes, dropout, pool, encoder.num_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, length = x.shape
        xn, _, _ = instance_norm(x.reshape(b * c, length).float())
        return self.head(self.encoder(xn.to(self.encoder.embed.weight.dtype)), c).float()

    def config_sections(self) -> dict:
        return {"model": dataclasses.asdict(self.encoder.cfg),
                "task": {"kind": "classify", "num_classes": self.head.linear.out_features,
                         "dropout": self.head.drop.p, "pool": self.head.pool}}

    @classmethod
    def from_config(cls, cfg: SimMTMConfig, config: dict, folder: str) -> "Classifier":
        task = task_section(config, "classify", folder)
        return cls(Encoder(cfg), task["num_classes"], task["dropout"], task["pool"])
