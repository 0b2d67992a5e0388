"""Channel-independent Transformer encoders: one token per time point (the reference) or per patch.

Attention goes through `scaled_dot_product_attention`, which never materialises the L x L score
tensor on its fused paths. Attention-probability dropout defaults off: on CPU any dropout_p > 0
sends SDPA to the math path (~6x slower, L x L in memory); regularisation stays on the residual
and feed-forward paths, as in the reference.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import SimMTMConfig


def sinusoidal_positions(length: int, d_model: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : d_model // 2]
    return pe


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, attn_dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.attn_dropout = attn_dropout

    def forward(self, x: torch.Tensor, explicit: bool = False) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        p = self.attn_dropout if self.training else 0.0
        if explicit:  # reference path for tests: the full score tensor, softmax, weighted sum
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            y = F.dropout(scores.softmax(-1), p) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(n, t, d))


class EncoderLayer(nn.Module):
    """Post-norm layer as in the reference (attention, then a position-wise feed-forward)."""

    def __init__(self, cfg: SimMTMConfig):
        super().__init__()
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.attn_dropout)
        self.ff = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU() if cfg.activation == "gelu" else nn.ReLU(),
                                nn.Dropout(cfg.dropout), nn.Linear(cfg.d_ff, cfg.d_model))
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, explicit: bool = False) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.attn(x, explicit)))
        return self.norm2(x + self.drop(self.ff(x)))


class Encoder(nn.Module):
    """[N, L] univariate series -> [N, T, d] token representations (T = L, or the patch count)."""

    def __init__(self, cfg: SimMTMConfig):
        super().__init__()
        self.cfg = cfg
        self.num_tokens = cfg.num_tokens
        if cfg.encoder == "pointwise":
            # Value embedding of the reference: a circular 3-tap convolution over the series.
            self.embed = nn.Conv1d(1, cfg.d_model, kernel_size=3, padding=1, padding_mode="circular", bias=False)
            # the reference's init (std sqrt(2/3), ~2.4x PyTorch's default): token scale vs positions
            nn.init.kaiming_normal_(self.embed.weight, mode="fan_in", nonlinearity="leaky_relu")
        else:
            self.embed = nn.Linear(cfg.patch_len, cfg.d_model)
        self.register_buffer("pos", sinusoidal_positions(self.num_tokens, cfg.d_model), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.e_layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.encoder == "pointwise":
            return self.embed(x[:, None, :]).transpose(1, 2)
        pad = (self.num_tokens - 1) * self.cfg.patch_stride + self.cfg.patch_len - x.shape[-1]
        if pad > 0:  # repeat the last value so the final patch is full (PatchTST's end padding)
            x = torch.cat([x, x[:, -1:].expand(-1, pad)], 1)
        return self.embed(x.unfold(-1, self.cfg.patch_len, self.cfg.patch_stride))

    def forward(self, x: torch.Tensor, explicit_attention: bool = False) -> torch.Tensor:
        if x.shape[-1] != self.cfg.seq_len:
            raise ValueError(f"encoder expects series of length {self.cfg.seq_len}, got {x.shape[-1]}")
        tok = self.tokens(x)
        h = self.drop(tok + self.pos.to(tok.dtype))
        for layer in self.layers:
            h = layer(h, explicit_attention)
        return self.norm(h)


def instance_norm(x: torch.Tensor, keep: torch.Tensor | None = None, eps: float = 1e-5):
    """Normalise each series by the mean/std of its unmasked points; returns (x_norm, mean, std).

    Masked points stay exactly 0 after normalisation, as in the reference.
    """
    if keep is None:
        mean = x.mean(-1, keepdim=True)
        std = torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + eps)
        return (x - mean) / std, mean, std
    w = keep.to(x.dtype)
    count = w.sum(-1, keepdim=True).clamp(min=1.0)
    mean = (x * w).sum(-1, keepdim=True) / count
    var = (((x - mean) * w) ** 2).sum(-1, keepdim=True) / count
    std = torch.sqrt(var + eps)
    return (x - mean) / std * w, mean, std
