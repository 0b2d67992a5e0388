"""SimMTM losses against a plain dense reference written from the spec's formulas."""
import math

import pytest
import torch

from models import SimMTM, SimMTMConfig
from models.encoder import instance_norm
from models.masking import make_views
from models.similarity import aggregate, constraint_loss, mask_self, positive_index, similarity_logits

torch.set_default_dtype(torch.float32)


def dense_reference(s: torch.Tensor, z: torch.Tensor, n0: int, m: int, tau: float):
    """Explicit N x N matrices and loops, straight from the spec (section 'The forward pass')."""
    n = s.shape[0]
    R = torch.zeros(n, n, dtype=s.dtype)
    for i in range(n):
        for j in range(n):
            R[i, j] = torch.dot(s[i], s[j]) / (s[i].norm() * s[j].norm())
    # aggregation: w_ij = softmax over j != i of R_ij / tau; z'_i = sum_{j != i} w_ij z_j
    agg = []
    weights = torch.zeros(n, n, dtype=s.dtype)
    for i in range(n0):
        others = [j for j in range(n) if j != i]
        e = torch.stack([torch.exp(R[i, j] / tau) for j in others])
        w = e / e.sum()
        for a, j in enumerate(others):
            weights[i, j] = w[a]
        agg.append(sum(w[a] * z[j] for a, j in enumerate(others)))
    agg = torch.stack(agg)
    # constraint: positives are the other members of the group {original, M views}
    total = 0.0
    for i in range(n):
        group = [v * n0 + (i % n0) for v in range(m + 1)]
        pos = [p for p in group if p != i]
        denom = sum(torch.exp(R[i, k] / tau) for k in range(n) if k != i)
        total = total + sum(-torch.log(torch.exp(R[i, p] / tau) / denom) for p in pos)
    return agg, total / n, weights


def ours(s, z, n0, m, tau, dtype=torch.float32):
    n = s.shape[0]
    logits = mask_self(similarity_logits(s, s, tau, dtype), torch.arange(n))
    loss = constraint_loss(logits, positive_index(n, n0, m, 0, s.device))
    agg, w = aggregate(logits[:n0], z, dtype)
    return agg, loss, w


@pytest.mark.parametrize("n0,m", [(3, 3), (5, 1), (2, 4)])
def test_losses_and_gradients_equal_dense_reference(n0, m):
    torch.manual_seed(0)
    n = n0 * (m + 1)
    s = torch.randn(n, 8, dtype=torch.float64, requires_grad=True)
    z = torch.randn(n, 12, dtype=torch.float64, requires_grad=True)
    target = torch.randn(n0, 12, dtype=torch.float64)
    ref_agg, ref_cl, ref_w = dense_reference(s, z, n0, m, 0.2)
    agg, cl, w = ours(s, z, n0, m, 0.2, torch.float64)
    assert torch.allclose(agg, ref_agg, rtol=1e-10, atol=1e-12)
    assert torch.allclose(cl, ref_cl, rtol=1e-10)
    assert torch.allclose(w, ref_w[:n0], rtol=1e-10, atol=1e-14)
    lr = ((ref_agg - target) ** 2).mean() + ref_cl
    lo = ((agg - target) ** 2).mean() + cl
    gs_ref, gz_ref = torch.autograd.grad(lr, (s, z))
    gs, gz = torch.autograd.grad(lo, (s, z))
    assert torch.allclose(gs, gs_ref, rtol=1e-9, atol=1e-12)
    assert torch.allclose(gz, gz_ref, rtol=1e-9, atol=1e-12)


def test_fp32_matches_reference_tightly():
    torch.manual_seed(1)
    n0, m = 4, 3
    s = torch.randn(n0 * (m + 1), 16)
    z = torch.randn(n0 * (m + 1), 24)
    ref_agg, ref_cl, _ = dense_reference(s.double(), z.double(), n0, m, 0.2)
    agg, cl, _ = ours(s, z, n0, m, 0.2)
    assert torch.allclose(agg.double(), ref_agg, rtol=1e-5, atol=1e-6)
    assert abs(cl.item() - ref_cl.item()) < 1e-5 * abs(ref_cl.item())


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_reduced_precision_within_tolerance(dtype, tol):
    """bf16/fp16 matmuls with fp32 softmax/loss: stated tolerance 3% (bf16) / 0.5% (fp16), relative."""
    torch.manual_seed(2)
    n0, m = 6, 3
    s = torch.randn(n0 * (m + 1), 32)
    z = torch.randn(n0 * (m + 1), 64)
    agg32, cl32, _ = ours(s, z, n0, m, 0.2)
    agg, cl, w = ours(s, z, n0, m, 0.2, dtype)
    assert cl.dtype == torch.float32 and w.dtype == torch.float32 and agg.dtype == torch.float32
    assert abs(cl.item() - cl32.item()) / abs(cl32.item()) < tol
    assert (agg - agg32).norm() / agg32.norm() < tol


def test_aggregation_weights_exclude_self_and_sum_to_one():
    torch.manual_seed(3)
    n0, m = 5, 3
    s = torch.randn(n0 * (m + 1), 8)
    z = torch.randn(n0 * (m + 1), 4)
    _, _, w = ours(s, z, n0, m, 0.2)
    rows = torch.arange(n0)
    assert torch.all(w[rows, rows] == 0.0)
    assert torch.allclose(w.sum(1), torch.ones(n0), atol=1e-6)


def test_positive_index_arithmetic():
    pos = positive_index(8, 2, 3, 0, "cpu")  # groups {0,2,4,6} and {1,3,5,7}
    assert sorted(pos[0].tolist()) == [2, 4, 6]
    assert sorted(pos[5].tolist()) == [1, 3, 7]
    pos = positive_index(8, 2, 3, 16, "cpu")  # rank 2 of a world with 8 rows per rank
    assert sorted(pos[0].tolist()) == [18, 20, 22]


def small_cfg(**kw):
    base = dict(seq_len=24, d_model=8, n_heads=2, e_layers=1, d_ff=16, proj_dim=8, dropout=0.0, num_views=2)
    base.update(kw)
    return SimMTMConfig(**base)


def reference_model_loss(model: SimMTM, x: torch.Tensor, seed: int) -> torch.Tensor:
    """The whole forward with the model's own layers but dense, loop-based similarity and losses."""
    cfg = model.cfg
    b, c, length = x.shape
    n0 = b * c
    x0 = x.reshape(n0, length)
    series, keep = make_views(x0, cfg.num_views, cfg.mask_ratio, cfg.mask_lm, cfg.mask,
                              torch.Generator().manual_seed(seed))
    xn, mean, std = instance_norm(series, keep)
    z = model.encoder(xn).flatten(1)
    s = model.projector(z)
    agg, cl, _ = dense_reference(s, z, n0, cfg.num_views, cfg.temperature)
    pred = model.decoder(agg) * std[:n0] + mean[:n0]
    rec = ((pred - x0) ** 2).mean()
    sig = model.awl.sigma
    return 0.5 / sig[0] ** 2 * rec + torch.log(1 + sig[0] ** 2) + 0.5 / sig[1] ** 2 * cl + torch.log(1 + sig[1] ** 2)


def test_full_model_loss_and_parameter_gradients_match_reference():
    torch.manual_seed(4)
    model = SimMTM(small_cfg())
    x = torch.randn(2, 2, 24)
    out = model(x, generator=torch.Generator().manual_seed(9))
    ours_grads = torch.autograd.grad(out["loss"], list(model.parameters()))
    ref = reference_model_loss(model, x, 9)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert torch.allclose(out["loss"], ref, rtol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), ours_grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


def test_instance_norm_uses_unmasked_points_only():
    x = torch.tensor([[1.0, 100.0, 3.0, -50.0]])
    keep = torch.tensor([[True, False, True, False]])
    xn, mean, std = instance_norm(x * keep, keep)
    assert mean.item() == pytest.approx(2.0)
    assert std.item() == pytest.approx(math.sqrt(1.0 + 1e-5))
    assert xn[0, 1].item() == 0.0 and xn[0, 3].item() == 0.0


def test_ablation_and_fixed_weighting():
    torch.manual_seed(5)
    x = torch.randn(2, 1, 24)
    g = lambda: torch.Generator().manual_seed(1)
    plain = SimMTM(small_cfg(auto_weight=False))
    out = plain(x, generator=g())
    assert torch.allclose(out["loss"], out["loss_rec"] + out["loss_cl"])
    ablate = SimMTM(small_cfg(auto_weight=False, constraint_loss=False))
    out = ablate(x, generator=g())
    assert torch.allclose(out["loss"], out["loss_rec"])


def test_global_batchnorm_without_reduce_is_batchnorm():
    from models.simmtm import GlobalBatchNorm1d

    torch.manual_seed(6)
    ours, ref = GlobalBatchNorm1d(5), torch.nn.BatchNorm1d(5)
    with torch.no_grad():
        ours.weight.uniform_(), ours.bias.uniform_()
    ref.load_state_dict(ours.state_dict())
    for _ in range(3):
        x = torch.randn(7, 5) * 3 + 1
        assert torch.allclose(ours(x), ref(x), atol=1e-5)
    assert torch.allclose(ours.running_mean, ref.running_mean, atol=1e-6)
    assert torch.allclose(ours.running_var, ref.running_var, atol=1e-5)
    ours.eval(), ref.eval()
    x = torch.randn(4, 5)
    assert torch.allclose(ours(x), ref(x), atol=1e-5)


def test_model_blockwise_path_equals_dense_path():
    """SimMTM.forward with the memory-bounded path forced on (dense_bytes=0) equals the dense path."""
    torch.manual_seed(7)
    x = torch.randn(3, 2, 24)
    outs, grads = [], []
    for dense_bytes in (None, 0):
        torch.manual_seed(0)
        model = SimMTM(small_cfg())
        model.dense_bytes = dense_bytes
        out = model(x, generator=torch.Generator().manual_seed(3))
        grads.append(torch.autograd.grad(out["loss"], list(model.parameters())))
        outs.append(out)
    assert torch.allclose(outs[0]["loss"], outs[1]["loss"], rtol=1e-5)
    assert torch.allclose(outs[0]["loss_cl"], outs[1]["loss_cl"], rtol=1e-5)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_details_on_blockwise_path_gives_monitoring_weights():
    torch.manual_seed(8)
    model = SimMTM(small_cfg())
    model.dense_bytes = 0
    out = model(torch.randn(2, 2, 24), generator=torch.Generator().manual_seed(1), details=True)
    w = out["weights"]
    assert w.shape[0] == 4 and torch.allclose(w.sum(1), torch.ones(4), atol=1e-6)
    assert torch.all(w[torch.arange(4), torch.arange(4)] == 0)


def test_fp32_similarity_keeps_bf16_values_out_of_the_aggregation_matmul():
    """similarity_dtype fp32 on a bf16 model: weights x values in fp32 (result rounded once to bf16)."""
    from models.blockwise import similarity_and_losses

    torch.manual_seed(4)
    n, h, dv = 24, 8, 64
    s, values = torch.randn(n, h), torch.randn(n, dv).to(torch.bfloat16)
    idx = torch.arange(n)
    pos = positive_index(n, n // 4, 3, 0, "cpu")
    for dense in (None, 0):  # the dense path and the blockwise one
        _, z, _ = similarity_and_losses(s, s, values, idx, pos, 0.2, n, dtype=torch.float32, dense_bytes=dense)
        w = torch.softmax(mask_self(similarity_logits(s, s, 0.2), idx), -1)
        ref = w @ values.float()  # fp32 weights x fp32 copies of the values, rounded once to bf16 below
        assert z.dtype == torch.bfloat16
        if dense is None:
            assert torch.equal(z, ref.to(torch.bfloat16))
        else:  # blockwise softmax differs from torch.softmax in the last fp32 bits: at most one bf16 ulp apart
            assert ((z.float() - ref).abs() <= 2 ** -8 * ref.abs() + 1e-6).all()
