"""Helpers for tests that launch real training processes."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from trainer.config import REPO_ROOT

VENV_BIN = Path(sys.executable).parent
TINY = ["model.seq_len=48", "model.d_model=8", "model.n_heads=2", "model.e_layers=1", "model.d_ff=16",
        "model.proj_dim=16", "model.dropout=0.0", "data.window_stride=4", "train.batch_size=4",
        "train.progress=false", "optim.warmup_steps=2", "train.log_every=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra) -> dict:
    """The parent's environment without launcher variables a test process may have inherited."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
           and not k.startswith("SLURM_")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".torch_extensions"))
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run(cmd, timeout=420, env=None, cwd=REPO_ROOT) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def summary(run_dir) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def pretrain_cmd(*args) -> list:
    return [sys.executable, "trainer/pretrain.py", "--config", "configs/etth1_cpu.yaml", *TINY, *args]


def deepspeed_cmd(*launcher_args, script_args=()) -> list:
    return [str(VENV_BIN / "deepspeed"), *launcher_args, "trainer/pretrain.py", "--config", "configs/etth1_cpu.yaml",
            *TINY, *script_args]
