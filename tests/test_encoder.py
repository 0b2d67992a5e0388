"""Encoders: SDPA equals explicit attention; patch tokens; task heads on the encoder API."""
import pytest
import torch

from models import Encoder, SimMTMConfig
from models.heads import Classifier, Forecaster


def cfg(**kw):
    base = dict(seq_len=48, d_model=16, n_heads=4, e_layers=2, d_ff=32, dropout=0.1)
    base.update(kw)
    return SimMTMConfig(**base)


@pytest.mark.parametrize("kind", ["pointwise", "patch"])
def test_sdpa_equals_explicit_attention_in_eval(kind):
    torch.manual_seed(0)
    enc = Encoder(cfg(encoder=kind, patch_len=8, patch_stride=4)).eval()
    x = torch.randn(6, 48)
    with torch.no_grad():
        a = enc(x)
        b = enc(x, explicit_attention=True)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_sdpa_gradients_equal_explicit_attention(dtype, tol):
    # A fixed random projection of the output as the loss: sum(out**2) would be nearly constant
    # after the final LayerNorm, leaving gradients that are pure rounding noise.
    torch.manual_seed(1)
    enc = Encoder(cfg(dropout=0.0)).to(dtype)
    x = torch.randn(4, 48, dtype=dtype)
    r = torch.randn(4, 48, 16, dtype=dtype)
    ga = torch.autograd.grad((enc(x) * r).sum(), list(enc.parameters()))
    gb = torch.autograd.grad((enc(x, explicit_attention=True) * r).sum(), list(enc.parameters()))
    for a, b in zip(ga, gb):
        # error relative to each gradient tensor's scale
        assert (a - b).abs().max() <= tol * b.abs().max(), (a - b).abs().max()


def test_shapes_and_patch_count():
    enc = Encoder(cfg())
    assert enc(torch.randn(3, 48)).shape == (3, 48, 16)
    c = cfg(encoder="patch", patch_len=16, patch_stride=8)
    assert c.num_tokens == 5
    assert Encoder(c)(torch.randn(3, 48)).shape == (3, 5, 16)
    c = cfg(encoder="patch", patch_len=16, patch_stride=10)  # 48 = 16 + 3*10 + 2: padded to 4 patches
    assert c.num_tokens == 5
    assert Encoder(c)(torch.randn(2, 48)).shape == (2, 5, 16)
    with pytest.raises(ValueError, match="length 48"):
        enc(torch.randn(3, 47))


def test_attention_dropout_defaults_off():
    assert SimMTMConfig().attn_dropout == 0.0
    enc = Encoder(cfg(dropout=0.0)).train()
    x = torch.randn(2, 48)
    assert torch.equal(enc(x), enc(x))  # deterministic in train mode without dropout


def test_task_heads_on_encoder():
    torch.manual_seed(2)
    enc = Encoder(cfg())
    f = Forecaster(enc, horizon=12)
    assert f(torch.randn(4, 7, 48)).shape == (4, 7, 12)
    c = Classifier(Encoder(cfg()), num_classes=5)
    assert c(torch.randn(4, 3, 48)).shape == (4, 5)
    # channel independence: the forecast of channel 0 does not depend on channel 1
    x = torch.randn(1, 2, 48)
    y = x.clone()
    y[0, 1] += 5.0
    f.eval()
    assert torch.allclose(f(x)[0, 0], f(y)[0, 0], atol=1e-6)


def test_task_heads_run_a_bf16_encoder():
    """Under DeepSpeed bf16 the encoder's weights are bf16; the heads feed it bf16 and return fp32."""
    torch.manual_seed(3)
    x = torch.randn(2, 3, 48)
    f = Forecaster(Encoder(cfg(dropout=0.0)), horizon=12).eval()
    ref = f(x)
    f16 = f.to(torch.bfloat16)
    out = f16(x)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 12)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()  # bf16 rounding, not garbage
    c = Classifier(Encoder(cfg()), num_classes=4).to(torch.bfloat16)
    assert c(x).dtype == torch.float32
