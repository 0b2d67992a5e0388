"""Issue 14: run state as registered objects, one optimizer configuration, entry points without
sys.path edits, and a teardown that leaves nothing behind."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer import checkpoint
from trainer.config import REPO_ROOT, ConfigError, load_config
from trainer.engine import build_engine, deepspeed_config
from trainer.state import RNGState, TrainState

from .launch_utils import clean_env, deepspeed_cmd, free_port, run, summary


class Counter:
    """A piece of run state as a user would add one: registered, it is saved and restored."""

    def __init__(self, shared: bool):
        self.shared, self.n, self.restarted = shared, 0, None

    def state_dict(self) -> dict:
        return {"counter": self.n} if self.shared else {"n": self.n}

    def load_state_dict(self, sd: dict) -> None:
        self.n = sd["counter"] if self.shared else sd["n"]

    def restart(self, step: int) -> None:
        self.restarted = step


def _engine(seed: int = 0):
    torch.manual_seed(seed)
    cfg = load_config(None, ["optim.warmup_steps=1"])
    return build_engine(torch.nn.Linear(3, 2), cfg, torch.device("cpu"), 10)[0]


def test_registered_states_are_saved_and_resumed(tmp_path):
    engine = _engine()
    engine(torch.ones(1, 3)).sum().backward()
    engine.step()
    train, rng = TrainState(step=7, epoch=1, history=[{"step": 7}]), RNGState(torch.device("cpu"), 1, 0)
    shared, mine = Counter(shared=True), Counter(shared=False)
    shared.n, mine.n = 5, 9
    states = {"train": train, "shared": shared, "rng": rng, "mine": mine}
    folder = checkpoint.save(engine, tmp_path, 7, states, {"world_size": 1, "engine": "torch"}, keep=0)
    assert json.loads((folder / "state.json").read_text())["counter"] == 5
    assert set(json.loads((folder / "rank0.json").read_text())) == {"rng", "mine"}
    expected_masks = torch.rand(4, generator=rng.generator)

    fresh = _engine(seed=1)
    got = {"train": TrainState(), "shared": Counter(True), "rng": RNGState(torch.device("cpu"), 1, 0),
           "mine": Counter(False)}
    point = checkpoint.ResumePoint(tmp_path, folder.name, checkpoint.read_state(tmp_path, folder.name))
    checkpoint.resume(fresh, got, point, world_size=1)
    assert (got["train"].step, got["train"].epoch, got["shared"].n, got["mine"].n) == (7, 1, 5, 9)
    assert torch.equal(torch.rand(4, generator=got["rng"].generator), expected_masks)
    assert all(torch.equal(a, b) for a, b in zip(fresh.module.parameters(), engine.module.parameters()))
    assert fresh.global_steps == engine.global_steps == 1

    # another world size: shared state loads, per-rank state restarts (the RNGs reseed by step)
    other = {"shared": Counter(True), "mine": Counter(False), "rng": RNGState(torch.device("cpu"), 1, 0)}
    checkpoint.resume(_engine(seed=2), other, point, world_size=2)
    assert (other["shared"].n, other["mine"].n, other["mine"].restarted) == (5, 0, 7)
    assert torch.equal(other["rng"].generator.get_state(),
                       torch.Generator().manual_seed(1 * 1000 + 0 + 7919 * 7).get_state())


def test_the_deepspeed_json_may_not_contradict_the_config(tmp_path):
    ds = json.loads((REPO_ROOT / "cluster" / "ds_config.json").read_text())
    ds["optimizer"]["params"]["lr"] = 5e-4
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match=r"optimizer.params.lr=0.0005 but optim.lr is 0.001; set it in one place"):
        deepspeed_config(load_config(None, [f"dist.ds_config={path}", "optim.lr=1e-3"]), 10)
    # the same value twice is no contradiction
    assert deepspeed_config(load_config(None, [f"dist.ds_config={path}", "optim.lr=5e-4"]), 10)[
        "optimizer"]["params"]["lr"] == 5e-4
    ds["bf16"]["enabled"] = True
    path.write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match=r"bf16.enabled=True but train.precision \(fp32\)"):
        deepspeed_config(load_config(None, [f"dist.ds_config={path}", "optim.lr=5e-4"]), 10)


@pytest.mark.parametrize("how", ["module", "script"])
def test_entry_points_run_from_anywhere_without_path_edits(tmp_path, how):
    for name in ("pretrain", "finetune", "evaluate", "publish", "predict"):
        cmd = [sys.executable, "-m", f"trainer.{name}"] if how == "module" else \
            [sys.executable, str(REPO_ROOT / "trainer" / f"{name}.py")]
        p = subprocess.run([*cmd, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                           env=clean_env())
        assert p.returncode == 0 and "--help" in p.stdout, (name, p.stdout[-500:], p.stderr[-2000:])
    assert not [f for f in (REPO_ROOT / "trainer").glob("*.py") if "sys.path.insert" in f.read_text()]
    assert not [f for f in (REPO_ROOT / "bench").glob("*.py") if "sys.path.insert" in f.read_text()]


def test_a_two_rank_deepspeed_run_exits_cleanly_and_leaves_nothing(tmp_path):
    """The launcher's exit code is every rank's: 0, with no abort at interpreter exit, no rank
    process left running and no shared-memory segment left in /dev/shm."""
    from trainer.distributed import SHM_DIR, shm_segment_name

    port = free_port()
    proc = run(deepspeed_cmd("--num_gpus", "2", "--master_port", str(port),
                             script_args=["train.max_steps=3", f"ckpt.dir={tmp_path}", "log.tensorboard=false"]))
    assert summary(tmp_path)["steps"] == 3
    assert "terminate called" not in proc.stderr + proc.stdout
    left = subprocess.run(["pgrep", "-f", f"ckpt.dir={tmp_path}"], capture_output=True, text=True).stdout.split()
    assert not left, left
    assert not list(Path(SHM_DIR).glob(shm_segment_name("*", "*", port)))
