"""The paper's similarity parts, dense: series-wise similarity (cosine / tau, self masked), point-wise
aggregation and the constraint loss. Their own module because the model (models/simmtm.py) and the
blockwise path that must equal them (models/blockwise.py) both build on them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def similarity_logits(q: torch.Tensor, k: torch.Tensor, temperature: float,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Cosine similarity / tau as fp32 logits; the matmul itself may run in bf16/fp16."""
    work = torch.promote_types(q.dtype, torch.float32)  # fp32 at least (fp64 stays fp64 for tests)
    qn, kn = F.normalize(q.to(work), dim=-1), F.normalize(k.to(work), dim=-1)
    mm_dtype = work if dtype == torch.float32 else dtype
    return (qn.to(mm_dtype) @ kn.to(mm_dtype).T).to(work) / temperature


def mask_self(logits: torch.Tensor, self_index: torch.Tensor) -> torch.Tensor:
    """Put -inf at (i, self_index[i]): the diagonal by index, never a dense N x N mask."""
    return logits.index_put((torch.arange(logits.shape[0], device=logits.device), self_index),
                            logits.new_full((), float("-inf")))  # filled on the device: no host copy


def aggregate(logits: torch.Tensor, values: torch.Tensor, dtype: torch.dtype = torch.float32):
    """w = softmax over j != i (fp32; self already at -inf), z' = w @ values (matmul in `dtype`)."""
    w = torch.softmax(logits, dim=-1)
    mm = torch.promote_types(values.dtype, torch.float32) if dtype == torch.float32 else dtype
    return (w.to(mm) @ values.to(mm)).to(values.dtype), w


def positive_index(n_rows: int, n0: int, num_views: int, offset: int, device) -> torch.Tensor:
    """[n_rows, M]: global indices of each row's positives (the other members of its group)."""
    i = torch.arange(n_rows, device=device)
    view, series = i // n0, i % n0
    others = (view[:, None] + torch.arange(1, num_views + 1, device=device)[None, :]) % (num_views + 1)
    return others * n0 + series[:, None] + offset


def constraint_loss(masked_logits: torch.Tensor, pos_index: torch.Tensor) -> torch.Tensor:
    """-mean_i sum_{p in pos(i)} log softmax_{k != i}(R_ik / tau)[p] (fp32)."""
    logp = torch.log_softmax(masked_logits.to(torch.promote_types(masked_logits.dtype, torch.float32)), dim=-1)
    return -logp.gather(1, pos_index).sum(1).mean()
