"""End-to-end pre-training on the bundled ETTh1 (tiny model, CPU, real subprocess)."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from models import SimMTM, SimMTMConfig
from trainer.config import REPO_ROOT

TINY = ["model.seq_len=48", "model.d_model=8", "model.n_heads=2", "model.e_layers=1", "model.d_ff=16",
        "model.proj_dim=16", "model.dropout=0.0", "data.window_stride=4", "train.batch_size=4",
        "train.progress=false", "optim.warmup_steps=5"]


def run_pretrain(args, cwd=REPO_ROOT, check=True):
    return subprocess.run([sys.executable, str(REPO_ROOT / "trainer/pretrain.py"), *args], cwd=cwd,
                          capture_output=True, text=True, check=check, timeout=600)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    proc = run_pretrain(["--config", "configs/etth1_cpu.yaml", *TINY, "train.max_steps=60", "train.log_every=1",
                         f"ckpt.dir={out}", "log.image_every=20"])
    return out, proc


def test_short_run_lowers_reconstruction_loss(tiny_run):
    out, proc = tiny_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 60
    rec = [h["loss_rec"] for h in summary["history"]]
    assert len(rec) == 60
    first, last = rec[0], sum(rec[-10:]) / 10
    # threshold: the mean of the last 10 steps is at least 20% below the first logged value
    assert last <= 0.8 * first, (first, last)
    assert "SimMTM pre-training summary" in proc.stdout and "peak memory" in proc.stdout
    assert summary["series_per_s"] > 0 and summary["peak_memory_gb"] > 0


def test_checkpoint_loads_into_fresh_model_with_identical_outputs(tiny_run):
    out, _ = tiny_run
    cfg_tree = json.loads((out / "config.json").read_text())
    cfg = SimMTMConfig(**cfg_tree["model"])
    folder = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    state = load_file(str(folder / "model.safetensors"))
    a, b = SimMTM(cfg), SimMTM(cfg)
    a.load_state_dict(state)
    b.load_state_dict(load_file(str(folder / "model.safetensors")))
    assert not torch.equal(SimMTM(cfg).encoder.embed.weight, a.encoder.embed.weight)  # trained != init
    a.eval(), b.eval()
    x = torch.randn(2, 7, cfg.seq_len)
    oa = a(x, generator=torch.Generator().manual_seed(0), details=True)
    ob = b(x, generator=torch.Generator().manual_seed(0), details=True)
    assert torch.equal(oa["pred"], ob["pred"]) and torch.equal(oa["loss"], ob["loss"])
    assert torch.equal(a.encoder(x[:, 0]), b.encoder(x[:, 0]))


def test_bad_config_is_rejected_with_the_key():
    proc = run_pretrain(["model.d_modle=8"], check=False)
    assert proc.returncode == 2
    assert "model.d_modle: unknown key; did you mean 'd_model'" in proc.stderr
