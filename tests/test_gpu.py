"""Correctness on CUDA: what the CPU suite cannot show (run with `pytest -m gpu` on a GPU machine).

Every test here is marked `gpu` and skipped without CUDA. To check their logic on a machine without
CUDA, `SIMMTM_GPU_TESTS_ON_CPU=1 pytest -m gpu tests/test_gpu.py` runs them on the CPU instead; the
few facts only CUDA has (padded heads, NCCL, the fused kernel's name) are asserted on CUDA only.

Tolerances, against a CPU float64 reference (weights, encoder and similarity in fp64; masking,
normalisation and the reconstruction loss are fp32 by design): fp32 losses within 1e-5 relative,
gradients within 1e-5 in norm over all parameters and 1e-4 per tensor (CPU fp32 measures ~6e-7 and
5e-6); bf16 weights, as DeepSpeed's bf16 runs them, losses within 1e-2 and gradients within 15% in
norm (CPU bf16 measures <= 8e-4 and 4-6%). TF32 is off for the fp32 comparisons (cuDNN convolutions
default to it).
"""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from models import SimMTM, SimMTMConfig, load_pretrained, load_simmtm
from models.blockwise import similarity_and_losses
from models.encoder import sdpa, sdpa_backends
from models.masking import bernoulli_mask, geometric_mask, make_views
from models.similarity import positive_index
from tests.test_masking import stretches
from trainer.distributed import parameter_digest

from .launch_utils import TINY, free_port, run, summary

ON_CPU = os.environ.get("SIMMTM_GPU_TESTS_ON_CPU") == "1"
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (CUDA or ON_CPU), reason="needs CUDA (SIMMTM_GPU_TESTS_ON_CPU=1: logic on CPU)")]

MODEL = dict(seq_len=48, d_model=16, n_heads=8, e_layers=2, d_ff=32, proj_dim=16, dropout=0.0)  # heads of width 2
FUSED = {"FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest error relative to b's largest magnitude."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.fixture
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ----------------------------------------------------------------------------- the model on the device

def batch(seed=0):
    """Windows [4, 3, 48] and fixed views (`keep`): CPU and CUDA draw masks from different generators."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 48, generator=g)
    _, keep = make_views(x.reshape(12, 48), 3, 0.5, 3.0, "geometric", g)
    return x, keep


def losses_and_grads(device, dtype, x, keep):
    torch.manual_seed(0)
    model = SimMTM(SimMTMConfig(**MODEL)).to(device, dtype).train()
    out = model(x.to(device), keep=keep.to(device))
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(out["loss"], params)
    return ({k: out[k].item() for k in ("loss", "loss_rec", "loss_cl")},
            {n: g.double().cpu() for n, g in zip(names, grads)})


def compare(dtype, loss_tol, grad_tol):
    x, keep = batch()
    ref_losses, ref_grads = losses_and_grads("cpu", torch.float64, x, keep)
    losses, grads = losses_and_grads(DEVICE, dtype, x, keep)
    for k, v in ref_losses.items():
        assert abs(losses[k] - v) <= loss_tol * abs(v), (k, losses[k], v)
    err = math.sqrt(sum((grads[n] - g).square().sum().item() for n, g in ref_grads.items()))
    norm = math.sqrt(sum(g.square().sum().item() for g in ref_grads.values()))
    assert err <= grad_tol * norm, (err / norm, grad_tol)
    return grads, ref_grads, norm


def test_fp32_losses_and_gradients_equal_cpu_fp64(no_tf32):
    grads, ref_grads, norm = compare(torch.float32, 1e-5, 1e-5)
    for n, g in ref_grads.items():  # each tensor that carries gradient (fc1's bias has none: BatchNorm follows)
        if g.norm() > 1e-3 * norm:
            assert (grads[n] - g).norm() <= 1e-4 * g.norm(), n


def test_bf16_losses_and_gradients_within_tolerance():
    compare(torch.bfloat16, 1e-2, 0.15)


class DtypesSeen(TorchFunctionMode):
    """Records the input dtype of every softmax, log-softmax and MSE called in Python."""

    WATCHED = {torch.softmax: "softmax", torch.log_softmax: "log_softmax", F.mse_loss: "mse_loss"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.WATCHED:
            self.seen.append((self.WATCHED[func], args[0].dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("similarity_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("dense_bytes", [None, 0], ids=["dense", "blockwise"])
def test_similarity_path_dtypes_under_bf16(similarity_dtype, dense_bytes):
    """bf16 weights (DeepSpeed bf16): the encoder runs bf16; softmax, log-softmax and losses stay fp32."""
    x, keep = batch()
    model = SimMTM(SimMTMConfig(**MODEL, similarity_dtype=similarity_dtype)).to(DEVICE, torch.bfloat16).train()
    model.dense_bytes = dense_bytes
    encoded = []
    model.encoder.register_forward_hook(lambda mod, args, out: encoded.append(out.dtype))
    with DtypesSeen() as mode:
        out = model(x.to(DEVICE), keep=keep.to(DEVICE))
    assert encoded == [torch.bfloat16]
    assert all(out[k].dtype == torch.float32 for k in ("loss", "loss_rec", "loss_cl")), out
    names = {name for name, _ in mode.seen}
    assert "mse_loss" in names
    if dense_bytes is None:
        assert {"softmax", "log_softmax"} <= names
    assert all(dtype == torch.float32 for _, dtype in mode.seen), mode.seen
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------- masks and similarity

def test_mask_statistics_on_device():
    g = torch.Generator(device=DEVICE).manual_seed(0)
    lm = 3.0
    for ratio in (0.125, 0.5, 0.75):
        mask = geometric_mask(20000, 336, ratio, lm, g, DEVICE)
        assert mask.device.type == DEVICE.type and mask.dtype == torch.bool and mask.shape == (20000, 336)
        assert abs(mask.float().mean().item() - ratio) < 0.02, ratio
        long = geometric_mask(100, 20000, ratio, lm, g, DEVICE).cpu()  # long series: no end effects
        assert abs(stretches(long, True).float().mean().item() - lm) / lm < 0.05, ratio
        lu = lm * (1 - ratio) / ratio
        assert abs(stretches(long, False).float().mean().item() - lu) / lu < 0.05, ratio
    assert abs(bernoulli_mask(20000, 336, 0.3, g, DEVICE).float().mean().item() - 0.3) < 0.01
    x = torch.randn(12, 48, device=DEVICE)
    series, keep = make_views(x, 3, 0.5, lm, "geometric", g)
    assert series.device.type == keep.device.type == DEVICE.type
    assert keep[:12].all() and torch.equal(series[:12], x)  # the originals come first, unmasked
    assert torch.equal(series, x.repeat(4, 1) * keep)


def test_blockwise_equals_dense_on_device(no_tf32):
    n0, m, h, dv = 64, 3, 128, 96  # 256 rows; block 37 leaves a ragged last block
    n = n0 * (m + 1)
    g = torch.Generator().manual_seed(0)
    s, z, up = torch.randn(n, h, generator=g), torch.randn(n, dv, generator=g), torch.randn(n0, dv, generator=g)
    si, pos = torch.arange(n), positive_index(n, n0, m, 0, "cpu")

    def run_path(device, dtype, dense_bytes, sim_dtype=torch.float32):
        s_ = s.to(device, dtype).requires_grad_()
        z_ = z.to(device, dtype).requires_grad_()
        cl, agg, _ = similarity_and_losses(s_, s_, z_, si.to(device), pos.to(device), 0.2, n0, 0, sim_dtype,
                                           block=37, dense_bytes=dense_bytes)
        return [cl, agg, *torch.autograd.grad(cl + (agg * up.to(device, dtype)).sum(), (s_, z_))]

    ref = run_path("cpu", torch.float64, None)
    dense, block = run_path(DEVICE, torch.float32, None), run_path(DEVICE, torch.float32, 0)
    for d, b, r in zip(dense, block, ref):
        assert rel(b, d) < 1e-5 and rel(b, r) < 1e-5 and rel(d, r) < 1e-5
    dense, block = (run_path(DEVICE, torch.float32, db, torch.bfloat16) for db in (None, 0))
    for d, b, r in zip(dense, block, ref):  # bf16 matmuls, fp32 softmax
        assert rel(b, d) < 2e-2 and rel(b, r) < 2e-2


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_sdpa_at_reference_shape_is_fused_and_equals_math(dtype, tol):
    """16 heads of width 2 over 336 tokens: after padding a fused kernel runs, with math's results."""
    g = torch.Generator().manual_seed(0)
    shape = (16, 16, 336, 2)
    q, k, v = (torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3))
    report = sdpa_backends(q, k, v)
    assert report["selected"] in FUSED and report["selected"] in report["usable"] and not report["failed"], report
    if DEVICE.type == "cuda":
        assert report["kernel_head_dim"] == 8, report
        if dtype == torch.float32:  # flash and cuDNN run bf16/fp16 only
            assert report["selected"] == "EFFICIENT_ATTENTION", report
    r = torch.randn(shape, generator=g).to(DEVICE, dtype)
    out = sdpa(q, k, v)
    grads = torch.autograd.grad((out * r).sum(), (q, k, v))
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel([SDPBackend.MATH]):  # the math kernel in fp64 on the same inputs
        ref = F.scaled_dot_product_attention(*ref_in)
    ref_grads = torch.autograd.grad((ref * r.double()).sum(), ref_in)
    assert out.dtype == dtype and rel(out, ref) < tol, (rel(out, ref), report)
    for a, b in zip(grads, ref_grads):
        assert rel(a, b) < tol, (rel(a, b), report)


# ----------------------------------------------------------------------------- DeepSpeed on the device

STEPS, EVERY = 6, 3


def ds_cmd(out, *extra):
    """A 1-rank run through the deepspeed launcher (its module: the console script may not be on PATH)."""
    backend = ["dist.backend=nccl"] if DEVICE.type == "cuda" else []
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
            "trainer/pretrain.py", "--config", "configs/etth1_cpu.yaml", *TINY, "dist.deepspeed=true",
            "train.precision=bf16", "model.dropout=0.1", f"train.max_steps={STEPS}", f"ckpt.every={EVERY}",
            "log.tensorboard=false", f"ckpt.dir={out}", *backend, *extra]


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    proc = run(ds_cmd(out, f"ckpt.publish={out / 'published'}"))
    return out, proc.stdout


def losses(s):
    return [(h["step"], h["loss"], h["loss_rec"], h["loss_cl"]) for h in s["history"]]


def test_deepspeed_one_rank_run(ds_run):
    out, stdout = ds_run
    s = summary(out)
    assert s["steps"] == STEPS and s["world_size"] == 1 and len(s["history"]) == STEPS
    assert "engine=deepspeed" in stdout and "[deepspeed]" in stdout
    assert f"on {'cuda:0' if DEVICE.type == 'cuda' else 'cpu'}" in stdout
    assert all(math.isfinite(v) for row in losses(s) for v in row[1:])


def test_resume_reproduces_the_straight_run(ds_run, tmp_path):
    """From the step-3 checkpoint in a new folder: steps 4-6 as in the straight run (dropout on, so the
    device RNG must be restored too). Bitwise on CPU; on CUDA the first resumed step must match to the
    last bits (same weights, data and masks), later ones within 1e-3 (atomics in attention's backward
    reorder fp32 sums, and bf16 weights round the differences up)."""
    straight, _ = ds_run
    resumed = tmp_path / "resumed"
    proc = run(ds_cmd(resumed, f"ckpt.resume={straight / 'checkpoints' / 'step_00000003'}"))
    assert "resumed from step_00000003" in proc.stdout
    want, got = losses(summary(straight)), losses(summary(resumed))
    assert [row[0] for row in got] == [row[0] for row in want] == list(range(1, STEPS + 1))
    if DEVICE.type == "cpu":
        assert got == want
        return
    assert got[:EVERY] == want[:EVERY]  # carried over from the checkpoint
    for i, (a, b) in enumerate(zip(got[EVERY:], want[EVERY:])):
        tol = 1e-6 if i == 0 else 1e-3
        assert all(math.isclose(x, y, rel_tol=tol) for x, y in zip(a[1:], b[1:])), (a, b)


def test_publish_then_load_pretrained_on_cpu(ds_run, no_tf32):
    out, _ = ds_run
    s = summary(out)
    published = s["published"]
    # the published weights are the trained replica's: fp32 in the file, and in the run bf16
    # parameters with fp32 buffers, as DeepSpeed's bf16 engine holds them
    trained = load_simmtm(published)
    for p in trained.parameters():
        p.data = p.data.to(torch.bfloat16)
    assert parameter_digest(trained) == s["parameter_digests"][0]
    enc = load_pretrained(published)
    x = torch.randn(8, enc.cfg.seq_len, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on_cpu = enc(x)
        on_device = enc.to(DEVICE)(x.to(DEVICE))
    assert on_cpu.device.type == "cpu" and rel(on_device, on_cpu) < 1e-5
