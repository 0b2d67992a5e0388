"""Channel-independent Transformer encoders: one token per time point (the reference) or per patch.

Attention goes through `scaled_dot_product_attention`, which never materialises the L x L score
tensor on its fused paths. Attention-probability dropout defaults off: on CPU any dropout_p > 0
sends SDPA to the math path (~6x slower, L x L in memory); regularisation stays on the residual
and feed-forward paths, as in the reference.

On CUDA the reference's heads of width 2 suit few fused kernels: memory-efficient attention needs
widths divisible by 4 (fp32) or 8 (bf16/fp16), cuDNN by 8, and flash (which pads to 8 itself) runs
bf16/fp16 only. So fp32 would take the math path (the [N, H, L, L] scores in memory, about 3 GB per
layer at the ETTh1 batch), and bf16 has flash alone. `sdpa` zero-pads the heads to a multiple of 8
on CUDA: zero columns add nothing to q.k nor to the output, and the scale stays 1/sqrt(true width).
On CPU padding only adds work (the reference encoder's forward+backward 1.3x slower, its attention
1.4x), so CPU heads stay as they are.
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import SimMTMConfig
from .hub_mixin import HubMixin

FUSED_HEAD_MULTIPLE = 8  # a head width that meets every CUDA fused SDPA kernel's alignment, whatever the dtype


def sinusoidal_positions(length: int, d_model: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : d_model // 2]
    return pe


def kernel_head_dim(head_dim: int, device: torch.device) -> int:
    """The head width handed to SDPA: rounded up to a multiple of 8 on CUDA, unchanged on CPU."""
    if device.type != "cuda" or head_dim % FUSED_HEAD_MULTIPLE == 0:
        return head_dim
    return -(-head_dim // FUSED_HEAD_MULTIPLE) * FUSED_HEAD_MULTIPLE


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
         width: int | None = None) -> torch.Tensor:
    """SDPA on heads zero-padded to `width` (default `kernel_head_dim`), sliced back to their width."""
    head_dim = q.shape[-1]
    width = width or kernel_head_dim(head_dim, q.device)
    if width != head_dim:
        pad = (0, width - head_dim)
        q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
    y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=1.0 / math.sqrt(head_dim))
    return y[..., :head_dim]


_PROBED = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)
_NO_KERNEL = ("No available kernel", "No viable backend")  # CUDA's and CPU's refusal messages


def sdpa_backends(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> dict:
    """Which SDPA kernels take q, k, v [N, H, T, head_dim] as `sdpa` hands them over, and which one torch picks.

    For the GPU check's record: "selected" is torch's choice (after `sdpa`'s padding), "unpadded" its
    choice for the heads as they are, "usable" every kernel that runs when it is the only one allowed,
    "failed" the first line of any other error a kernel raised (recorded, so the record survives it).
    Tensors that require grad ask about training (some kernels refuse backward for some widths).
    """
    width = kernel_head_dim(q.shape[-1], q.device)
    pad = (0, width - q.shape[-1])
    padded = [F.pad(t, pad) for t in (q, k, v)]

    def choice(ts) -> str:  # torch's own dispatch decision (private API, the one SDPA itself calls)
        return SDPBackend(torch._fused_sdp_choice(*ts, dropout_p=dropout_p)).name

    usable, failed = [], {}
    for backend in _PROBED:
        try:
            with warnings.catch_warnings(), sdpa_kernel([backend]):
                warnings.simplefilter("ignore")  # a refusal warns once per failed check
                F.scaled_dot_product_attention(*padded, dropout_p=dropout_p)
            usable.append(backend.name)
        except RuntimeError as e:
            if not any(m in str(e) for m in _NO_KERNEL):
                failed[backend.name] = str(e).strip().splitlines()[0][:200]
    return {"device": q.device.type, "dtype": str(q.dtype).removeprefix("torch."), "head_dim": q.shape[-1],
            "kernel_head_dim": width, "selected": choice(padded), "unpadded": choice((q, k, v)), "usable": usable,
            "failed": failed}


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
            y = sdpa(q, k, v, p)
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


class Encoder(nn.Module, HubMixin):
    """[N, L] univariate series -> [N, T, d] token representations (T = L, or the patch count).
    `Encoder.from_pretrained(...)` reads the encoder of any published folder (pre-trained or fine-tuned)."""

    PREFIX = "encoder."  # where the encoder's weights sit in a published folder

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

    def config_sections(self) -> dict:
        return {"model": dataclasses.asdict(self.cfg)}

    @classmethod
    def from_config(cls, cfg: SimMTMConfig, config: dict, folder: str) -> "Encoder":
        return cls(cfg)


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
