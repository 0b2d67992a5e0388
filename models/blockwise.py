"""Similarity aggregation and constraint loss without an N x N matrix (issue 7).

Why: at the Electricity/Traffic references a batch holds 30,816 / 82,752 series, and one dense
fp32 N x N matrix is 3.8 / 27 GB. Both quantities only need row-wise softmax statistics of
R / tau (R = cosine similarity), so they are computed over blocks of query rows, flash-attention
style: the forward keeps each row's log-sum-exp, the backward recomputes a block's logits.
Extra memory beyond inputs, outputs and their gradients is O(block x Nk) (plus O(N x h) for the
normalised representations, and a copy of the values in the matmul dtype when that differs).

The results equal the dense path of models/similarity.py (`similarity_logits`, `mask_self`,
`aggregate`, `constraint_loss`): same dtype rules (logits/softmax in fp32 at least, fp64 stays
fp64; matmuls in `dtype` when it is bf16/fp16), same self-masking by index.

Dispatch rule (`similarity_and_losses`): the dense path when Nq * Nk * 4 bytes (one fp32 logits
matrix) is at most `dense_bytes` (default 256 MiB, so the dense path peaks near 1 GB with its
few Nq x Nk temporaries) or when the caller needs the weights; otherwise the blockwise path.
The rule is about memory: below it the dense path is affordable, does no recomputation and returns
the weights for monitoring; on a shared 2-core CPU both paths timed within noise at N <= 16,384.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .similarity import aggregate, constraint_loss, mask_self, similarity_logits

DENSE_BYTES = 256 * 2**20  # largest fp32 Nq x Nk logits matrix for which the dense path is used
BLOCK_BYTES = 32 * 2**20  # auto block size: one block x Nk work-dtype matrix stays below this


def auto_block(nq: int, nk: int, itemsize: int = 4) -> int:
    """Rows per block so one block x Nk matrix is <= BLOCK_BYTES (a few such live at once)."""
    return max(1, min(nq, BLOCK_BYTES // max(1, nk * itemsize)))


def _mm_dtype(work: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    return work if dtype == torch.float32 else dtype


def _mm(a, b, out):
    """out = a @ b without a fresh result tensor where dtypes allow (fresh pages cost page faults)."""
    if a.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    return out.copy_(a @ b)


def _addmm(acc, a, b):
    """acc += a @ b, accumulated in acc's dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc += a @ b


def _logits(s, qmm_blk, kmm, self_blk, temperature):
    """s (a work buffer) <- masked R / tau for one block; the matmul in kmm's dtype, logits fp32+."""
    _mm(qmm_blk, kmm.T, s).div_(temperature)
    s[torch.arange(s.shape[0], device=s.device), self_blk] = float("-inf")
    return s


def _softmax_lse(s):
    """In place s <- softmax(s) (as torch.softmax: exp(s - max) / sum); returns the row log-sum-exp."""
    m = s.amax(dim=1, keepdim=True)
    total = s.sub_(m).exp_().sum(dim=1, keepdim=True)
    s.div_(total)
    return (m + total.log()).squeeze(1)


def _recompute(s, qmm_blk, kmm, self_blk, temperature, lse_blk):
    """s <- the block's softmax, from its saved log-sum-exp."""
    return _logits(s, qmm_blk, kmm, self_blk, temperature).sub_(lse_blk[:, None]).exp_()


def _sim_backward(ds, qmm_blk, kmm, dq_blk, dk):
    """ds = grad of the block's qn . kn products -> dq rows (written) and dk (accumulated)."""
    ds = ds.to(kmm.dtype)
    if dq_blk is not None:
        _mm(ds, kmm, dq_blk)
    if dk is not None:
        _addmm(dk, ds.T, qmm_blk)


def _buffer(block, ref, nk):
    return ref.new_empty(min(block, ref.shape[0]), nk)


class _Aggregate(torch.autograd.Function):
    """z'_i = softmax_{j != self(i)}(qn_i . kn_j / tau) @ values; saves inputs, output and per-row lse."""

    @staticmethod
    def forward(ctx, qn, kn, values, self_index, temperature, block, dtype):
        work = qn.dtype
        smm = _mm_dtype(work, dtype)
        amm = torch.promote_types(values.dtype, torch.float32) if dtype == torch.float32 else dtype
        qmm, kmm, vmm = qn.to(smm), kn.to(smm), values.to(amm)
        nq = qn.shape[0]
        out = values.new_empty(nq, values.shape[1])
        lse = qn.new_empty(nq)
        buf = _buffer(block, qn, kn.shape[0])
        for r in range(0, nq, block):
            e = min(r + block, nq)
            s = _logits(buf[:e - r], qmm[r:e], kmm, self_index[r:e], temperature)
            lse[r:e] = _softmax_lse(s)
            _mm(s.to(amm), vmm, out[r:e])
        ctx.save_for_backward(qn, kn, values, self_index, lse, out)
        ctx.conf = (temperature, block, smm, amm)
        return out

    @staticmethod
    def backward(ctx, dout):
        qn, kn, values, self_index, lse, out = ctx.saved_tensors
        temperature, block, smm, amm = ctx.conf
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        work = qn.dtype
        qmm, kmm, vmm, gmm = qn.to(smm), kn.to(smm), values.to(amm), dout.to(amm)
        dq = torch.empty_like(qn) if need_q else None
        dk = torch.zeros_like(kn) if need_k else None
        dv = torch.zeros(values.shape, dtype=torch.promote_types(values.dtype, torch.float32),
                         device=values.device) if need_v else None
        nq, nk = qn.shape[0], kn.shape[0]
        pbuf = _buffer(block, qn, nk)
        dbuf = _buffer(block, qn, nk) if need_q or need_k else None
        for r in range(0, nq, block):
            e = min(r + block, nq)
            p = _recompute(pbuf[:e - r], qmm[r:e], kmm, self_index[r:e], temperature, lse[r:e])
            if need_v:
                _addmm(dv, p.T.to(amm), gmm[r:e])
            if need_q or need_k:
                # softmax backward: ds = p * (dp - sum_j p dp), with sum_j p_ij dp_ij = dout_i . out_i
                dp = _mm(gmm[r:e], vmm.T, dbuf[:e - r])
                d = (dout[r:e].to(work) * out[r:e].to(work)).sum(1, keepdim=True)
                ds = dp.sub_(d).mul_(p).div_(temperature)
                _sim_backward(ds, qmm[r:e], kmm, dq[r:e] if need_q else None, dk)
        return dq, dk, (dv.to(values.dtype) if need_v else None), None, None, None, None


class _MaskedLSE(torch.autograd.Function):
    """lse_i = log sum_{k != self(i)} exp(qn_i . kn_k / tau), blockwise; backward recomputes blocks."""

    @staticmethod
    def forward(ctx, qn, kn, self_index, temperature, block, dtype):
        smm = _mm_dtype(qn.dtype, dtype)
        qmm, kmm = qn.to(smm), kn.to(smm)
        nq = qn.shape[0]
        lse = qn.new_empty(nq)
        buf = _buffer(block, qn, kn.shape[0])
        for r in range(0, nq, block):
            e = min(r + block, nq)
            lse[r:e] = _softmax_lse(_logits(buf[:e - r], qmm[r:e], kmm, self_index[r:e], temperature))
        ctx.save_for_backward(qn, kn, self_index, lse)
        ctx.conf = (temperature, block, smm)
        return lse

    @staticmethod
    def backward(ctx, dlse):
        qn, kn, self_index, lse = ctx.saved_tensors
        temperature, block, smm = ctx.conf
        need_q, need_k = ctx.needs_input_grad[:2]
        qmm, kmm = qn.to(smm), kn.to(smm)
        dq = torch.empty_like(qn) if need_q else None
        dk = torch.zeros_like(kn) if need_k else None
        nq = qn.shape[0]
        buf = _buffer(block, qn, kn.shape[0])
        g = dlse.to(qn.dtype)[:, None] / temperature
        for r in range(0, nq, block):
            e = min(r + block, nq)
            ds = _recompute(buf[:e - r], qmm[r:e], kmm, self_index[r:e], temperature, lse[r:e]).mul_(g[r:e])
            _sim_backward(ds, qmm[r:e], kmm, dq[r:e] if need_q else None, dk)
        return dq, dk, None, None, None, None


def _normalise(q, k):
    work = torch.promote_types(q.dtype, torch.float32)  # fp32 at least, fp64 stays fp64 (as the dense path)
    return F.normalize(q.to(work), dim=-1), F.normalize(k.to(work), dim=-1)


def blockwise_aggregate(q: torch.Tensor, k: torch.Tensor, values: torch.Tensor, self_index: torch.Tensor,
                        temperature: float, block: Optional[int] = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[Nq, dv]: z'_i = sum_{j != self_index[i]} softmax_j(cos(q_i, k_j) / tau) values_j.

    q [Nq, h], k [Nk, h], values [Nk, dv]; self_index [Nq] are indices into k. Equals
    `aggregate(mask_self(similarity_logits(q, k, tau, dtype), self_index), values, dtype)[0]`.
    """
    qn, kn = _normalise(q, k)
    block = block or auto_block(q.shape[0], k.shape[0], qn.element_size())
    return _Aggregate.apply(qn, kn, values, self_index.long(), float(temperature), int(block), dtype)


def blockwise_constraint_loss(q: torch.Tensor, k: torch.Tensor, self_index: torch.Tensor, pos_index: torch.Tensor,
                              temperature: float, block: Optional[int] = None,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """L_c = -mean_i sum_{p in pos(i)} log softmax_{k != self(i)}(R_ik / tau)[p]; pos_index [Nq, M] into k.

    The positive logits are row-wise dot products (O(Nq x M x h)); only the log-sum-exp needs blocks.
    Equals `constraint_loss(mask_self(similarity_logits(q, k, tau, dtype), self_index), pos_index)`.
    """
    qn, kn = _normalise(q, k)
    block = block or auto_block(q.shape[0], k.shape[0], qn.element_size())
    lse = _MaskedLSE.apply(qn, kn, self_index.long(), float(temperature), int(block), dtype)
    mm = _mm_dtype(qn.dtype, dtype)  # round to the matmul dtype like the dense matmul, accumulate in fp32+
    qr, kr = qn.to(mm).to(qn.dtype), kn.to(mm).to(qn.dtype)
    pos = torch.einsum("ih,imh->im", qr, kr[pos_index]) / temperature
    return -(pos.sum(1) - pos_index.shape[1] * lse).mean()


def use_dense(nq: int, nk: int, dense_bytes: Optional[int] = None) -> bool:
    """The dispatch rule: dense while one fp32 Nq x Nk logits matrix fits in `dense_bytes`."""
    return nq * nk * 4 <= (DENSE_BYTES if dense_bytes is None else dense_bytes)


def similarity_and_losses(s: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, self_index: torch.Tensor,
                          pos_index: torch.Tensor, temperature: float, n_agg: int, agg_offset: int = 0,
                          dtype: torch.dtype = torch.float32, block: Optional[int] = None,
                          dense_bytes: Optional[int] = None, need_weights: bool = False):
    """(loss_cl, z_agg, weights or None): what SimMTM.forward computes from similarity, in one call.

    Constraint loss: rows of `s` [N, h] against `keys` [Nk, h] (all-gathered or `s` itself), self at
    `self_index` [N] and positives at `pos_index` [N, M] (global key indices). Aggregation: the first
    `n_agg` rows of `s` against keys[agg_offset : agg_offset + len(values)] with `values` [., dv];
    local aggregation is agg_offset = rank offset and values = local z, global is 0 and gathered z.
    The weights ([n_agg, len(values)]) exist only on the dense path; `need_weights` forces it.
    """
    nv = values.shape[0]
    if need_weights or use_dense(s.shape[0], keys.shape[0], dense_bytes):
        logits = mask_self(similarity_logits(s, keys, temperature, dtype), self_index)
        loss_cl = constraint_loss(logits, pos_index)
        z_agg, w = aggregate(logits[:n_agg, agg_offset:agg_offset + nv], values, dtype)
        return loss_cl, z_agg, w
    loss_cl = blockwise_constraint_loss(s, keys, self_index, pos_index, temperature, block, dtype)
    z_agg = blockwise_aggregate(s[:n_agg], keys[agg_offset:agg_offset + nv], values,
                                self_index[:n_agg] - agg_offset, temperature, block, dtype)
    return loss_cl, z_agg, None
