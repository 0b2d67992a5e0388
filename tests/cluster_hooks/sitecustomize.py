"""Test-only: hold a training process in the middle of a checkpoint write, so that a test can
preempt, cancel or kill it at exactly that point (a real `scontrol requeue`, `scancel` or SIGKILL
then lands inside the save every time, instead of racing a save that takes milliseconds).

Python imports `sitecustomize` at start-up from PYTHONPATH; the cluster tests put this folder there
only for the runs they interrupt (sbatch passes the submitter's environment to every task;
DeepSpeed's pdsh runner exports PYTHONPATH to every host). Nothing in the trainer knows about it.

  SIMMTM_TEST_HOLD_SAVE=step_00000004   the checkpoint folder to hold in
  SIMMTM_TEST_HOLD_DIR=/some/dir        where each rank reports (`<tag>.rank<R>.json`: its pid, its
                                        ssh session, whether it mapped DeepSpeed's shared memory,
                                        the ninja its PATH finds)
  SIMMTM_TEST_HOLD_RANKS=1              ranks that stop there (default: all); the others report only

At a rank's first opening of a file for writing inside that folder it reports, then (if held)
sleeps until it is killed. A report that already exists means the hold happened before (a requeued
job starting again): the rank then carries on, so the second attempt can finish.
"""
import os
import sys

_TAG = os.environ.get("SIMMTM_TEST_HOLD_SAVE")
_DIR = os.environ.get("SIMMTM_TEST_HOLD_DIR")


def _writing(mode, flags) -> bool:
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR))


def _hook(event, args):
    global _TAG
    if event != "open" or _TAG is None:
        return
    try:
        path = os.fspath(args[0])
    except TypeError:  # a file descriptor
        return
    if isinstance(path, bytes):
        path = path.decode(errors="replace")
    if f"/{_TAG}/" not in path or not _writing(args[1], args[2]):
        return
    tag, _TAG = _TAG, None  # once per process; also keeps the report's own open() out of the hook
    import json
    import shutil
    import time

    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    report = os.path.join(_DIR, f"{tag}.rank{rank}.json")
    try:
        with open(report, "x") as f:
            with open("/proc/self/maps") as maps:
                shm = "deepspeed_allreduce_buffer" in maps.read()
            json.dump({"pid": os.getpid(), "rank": int(rank), "path": path, "shm_mapped": shm,
                       "ssh_connection": os.environ.get("SSH_CONNECTION"),
                       "master_addr": os.environ.get("MASTER_ADDR"), "ninja": shutil.which("ninja")}, f)
    except FileExistsError:
        return  # held before: this is the run after the interruption
    held = os.environ.get("SIMMTM_TEST_HOLD_RANKS")
    if held is None or rank in held.split(","):
        sys.stderr.write(f"[test hold] rank {rank} held while writing {path}\n")
        sys.stderr.flush()
        while True:
            time.sleep(60)


if _TAG and _DIR:
    sys.addaudithook(_hook)
