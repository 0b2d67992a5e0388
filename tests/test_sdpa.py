"""Head padding for CUDA's fused SDPA kernels (models/encoder.py `sdpa`): padded attention equals the
unpadded one, forward and gradients, alone and inside the encoder; the backend report on CPU.

Padding is only applied on CUDA; here it is forced (`width=`, or `kernel_head_dim` patched) so the
equality is checked on CPU. The encoder calls SDPA without masks or causality, so neither is tested.
"""
import pytest
import torch

import models.encoder as encoder_mod
from models import Encoder, SimMTMConfig
from models.encoder import kernel_head_dim, sdpa, sdpa_backends

TOL = {torch.float64: 1e-12, torch.float32: 1e-6}


def qkv(dtype, n=3, heads=4, t=40, head_dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, heads, t, head_dim, generator=g, dtype=dtype, requires_grad=True) for _ in range(3)]


def close(a, b, tol):
    """Error relative to b's scale."""
    return (a - b).abs().max().item() <= tol * max(b.abs().max().item(), 1e-30)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("head_dim, width", [(2, 8), (3, 8), (2, 16), (12, 16)])
def test_padded_equals_unpadded_forward_and_gradients(dtype, head_dim, width):
    q, k, v = qkv(dtype, head_dim=head_dim)
    r = torch.randn(3, 4, 40, head_dim, generator=torch.Generator().manual_seed(9), dtype=dtype)
    ref = sdpa(q, k, v, width=head_dim)
    out = sdpa(q, k, v, width=width)
    assert out.shape == ref.shape
    assert close(out, ref, TOL[dtype])
    g_ref = torch.autograd.grad((ref * r).sum(), (q, k, v))
    g_pad = torch.autograd.grad((out * r).sum(), (q, k, v))
    for a, b in zip(g_pad, g_ref):
        assert close(a, b, TOL[dtype])


def test_padded_equals_unpadded_with_attention_dropout():
    # The dropout mask is drawn over the [N, H, T, T] probabilities, whose shape padding leaves alone.
    q, k, v = qkv(torch.float64)
    torch.manual_seed(5)
    ref = sdpa(q, k, v, 0.25, width=2)
    torch.manual_seed(5)
    out = sdpa(q, k, v, 0.25, width=8)
    assert close(out, ref, 1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_encoder_with_padded_heads_equals_unpadded(dtype, monkeypatch):
    """The reference's layout (16 heads of width 2), padded as on CUDA, in the whole encoder."""
    torch.manual_seed(1)
    cfg = SimMTMConfig(seq_len=48, d_model=32, n_heads=16, e_layers=2, d_ff=64, dropout=0.0)
    enc = Encoder(cfg).to(dtype)
    x = torch.randn(4, 48, dtype=dtype)
    r = torch.randn(4, 48, 32, dtype=dtype)
    params = list(enc.parameters())
    ref = enc(x)
    g_ref = torch.autograd.grad((ref * r).sum(), params)
    monkeypatch.setattr(encoder_mod, "kernel_head_dim", lambda hd, device: 8)
    out = enc(x)
    g_pad = torch.autograd.grad((out * r).sum(), params)
    assert close(out, ref, TOL[dtype])
    for a, b in zip(g_pad, g_ref):
        assert close(a, b, TOL[dtype])


def test_padding_only_on_cuda_and_only_when_needed():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)  # a device object needs no GPU
    assert [kernel_head_dim(h, cpu) for h in (2, 3, 8, 12)] == [2, 3, 8, 12]
    assert [kernel_head_dim(h, cuda) for h in (2, 3, 8, 12, 16, 64)] == [8, 8, 8, 16, 16, 64]


def test_backend_report_on_cpu():
    q, k, v = (torch.randn(2, 16, 336, 2) for _ in range(3))
    rep = sdpa_backends(q, k, v)
    assert rep["device"] == "cpu" and rep["dtype"] == "float32"
    assert rep["head_dim"] == rep["kernel_head_dim"] == 2  # no padding on CPU
    assert rep["selected"] == rep["unpadded"] == "FLASH_ATTENTION"  # CPU's fused kernel takes width 2
    assert set(rep["usable"]) == {"FLASH_ATTENTION", "MATH"} and rep["failed"] == {}
    assert sdpa_backends(q, k, v, dropout_p=0.1)["selected"] == "MATH"  # why attention dropout is off
