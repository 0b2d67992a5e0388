"""Blockwise aggregation and constraint loss equal the dense path of models/simmtm.py, without N x N."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.blockwise import (auto_block, blockwise_aggregate, blockwise_constraint_loss, similarity_and_losses,
                              use_dense)
from models.similarity import aggregate, constraint_loss, mask_self, positive_index, similarity_logits

ROOT = Path(__file__).resolve().parent.parent

# (n0, M, world, rank): local rows n = n0 * (M + 1), keys = world * n (all-gathered), offset = rank * n
LAYOUTS = [(3, 3, 1, 0), (3, 3, 3, 1), (5, 1, 3, 2), (2, 3, 2, 1)]


def dense_agg(q, k, values, self_index, tau, dtype=torch.float32):
    return aggregate(mask_self(similarity_logits(q, k, tau, dtype), self_index), values, dtype)[0]


def dense_cl(q, k, self_index, pos, tau, dtype=torch.float32):
    return constraint_loss(mask_self(similarity_logits(q, k, tau, dtype), self_index), pos)


def make(n0, m, world, rank, dt, h=8, dv=5, seed=0):
    """Separate leaves for queries and keys (so their gradients are checked apart), values, upstream grad."""
    g = torch.Generator().manual_seed(seed)
    n = n0 * (m + 1)
    k = torch.randn(world * n, h, generator=g, dtype=dt)
    q = (k[rank * n:(rank + 1) * n] + 0.3 * torch.randn(n, h, generator=g, dtype=dt)).requires_grad_()
    v = torch.randn(world * n, dv, generator=g, dtype=dt).requires_grad_()
    up = torch.randn(n, dv, generator=g, dtype=dt)
    self_index = torch.arange(n) + rank * n
    return q, k.requires_grad_(), v, up, self_index, positive_index(n, n0, m, rank * n, "cpu")


def grads(out, *xs):
    return torch.autograd.grad(out, xs)


def close(a, b, rtol, atol):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block", [1, 3, 5, None])
@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_float64_equals_dense(layout, block, tau):
    q, k, v, up, si, pos = make(*layout, torch.float64)
    ref_a = dense_agg(q, k, v, si, tau)
    ours_a = blockwise_aggregate(q, k, v, si, tau, block)
    close(ours_a, ref_a, 1e-10, 1e-12)
    for x, y in zip(grads((ours_a * up).sum(), q, k, v), grads((ref_a * up).sum(), q, k, v)):
        close(x, y, 1e-10, 1e-12)
    ref_c = dense_cl(q, k, si, pos, tau)
    ours_c = blockwise_constraint_loss(q, k, si, pos, tau, block)
    close(ours_c, ref_c, 1e-10, 1e-12)
    for x, y in zip(grads(ours_c, q, k), grads(ref_c, q, k)):
        close(x, y, 1e-10, 1e-12)


def test_queries_as_rows_of_the_gathered_keys():
    """The model's case: queries are keys[offset : offset + Nq] of one leaf; gradients meet there."""
    n0, m, world, rank = 3, 3, 3, 2
    n = n0 * (m + 1)
    g = torch.Generator().manual_seed(1)
    k = torch.randn(world * n, 6, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(world * n, 4, generator=g, dtype=torch.float64, requires_grad=True)
    q, si, pos = k[rank * n:(rank + 1) * n], torch.arange(n) + rank * n, positive_index(n, n0, m, rank * n, "cpu")
    ref = dense_cl(q, k, si, pos, 0.2) + dense_agg(q[:n0], k, v, si[:n0], 0.2).square().sum()
    ours = (blockwise_constraint_loss(q, k, si, pos, 0.2, 4)
            + blockwise_aggregate(q[:n0], k, v, si[:n0], 0.2, 2).square().sum())
    close(ours, ref, 1e-10, 1e-12)
    for x, y in zip(grads(ours, k, v), grads(ref, k, v)):
        close(x, y, 1e-10, 1e-12)


def test_gradcheck():
    q, k, v, _, si, pos = make(2, 3, 2, 1, torch.float64, h=4, dv=3)
    assert torch.autograd.gradcheck(lambda a, b, c: blockwise_aggregate(a, b, c, si, 0.5, 3), (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b: blockwise_constraint_loss(a, b, si, pos, 0.5, 3), (q, k))


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("block", [7, 64])
def test_float32_equals_dense(m, block):
    """fp32 at a batch-like size: relative agreement ~1e-5 (summation order differs)."""
    q, k, v, up, si, pos = make(12, m, 3, 1, torch.float32, h=32, dv=24, seed=m)
    for tau in (0.2, 1.0):
        ref_a, ours_a = dense_agg(q, k, v, si, tau), blockwise_aggregate(q, k, v, si, tau, block)
        close(ours_a, ref_a, 1e-5, 1e-6)
        for x, y in zip(grads((ours_a * up).sum(), q, k, v), grads((ref_a * up).sum(), q, k, v)):
            close(x, y, 1e-5, 1e-5 * y.abs().max().item())
        ref_c, ours_c = dense_cl(q, k, si, pos, tau), blockwise_constraint_loss(q, k, si, pos, tau, block)
        close(ours_c, ref_c, 1e-5, 1e-6)
        for x, y in zip(grads(ours_c, q, k), grads(ref_c, q, k)):
            close(x, y, 1e-5, 1e-5 * y.abs().max().item())


def test_bf16_matmuls():
    """bf16 matmuls (fp32 softmax): within 2% of max |value| of the dense bf16 path and of fp32."""
    q, k, v, up, si, pos = make(4, 3, 2, 1, torch.float32, h=16, dv=8)
    bf = torch.bfloat16

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    fp32 = [dense_agg(q, k, v, si, 0.2), dense_cl(q, k, si, pos, 0.2)]
    dense = [dense_agg(q, k, v, si, 0.2, bf), dense_cl(q, k, si, pos, 0.2, bf)]
    ours = [blockwise_aggregate(q, k, v, si, 0.2, 5, bf), blockwise_constraint_loss(q, k, si, pos, 0.2, 5, bf)]
    for o, d, f in zip(ours, dense, fp32):
        assert rel(o, d) < 2e-2 and rel(o, f) < 2e-2
    g_ours = grads((ours[0] * up).sum() + ours[1], q, k, v)
    g_dense = grads((dense[0] * up).sum() + dense[1], q, k, v)
    g_fp32 = grads((fp32[0] * up).sum() + fp32[1], q, k, v)
    for o, d, f in zip(g_ours, g_dense, g_fp32):
        assert rel(o, d) < 2e-2 and rel(o, f) < 2e-2


def test_no_nq_by_nk_tensor_is_saved_for_backward():
    """By construction: autograd keeps only O(N x h) tensors (inputs, normalised inputs, lse, output)."""
    n, h, dv = 96, 8, 4
    s = torch.randn(n, h, requires_grad=True)
    z = torch.randn(n, dv, requires_grad=True)
    si, pos = torch.arange(n), positive_index(n, n // 4, 3, 0, "cpu")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = blockwise_constraint_loss(s, s, si, pos, 0.2, 8) + blockwise_aggregate(s, s, z, si, 0.2, 8).sum()
    loss.backward()
    assert max(saved) <= n * 3 * h < n * n  # the largest is the gathered positives [N, M, h]


@pytest.mark.parametrize("global_aggregation", [False, True])
def test_dispatcher_paths_agree_and_match_the_model(global_aggregation):
    """Both paths of `similarity_and_losses` equal the computation in SimMTM.forward (rank 1 of 3)."""
    n0, m, world, rank = 3, 3, 3, 1
    n, offset = n0 * (m + 1), rank * n0 * (m + 1)
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(world * n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    zg = torch.randn(world * n, 5, generator=g, dtype=torch.float64, requires_grad=True)
    s, z = keys[offset:offset + n], zg[offset:offset + n]
    si, pos = torch.arange(n) + offset, positive_index(n, n0, m, offset, "cpu")
    # SimMTM.forward, verbatim
    logits = mask_self(similarity_logits(s, keys, 0.2), si)
    ref_cl = constraint_loss(logits, pos)
    agg_logits, values = (logits[:n0], zg) if global_aggregation else (logits[:n0, offset:offset + n], z)
    ref_agg, ref_w = aggregate(agg_logits, values)
    agg_offset = 0 if global_aggregation else offset
    ref_g = grads(ref_cl + ref_agg.square().sum(), keys, zg)
    for dense_bytes, want_dense in ((None, True), (0, False)):
        cl, agg, w = similarity_and_losses(s, keys, values, si, pos, 0.2, n_agg=n0, agg_offset=agg_offset,
                                           block=5, dense_bytes=dense_bytes)
        assert (w is not None) == want_dense
        close(cl, ref_cl, 1e-10, 1e-12)
        close(agg, ref_agg, 1e-10, 1e-12)
        for x, y in zip(grads(cl + agg.square().sum(), keys, zg), ref_g):
            close(x, y, 1e-10, 1e-12)
    _, _, w = similarity_and_losses(s, keys, values, si, pos, 0.2, n_agg=n0, agg_offset=agg_offset,
                                    dense_bytes=0, need_weights=True)
    close(w, ref_w, 1e-12, 1e-14)


def test_dispatch_rule_and_auto_block():
    assert use_dense(8192, 8192)  # 256 MiB of fp32 logits: still dense
    assert not use_dense(8192, 8193)
    assert not use_dense(100, 100, dense_bytes=100 * 100 * 4 - 1)
    assert auto_block(30_816, 30_816) == 272 and auto_block(10, 30_816) == 10 and auto_block(5, 10**9) == 1


MEMORY_SCRIPT = """
import json, sys, time, torch
torch.set_num_threads(1)
from models.blockwise import blockwise_aggregate, blockwise_constraint_loss
from models.similarity import positive_index
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith(('VmHWM', 'VmRSS')):
            yield int(line.split()[1]) * 1024
def make(n, dv):
    s, z = torch.randn(n, 128, requires_grad=True), torch.randn(n, dv, requires_grad=True)
    return s, z, torch.arange(n), positive_index(n, n // 4, 3, 0, 'cpu'), torch.randn(n, dv)
def run(s, z, si, pos, up, block):
    loss = blockwise_constraint_loss(s, s, si, pos, 0.2, block)
    (loss + (blockwise_aggregate(s, s, z, si, 0.2, block) * up).sum()).backward()
run(*make(64, 8), 16)  # warm up kernels and thread pools
x = make(int(sys.argv[1]), 64)
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak-RSS mark to the current RSS
base = min(hwm())
t = time.perf_counter()
run(*x, 256)
print(json.dumps({"delta": max(hwm()) - base, "s": time.perf_counter() - t}))
"""


def test_peak_memory_is_linear_not_quadratic():
    """N = 8192, values width 64, block 256, forward + backward, Nq = Nk = N for both parts.

    One fp32 N x N matrix is 268 MB (the dense path holds several). Ours holds 2 block x N buffers
    (8 MB each) plus O(N x h) tensors: the input gradients, normalised copies, [N, M, h] positives.
    A fixed mmap threshold makes glibc return every large buffer on free, so the peak RSS tracks live
    memory (with its default sliding threshold, reuse of freed heap chunks moved the 8192 peak between
    66 and 108 MB from run to run).
    """
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset the peak RSS")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    delta = {}
    for n in (4096, 8192):
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(n)], capture_output=True, text=True,
                             cwd=ROOT, timeout=120, env=env)
        assert out.returncode == 0, out.stderr
        delta[n] = json.loads(out.stdout.strip().splitlines()[-1])["delta"]
    assert delta[8192] < 0.4 * 8192 * 8192 * 4, f"peak RSS grew by {delta[8192] / 1e6:.0f} MB"
    assert delta[8192] < 2.5 * delta[4096], f"doubling N took the peak from {delta[4096]} to {delta[8192]} bytes"
