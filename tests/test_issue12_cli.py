"""Issue 12, items 7, 9 and 10: every entry point answers `--help` with its config tree, a user error is
one line on stderr and exit code 2 (its traceback only with `--debug`), and DeepSpeed's op cache
defaults to the repository's `.torch_extensions/`. Each check is a real process, failing before any
process group or DeepSpeed import."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.launch_utils import clean_env
from trainer.config import REPO_ROOT

PRETRAIN = ["trainer/pretrain.py", "--config", "configs/etth1_cpu.yaml"]
FINETUNE = ["trainer/finetune.py", "--config", "configs/finetune_etth1.yaml"]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env or clean_env(), capture_output=True,
                          text=True, timeout=60)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def test_finetune_help_lists_its_config_tree():
    proc = cli("trainer/finetune.py", "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert {"task.horizon", "task.mode", "init", "optim.lr", "train.max_steps", "train.epochs"} <= set(keys)
    assert "--debug" in proc.stdout


def test_pretrain_help_gives_type_and_default_without_importing_deepspeed():
    proc = cli("-X", "importtime", "trainer/pretrain.py", "-h")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lr = next(line.split() for line in proc.stdout.splitlines() if line.split()[:1] == ["optim.lr"])
    assert lr[1:3] == ["float", "0.001"], lr
    assert "deepspeed" not in proc.stderr  # -X importtime lists every module imported


@pytest.mark.parametrize("cmd", [PRETRAIN, FINETUNE], ids=["pretrain", "finetune"])
def test_bad_config_value_is_one_line_exit_2(cmd):
    line = one_line_error(cli(*cmd, "train.batch_size=0"))
    assert "train" in line and "batch_size" in line, line


@pytest.mark.parametrize("cmd", [PRETRAIN, FINETUNE], ids=["pretrain", "finetune"])
def test_debug_shows_the_traceback(cmd):
    proc = cli(*cmd, "train.batch_size=0", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr, proc.stderr[-3000:]
    assert "batch_size must be >= 1" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("cmd,out_key", [(PRETRAIN, "ckpt.dir"), (FINETUNE, "out")], ids=["pretrain", "finetune"])
def test_missing_data_file_is_one_line_exit_2(cmd, out_key, tmp_path):
    missing = tmp_path / "nonexistent.csv"
    line = one_line_error(cli(*cmd, f"data.source={missing}", f"{out_key}={tmp_path / 'run'}"))
    assert str(missing) in line, line


def test_publish_missing_checkpoint_is_one_line_exit_2_traceback_with_debug(tmp_path):
    args = ("trainer/publish.py", str(tmp_path / "nothing"), str(tmp_path / "out"))
    line = one_line_error(cli(*args))
    assert str(tmp_path / "nothing") in line, line
    debug = cli(*args, "--debug")
    assert "Traceback" in debug.stderr and "CheckpointError" in debug.stderr, debug.stderr[-3000:]


def test_publish_bad_storage_options_is_a_usage_error(tmp_path):
    proc = cli("trainer/publish.py", str(tmp_path / "nothing"), str(tmp_path / "out"), "--storage-options", "{x")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "--storage-options: not valid JSON" in proc.stderr


def test_entry_points_default_the_deepspeed_op_cache_to_the_repo():
    env = clean_env()
    env.pop("TORCH_EXTENSIONS_DIR")
    probe = ("import os, runpy, sys\n"
             "sys.argv = ['trainer/pretrain.py', '--help']\n"
             "try:\n"
             "    runpy.run_path('trainer/pretrain.py', run_name='__main__')\n"
             "except SystemExit:\n"
             "    pass\n"
             "print('CACHE', os.environ.get('TORCH_EXTENSIONS_DIR'))\n")
    proc = cli("-c", probe, env=env)
    assert f"CACHE {REPO_ROOT / '.torch_extensions'}" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
