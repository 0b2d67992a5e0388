"""Real multi-process runs: the deepspeed launcher (ZeRO 0/2/3), torchrun across two "nodes",
the Slurm batch script under a faked Slurm, a bf16 run, and the TensorBoard output."""
import math
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from trainer.config import REPO_ROOT
from trainer.distributed import SHM_DIR, shm_segment_name

from .launch_utils import VENV_BIN, clean_env, deepspeed_cmd, free_port, pretrain_cmd, run, summary

STEPS = 16


def assert_trained(s: dict, world: int) -> None:
    assert s["steps"] == STEPS and s["world_size"] == world
    losses = [h["loss"] for h in s["history"]]
    assert sum(losses[-4:]) / 4 < losses[0], losses  # the loss goes down
    assert s["replicas_identical"], s["parameter_digests"]  # parameters identical on every rank


def assert_no_shm_left(port: int) -> None:
    """DeepSpeed's CPU all-reduce segments (64 MiB per rank) must not outlive the run."""
    left = list(Path(SHM_DIR).glob(shm_segment_name("*", "*", port)))
    assert not left, left


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_deepspeed_launcher_two_ranks(zero, tmp_path):
    out = tmp_path / f"z{zero}"
    port = free_port()
    proc = run(deepspeed_cmd("--num_gpus", "2", "--master_port", str(port),
                             script_args=[f"dist.zero_stage={zero}", f"train.max_steps={STEPS}", f"ckpt.dir={out}",
                                          "log.image_every=8"]))
    s = summary(out)
    assert_trained(s, 2)
    assert_no_shm_left(port)
    assert "deepspeed" in proc.stdout and "replicas identical   True" in proc.stdout
    if zero == 0:  # rank-0-only monitoring: one events file, with scalars, images and hparams
        events = list((out / "tb").rglob("events.out.tfevents.*"))
        acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        tags = acc.Tags()
        for tag in ("loss/total", "loss/reconstruction", "loss/constraint", "weight/sigma_rec", "weight/sigma_cl",
                    "lr", "grad_norm", "throughput/series_per_s", "throughput/points_per_s", "data/wait_fraction",
                    "memory/peak_gb"):
            assert tag in tags["scalars"], tag
            assert len(acc.Scalars(tag)) == STEPS
        assert {"reconstruction", "similarity_weights"} <= set(tags["images"])
        assert len(acc.Images("reconstruction")) == 2
        assert len({e.name.split(".")[-2] for e in events}) == 1  # one writer process: rank 0
        plugins = {v.metadata.plugin_data.plugin_name for e in events for ev in EventFileLoader(str(e)).Load()
                   for v in ev.summary.value}
        assert "hparams" in plugins  # the run's hyper-parameters


def test_deepspeed_hostfile_localhost(tmp_path):
    """The documented cluster command, with cluster/hosts naming localhost (slots=2)."""
    out = tmp_path / "hostfile"
    port = free_port()
    run(deepspeed_cmd("--hostfile", "cluster/hosts", "--no_ssh_check", "--master_addr", "127.0.0.1",
                      "--master_port", str(port),
                      script_args=["dist.zero_stage=2", f"train.max_steps={STEPS}", f"ckpt.dir={out}"]))
    assert_trained(summary(out), 2)
    assert_no_shm_left(port)


def test_torchrun_two_nodes_one_rank_each(tmp_path):
    out = tmp_path / "torchrun"
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [str(VENV_BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
               "--master_addr", "127.0.0.1", "--master_port", str(port),
               *pretrain_cmd("dist.zero_stage=2", f"train.max_steps={STEPS}", f"ckpt.dir={out}")[1:]]
        procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=clean_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=420)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(l[-3000:] for l in logs)
    s = summary(out)
    assert_trained(s, 2)
    assert "[torchrun]" in logs[0]


def test_slurm_batch_script_with_faked_slurm(tmp_path):
    """cluster/slurm/pretrain.sbatch run as-is; srun/scontrol are stand-ins that start the tasks
    locally with the variables real Slurm sets (SLURM_PROCID, SLURM_LOCALID, ...)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(textwrap.dedent("""\
        #!/usr/bin/env bash
        # stand-in for srun: drop srun's own options, start SLURM_NTASKS copies of the command
        while [[ "$1" == -* ]]; do shift; done
        pids=()
        for ((i = 0; i < SLURM_NTASKS; i++)); do
          SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!)
        done
        rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done; exit $rc
        """))
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\n# stand-in: 'scontrol show hostnames LIST'\n"
                                      "echo 127.0.0.1\n")
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "slurm"
    env = clean_env(SLURM_JOB_ID="777", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="127.0.0.1",
                    SLURM_CPUS_PER_TASK="1", MASTER_PORT=str(free_port()), PYTHON=sys.executable)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    proc = run(["bash", str(REPO_ROOT / "cluster/slurm/pretrain.sbatch"), "--config", "configs/etth1_cpu.yaml",
                *pretrain_cmd()[4:], f"train.max_steps={STEPS}", f"ckpt.dir={out}"], env=env)
    assert "2 tasks on 1 node(s), rendezvous 127.0.0.1" in proc.stdout
    s = summary(out)
    assert_trained(s, 2)
    assert "[slurm]" in proc.stdout


def test_bf16_tiny_run(tmp_path):
    out = tmp_path / "bf16"
    run(pretrain_cmd("dist.deepspeed=true", "train.precision=bf16", "model.similarity_dtype=bf16",
                     "train.max_steps=4", f"ckpt.dir={out}"))
    s = summary(out)
    assert s["steps"] == 4
    assert all(math.isfinite(h[k]) for h in s["history"] for k in ("loss", "loss_rec", "loss_cl"))
