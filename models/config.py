"""Architecture and method knobs of SimMTM; a plain dataclass so models/ stays free of config parsing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class SimMTMConfig:
    seq_len: int = 336  # input window L
    # encoder
    encoder: Literal["pointwise", "patch"] = "pointwise"
    d_model: int = 32
    n_heads: int = 16
    e_layers: int = 3
    d_ff: int = 64
    dropout: float = 0.1  # residual / feed-forward dropout
    attn_dropout: float = 0.0  # attention-probability dropout; > 0 forces the slow math SDPA path on CPU
    activation: Literal["gelu", "relu"] = "gelu"
    patch_len: int = 16
    patch_stride: int = 8
    # projector / similarity
    proj_dim: int = 128
    temperature: float = 0.2
    similarity_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # dtype of the similarity/aggregation matmuls
    # masking
    mask: Literal["geometric", "bernoulli"] = "geometric"
    mask_ratio: float = 0.5
    mask_lm: float = 3.0
    num_views: int = 3  # M masked views per series
    # losses
    constraint_loss: bool = True  # False: the ablation without the manifold constraint
    auto_weight: bool = True  # learnable sigma weighting; False sums the two losses

    def validate(self) -> None:
        import math

        for k in ("dropout", "attn_dropout", "temperature", "mask_ratio", "mask_lm"):  # NaN passes < / > checks
            if not math.isfinite(getattr(self, k)):
                raise ValueError(f"{k} must be a finite number, got {getattr(self, k)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.seq_len > 65536:  # a sanity bound: attention over L tokens; the data bounds it further
            raise ValueError(f"seq_len must be <= 65536, got {self.seq_len}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.mask_lm < 1.0:
            raise ValueError(f"mask_lm must be >= 1, got {self.mask_lm}")
        if self.mask == "geometric" and self.mask_lm * (1 - self.mask_ratio) / self.mask_ratio < 1.0 - 1e-9:
            # kept stretches have mean lm*(1-r)/r and length >= 1: below 1 the masked fraction cannot reach r
            raise ValueError(f"geometric masks need mask_lm * (1 - mask_ratio) / mask_ratio >= 1 (mean kept "
                             f"stretch), got {self.mask_lm * (1 - self.mask_ratio) / self.mask_ratio:.3f}: raise "
                             f"mask_lm to >= {self.mask_ratio / (1 - self.mask_ratio):.3f} or lower mask_ratio")
        if self.num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {self.num_views}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.attn_dropout < 1.0):
            raise ValueError("dropout and attn_dropout must be in [0, 1)")
        for k in ("d_model", "n_heads", "e_layers", "d_ff", "proj_dim", "patch_len", "patch_stride"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.encoder == "patch" and self.patch_len > self.seq_len:
            raise ValueError(f"patch_len ({self.patch_len}) exceeds seq_len ({self.seq_len})")

    @property
    def num_tokens(self) -> int:
        if self.encoder == "pointwise":
            return self.seq_len
        return (self.seq_len - self.patch_len) // self.patch_stride + 1 + (
            1 if (self.seq_len - self.patch_len) % self.patch_stride else 0)
