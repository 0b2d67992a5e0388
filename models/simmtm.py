"""SimMTM pre-training: masked views -> encoder -> series-wise similarity -> point-wise aggregation.

Row layout of a batch: [originals; view 1; ...; view M], each block N0 = B*C rows, so the group
of row i is i % N0 and its positives are found by index arithmetic on the device. With a
`gather` (the trainer's autograd-aware all-gather) the constraint loss spans the global batch:
keys are the gathered representations and a local row's positives sit at global indices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .blockwise import similarity_and_losses
from .config import SimMTMConfig
from .encoder import Encoder, instance_norm
from .masking import make_views
from .similarity import mask_self, positive_index, similarity_logits

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Gather:
    """What the model needs to know of the other ranks: the all-gather and where its rows sit.

    `fn` concatenates equally shaped tensors from all ranks along dim 0 (rank order) and passes
    gradients back to each rank's slice. The default is the single-process identity.
    """
    fn: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    rank: int = 0
    world_size: int = 1
    # Autograd-aware sum over ranks for the projector's batch statistics (None: local batch).
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm whose training statistics span the global batch, given a cross-rank `reduce`.

    Why not SyncBatchNorm: it runs on CUDA only, and we test every path on CPU/gloo. With
    `reduce` = identity this is exactly nn.BatchNorm1d; with the trainer's autograd all-reduce,
    every rank normalises with the same statistics and keeps identical running buffers, so the
    result equals one process on the concatenated batch.
    """

    def forward(self, x: torch.Tensor, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        # Statistics and normalisation in fp32 whatever the weights' dtype (bf16 under DeepSpeed).
        xf = x.float()
        if self.training:
            reduce = reduce or (lambda t: t)
            count = reduce(xf.new_full((1,), float(x.shape[0])))  # filled on the device: no host copy
            mean = reduce(xf.sum(0)) / count
            var = reduce(((xf - mean) ** 2).sum(0)) / count
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * count / (count - 1).clamp(min=1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        else:
            mean, var = self.running_mean.float(), self.running_var.float()
        y = (xf - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.float() + self.bias.float()
        return y.to(x.dtype)


# ----------------------------------------------------------------------------- the method's parts

class Projector(nn.Module):
    """Point-wise representations [N, T*d] -> series-wise representation [N, h] (reference MLP)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        hidden = max(in_dim // 2, 1)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.bn = GlobalBatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, out_dim)
        self.drop = nn.Dropout(dropout)  # the authors' dropout after the last layer (their head_dropout)

    def forward(self, z: torch.Tensor, reduce=None) -> torch.Tensor:
        return self.drop(self.fc2(torch.relu(self.bn(self.fc1(z), reduce))))


class Decoder(nn.Module):
    """Flatten head: aggregated point-wise representation [N, T*d] -> series [N, L]."""

    def __init__(self, in_dim: int, seq_len: int, dropout: float):
        super().__init__()
        self.linear = nn.Linear(in_dim, seq_len)
        self.drop = nn.Dropout(dropout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.drop(self.linear(z))


class AutomaticWeightedLoss(nn.Module):
    """L = sum_k 0.5 / sigma_k^2 * L_k + log(1 + sigma_k^2), sigma learnable (init 1)."""

    def __init__(self, n: int = 2):
        super().__init__()
        self.sigma = nn.Parameter(torch.ones(n))

    def forward(self, *losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted total, sigma detached); sigma is read here, inside this module's forward,
        because ZeRO-3 only materialises a module's parameters during its own forward."""
        sigma = self.sigma.float()
        s2 = sigma ** 2
        return sum(0.5 / s2[k] * l + torch.log1p(s2[k]) for k, l in enumerate(losses)), sigma.detach().clone()


# ----------------------------------------------------------------------------- the model

class SimMTM(nn.Module):
    def __init__(self, cfg: SimMTMConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        flat = cfg.num_tokens * cfg.d_model
        self.projector = Projector(flat, cfg.proj_dim, cfg.dropout)
        self.decoder = Decoder(flat, cfg.seq_len, cfg.dropout)
        self.awl = AutomaticWeightedLoss(2)
        self.dense_bytes = None  # None: models.blockwise.DENSE_BYTES decides dense vs blockwise

    def forward(self, x: torch.Tensor, gather: Optional[Gather] = None,
                generator: Optional[torch.Generator] = None, global_aggregation: bool = False,
                details: bool = False, keep: Optional[torch.Tensor] = None) -> dict:
        """x [B, C, L] (z-scored windows) -> losses; `details` adds tensors for monitoring.

        `keep` ([N0*(M+1), L] bool, rows [originals; views]) replaces mask generation: for tests
        that must feed identical views to different process layouts.
        """
        cfg = self.cfg
        gather = gather or Gather()
        b, c, length = x.shape
        n0, m = b * c, cfg.num_views
        x0 = x.reshape(n0, length).float()
        if keep is None:
            series, keep = make_views(x0, m, cfg.mask_ratio, cfg.mask_lm, cfg.mask, generator)
        else:
            series = x0.repeat(m + 1, 1) * keep
        xn, mean, std = instance_norm(series, keep)
        # Masking, normalisation and losses stay fp32; the encoder runs in the weights' dtype (bf16 under DeepSpeed).
        z = self.encoder(xn.to(self.encoder.embed.weight.dtype)).flatten(1)  # [N, T*d]
        s = self.projector(z, gather.reduce)  # [N, h]
        n = s.shape[0]
        dtype = _DTYPES[cfg.similarity_dtype]
        if dtype == torch.float32:  # similarity asked for in fp32: gather and compare fp32 representations
            s = s.float()

        offset = gather.rank * n
        keys = gather.fn(s) if gather.world_size > 1 else s
        self_idx = torch.arange(n, device=x.device) + offset
        pos = positive_index(n, n0, m, offset, x.device)
        # Only the originals are reconstructed, so only their N0 rows are aggregated. Dense N x N
        # logits while they are small; row blocks with recomputation (linear memory) beyond.
        if global_aggregation and gather.world_size > 1:
            values, agg_offset = gather.fn(z), 0
        else:
            values, agg_offset = z, offset
        loss_cl, z_agg, w = similarity_and_losses(s, keys, values, self_idx, pos, cfg.temperature, n0, agg_offset,
                                                  dtype, dense_bytes=self.dense_bytes)
        if details and w is None:  # monitoring on the blockwise path: the weights of a few rows only
            with torch.no_grad():
                k = min(32, n0)
                w = torch.softmax(mask_self(similarity_logits(s[:k], keys[agg_offset:agg_offset + values.shape[0]],
                                                              cfg.temperature), self_idx[:k] - agg_offset), -1)
        pred = self.decoder(z_agg).float() * std[:n0] + mean[:n0]
        loss_rec = F.mse_loss(pred, x0)
        losses = (loss_rec, loss_cl) if cfg.constraint_loss else (loss_rec,)  # ablation: no constraint
        loss, sigma = self.awl(*losses)
        if not cfg.auto_weight:
            loss = sum(losses)
        out = {"loss": loss, "loss_rec": loss_rec.detach(), "loss_cl": loss_cl.detach(),
               "sigma_rec": sigma[0], "sigma_cl": sigma[1], "num_series": n0}
        if details:
            out.update(pred=pred.detach().view(b, c, length), weights=w.detach(), keep=keep)
        return out

