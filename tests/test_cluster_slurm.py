"""cluster/slurm/pretrain.sbatch under real Slurm: a one-host cluster (munge, slurmctld, slurmd from
Debian, root only, state in a temporary folder) takes the job as a user submits it, with the CPU
profile the script's header documents.

- the job trains on 2 ranks, prints the summary and ends COMPLETED with exit code 0:0;
- `scontrol requeue` after its first checkpoint: the requeued job resumes through ckpt.resume=auto
  and its losses and final parameters equal the uninterrupted job's, bitwise (CPU fp32);
- `scancel` while a checkpoint is being written leaves the previous checkpoint complete and intact.

A requeue or scancel that lands in a save taking milliseconds would be a race; the runs that are
interrupted are held inside the save of step 4 by tests/cluster_hooks (a sitecustomize on PYTHONPATH,
nothing in the trainer), so both land at the same point every time.
"""
import json

import pytest

from trainer.checkpoint import latest_tag, verify

from .cluster_utils import (HOOKS, SlurmCluster, install, read_reports, serve, skip_module_unless,
                            versions, wait_for)
from .launch_utils import TINY, summary

skip_module_unless("slurm")  # one printed reason where root or the Debian packages are missing
pytestmark = pytest.mark.slow

STEPS, EVERY = 8, 2
HELD = f"step_{2 * EVERY:08d}"  # interrupted runs are held in their second save
# The CPU profile documented in the script's header: no GPUs, one task per rank.
CPU_PROFILE = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]
JOB_TIMEOUT = 300


@pytest.fixture(scope="module")
def slurm(request, tmp_path_factory):
    install("slurm")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    yield from serve(request, cluster, "the Slurm cluster",
                     lambda s: f"slurm cluster tests: node {cluster.node} idle in {s:.1f} s "
                               f"({versions(['slurmctld', '-V'], ['munged', '--version'])})",
                     "slurm cluster tests: munged, slurmctld, slurmd and every job stopped (none left in ps)")


@pytest.fixture(autouse=True)
def no_jobs_left(slurm):
    yield
    slurm.cancel_all()


def submit(slurm, out, run, *, hold=False):
    """sbatch from the repository root with the CPU profile, as a user submits it (its log in `out`)."""
    env = slurm.env()
    if hold:
        (out / "hold").mkdir()
        # rank 0 stops there (the other rank waits for it in the save's barrier); once only, so the
        # requeued attempt runs through
        env.update(PYTHONPATH=str(HOOKS), SIMMTM_TEST_HOLD_SAVE=HELD, SIMMTM_TEST_HOLD_DIR=str(out / "hold"),
                   SIMMTM_TEST_HOLD_RANKS="0")
    return slurm.sbatch(*CPU_PROFILE, f"--output={out}/%x-%j.out", "cluster/slurm/pretrain.sbatch",
                        "--config", "configs/etth1_cpu.yaml", *TINY, f"train.max_steps={STEPS}",
                        f"ckpt.every={EVERY}", "ckpt.keep=3", "log.tensorboard=false", f"ckpt.dir={run}", env=env)


def log_of(out, jobid):
    return (out / f"simmtm-pretrain-{jobid}.out").read_text()


def held(slurm, out, jobid):
    """Wait until rank 0 of the job is held inside the save of HELD."""
    def reports():
        try:
            return read_reports(out / "hold").get(0)
        except json.JSONDecodeError:  # being written
            return None
    return wait_for(f"job {jobid} to reach the save of {HELD}", reports, JOB_TIMEOUT, interval=0.2,
                    alive=lambda: slurm.job(jobid)["JobState"] in ("PENDING", "RUNNING") or pytest.fail(
                        f"job {jobid} ended early: {slurm.job(jobid)}\n{log_of(out, jobid)[-3000:]}"))


def losses(s):
    return [(h["step"], h["loss"], h["loss_rec"], h["loss_cl"]) for h in s["history"]]


@pytest.fixture(scope="module")
def straight(slurm, tmp_path_factory):
    """The uninterrupted job: submitted, run to the end, its record and summary."""
    out = tmp_path_factory.mktemp("straight")
    run = out / "run"
    jobid = submit(slurm, out, run)
    job = slurm.wait_state(jobid, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
                           JOB_TIMEOUT)
    return {"job": job, "jobid": jobid, "log": log_of(out, jobid), "run": run}


def test_sbatch_cpu_profile_trains_and_completes(slurm, straight):
    job, log = straight["job"], straight["log"]
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", (job, log[-3000:])
    record = slurm.completion(straight["jobid"])
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0" and record["ProcCnt"] == "2", record
    assert f"simmtm: 2 tasks on 1 node(s), rendezvous {slurm.node}:" in log
    assert "2 rank(s) [slurm] on cpu, engine=deepspeed" in log  # ranks from SLURM_PROCID, not faked
    assert "== SimMTM pre-training summary ==" in log and "replicas identical   True (2 rank(s))" in log
    s = summary(straight["run"])
    assert s["steps"] == STEPS and s["world_size"] == 2


def test_scontrol_requeue_resumes_exactly(slurm, straight, tmp_path):
    out, run = tmp_path, tmp_path / "run"
    jobid = submit(slurm, out, run, hold=True)
    report = held(slurm, out, jobid)
    assert not report["shm_mapped"]  # srun sets no LOCAL_SIZE: no DeepSpeed shared-memory segment
    first = f"step_{EVERY:08d}"
    assert latest_tag(run / "checkpoints") == first  # preempted after its first checkpoint, before the second
    slurm.cmd("scontrol", "requeue", str(jobid))
    job = slurm.wait_state(jobid, ("PENDING",), 60)
    assert job["Restarts"] == "1", job
    # A requeued job waits cred_expire seconds (10 here, 120 by default) before it may start again: slurmd
    # refuses it until the revoked credential of its first run expires ("Job credential revoked"), which
    # forcing StartTime=now ran into under load.
    job = slurm.wait_state(jobid, ("COMPLETED", "FAILED", "CANCELLED"), JOB_TIMEOUT)
    log = log_of(out, jobid)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "1", (job, log[-3000:])
    assert "DUE TO JOB REQUEUE" in log  # the first attempt was really stopped by the requeue
    assert f"resumed from {first} at step {EVERY}" in log
    resumed, reference = summary(run), summary(straight["run"])
    assert losses(resumed) == losses(reference)  # every step's losses, bitwise
    assert resumed["parameter_digests"] == reference["parameter_digests"]


def test_scancel_during_checkpoint_write_keeps_last_complete(slurm, tmp_path):
    out, run = tmp_path, tmp_path / "run"
    jobid = submit(slurm, out, run, hold=True)
    held(slurm, out, jobid)
    ck = run / "checkpoints"
    previous = f"step_{EVERY:08d}"
    assert (ck / HELD).is_dir() and not (ck / HELD / "COMPLETE").exists()  # the save is under way
    slurm.cmd("scancel", str(jobid))
    job = slurm.wait_state(jobid, ("CANCELLED",), 60)
    assert slurm.completion(jobid)["JobState"] == "CANCELLED", job
    assert "CANCELLED AT" in log_of(out, jobid)
    assert latest_tag(ck) == previous  # `latest` never moved to the interrupted save
    verify(ck / previous)  # every file of the previous checkpoint matches the sha256 recorded at its save
    assert not (ck / HELD / "COMPLETE").exists()  # the interrupted one never looks complete
    assert not (run / "summary.json").exists()
