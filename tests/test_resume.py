"""Preemption: a real SIGKILL of every rank, a crash in the middle of a save, and a change of world
size. The resumed run must reproduce the uninterrupted one: bitwise on CPU fp32 (same operations
in the same order on the same data; nothing in the path is non-deterministic)."""
import os
import signal
import subprocess
import time

from tests.s3_server import s3  # noqa: F401 - session fixture
from trainer.config import REPO_ROOT

from .launch_utils import clean_env, deepspeed_cmd, free_port, run, summary

STEPS, EVERY = 24, 4
LOSS_KEYS = ("loss", "loss_rec", "loss_cl")


def ds(out, *extra, ranks=2):
    return deepspeed_cmd("--num_gpus", str(ranks), "--master_port", str(free_port()),
                         script_args=["dist.zero_stage=2", "dist.deepspeed=true", f"train.max_steps={STEPS}",
                                      f"ckpt.every={EVERY}", "ckpt.keep=2", f"ckpt.dir={out}",
                                      "log.tensorboard=false", *extra])


def losses(s):
    return [(h["step"], *(h[k] for k in LOSS_KEYS)) for h in s["history"]]


def test_sigkill_every_rank_then_resume_auto_is_exact(tmp_path):
    # dropout on: the resumed run must also restore the global torch RNG streams, not only the mask generator
    straight = summary_of = tmp_path / "straight"
    run(ds(straight, "model.dropout=0.1"))
    reference = summary(summary_of)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(ds(killed, "model.dropout=0.1"), cwd=REPO_ROOT, env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    marker = killed / "checkpoints" / "step_00000008" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 of the launcher and every rank
    proc.wait()
    assert not (killed / "summary.json").exists()  # it really died mid-run
    latest = (killed / "checkpoints" / "latest").read_text()
    assert latest < f"step_{STEPS:08d}"

    out = run(ds(killed, "model.dropout=0.1", "ckpt.resume=auto"))
    assert f"resumed from {latest}" in out.stdout
    resumed = summary(killed)
    assert losses(resumed) == losses(reference)  # every step's losses, bitwise
    assert resumed["parameter_digests"] == reference["parameter_digests"]  # identical final parameters


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    out = tmp_path / "crash"
    proc = subprocess.run(ds(out), cwd=REPO_ROOT, env=clean_env(SIMMTM_CRASH_DURING_SAVE="step_00000012"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    ck = out / "checkpoints"
    assert (ck / "latest").read_text() == "step_00000008"
    assert (ck / "step_00000012").exists() and not (ck / "step_00000012" / "COMPLETE").exists()
    # resume=auto picks the previous complete checkpoint, and the run still matches a straight one
    run(ds(out, "ckpt.resume=auto"))
    straight = tmp_path / "straight"
    run(ds(straight))
    assert losses(summary(out)) == losses(summary(straight))
    assert summary(out)["parameter_digests"] == summary(straight)["parameter_digests"]


def test_two_ranks_resume_on_one(tmp_path):
    two = tmp_path / "two"
    run(ds(two, "train.max_steps=8"))
    saved = summary(two)
    # 1 rank, same step count: only loading happens, so the weights must equal the 2-rank ones
    one = tmp_path / "one"
    proc = run(ds(one, "train.max_steps=8", f"ckpt.resume={two / 'checkpoints' / 'step_00000008'}", ranks=1))
    assert "saved with 2 ranks" in proc.stdout
    assert summary(one)["parameter_digests"][0] == saved["parameter_digests"][0]
    # and it trains on from there (model and optimizer state loaded through the universal format)
    more = tmp_path / "more"
    run(ds(more, "train.max_steps=14", f"ckpt.resume={two / 'checkpoints' / 'step_00000008'}", ranks=1))
    s = summary(more)
    assert s["steps"] == 14 and s["world_size"] == 1
    assert all(h["loss"] == h["loss"] for h in s["history"])
    assert (two / "checkpoints" / "step_00000008_universal").exists()


def test_truncated_deepspeed_checkpoint_gives_clear_error(tmp_path):
    out = tmp_path / "trunc"
    run(ds(out, "train.max_steps=4", ranks=1))
    optim = next((out / "checkpoints" / "step_00000004").glob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[:100])
    proc = subprocess.run(ds(out, "train.max_steps=6", "ckpt.resume=auto", ranks=1), cwd=REPO_ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"{optim}: content differs from the sha256 recorded when the checkpoint was saved" in proc.stdout + proc.stderr


def test_edited_checkpoint_bytes_are_detected_and_unreadable_files_named(tmp_path):
    """An edit that keeps the file parseable is caught by the digests in COMPLETE; without them
    (an old checkpoint), safe loading still names a file it cannot parse."""
    import json

    import pytest

    from trainer.checkpoint import CheckpointError, load, safe_torch_load, verify

    out = tmp_path / "edit"
    run(ds(out, "train.max_steps=4", ranks=1))
    folder = out / "checkpoints" / "step_00000004"
    model = next(folder.glob("*model_states.pt"))
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the tensor payload
    model.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{model}: content differs"):
        verify(folder)
    with pytest.raises(CheckpointError, match="content differs"):
        load(object(), out / "checkpoints", "step_00000004")
    optim = next(folder.glob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[:100])
    (folder / "COMPLETE").write_text(json.dumps({"step": 4}))  # no digests recorded
    verify(folder)
    import torch

    with pytest.raises(CheckpointError, match=f"{optim}: cannot be loaded safely"):
        with safe_torch_load():
            torch.load(optim)


def test_finished_run_started_again_leaves_latest_untouched(tmp_path):
    out = tmp_path / "done"
    run(ds(out, "train.max_steps=4", "ckpt.every=2", ranks=1))
    ck = out / "checkpoints"
    marker = ck / "step_00000004" / "COMPLETE"
    before = (marker.read_text(), marker.stat().st_mtime_ns, (ck / "latest").read_text())
    run(ds(out, "train.max_steps=4", "ckpt.every=2", "ckpt.resume=auto", ranks=1))
    assert (marker.read_text(), marker.stat().st_mtime_ns, (ck / "latest").read_text()) == before
    assert summary(out)["checkpoint"].endswith("step_00000004")


def test_rollback_keeps_the_new_latest_when_pruning(tmp_path):
    """Resuming from an older checkpoint (a rollback) and saving with keep=1: the checkpoint just
    written is kept and named by `latest`, even though an older timeline left higher step numbers."""
    from trainer.checkpoint import latest_tag, verify

    out = tmp_path / "rollback"
    run(ds(out, "train.max_steps=8", "ckpt.every=2", "ckpt.keep=4", ranks=1))
    ck = out / "checkpoints"
    run(ds(out, "train.max_steps=6", "ckpt.every=2", "ckpt.keep=1", f"ckpt.resume={ck / 'step_00000004'}", ranks=1))
    assert latest_tag(ck) == "step_00000006"
    verify(ck / "step_00000006")
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000006"]


def test_safe_loading_refuses_arbitrary_pickles(tmp_path):
    import pytest
    import torch

    from trainer.checkpoint import CheckpointError, safe_torch_load

    class Evil:
        def __reduce__(self):
            return (print, ("this would run code",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt: cannot be loaded safely"):
        with safe_torch_load():
            torch.load(tmp_path / "evil.pt")


def test_checkpoints_mirrored_to_s3_survive_loss_of_local_disk(tmp_path, s3):  # noqa: F811
    """ckpt.remote: every complete checkpoint goes to S3 (moto server); after a crash and the loss
    of the local checkpoint folder, resume=auto continues from S3 and matches a straight run."""
    import json
    import shutil

    from .launch_utils import pretrain_cmd

    args = ["train.max_steps=12", "ckpt.every=4", "ckpt.keep=2", "log.tensorboard=false"]
    straight = tmp_path / "straight"
    run(pretrain_cmd(*args, f"ckpt.dir={straight}"))
    remote = f"s3://{s3['new_bucket']('ckpt')}/run1"
    mirrored = [*args, f"ckpt.remote={remote}", f"ckpt.storage_options={json.dumps(s3['storage_options'])}"]
    out = tmp_path / "mirrored"
    proc = subprocess.run(pretrain_cmd(*mirrored, f"ckpt.dir={out}"), cwd=REPO_ROOT, capture_output=True, text=True,
                          env=clean_env(SIMMTM_CRASH_DURING_SAVE="step_00000012"), timeout=300)
    assert proc.returncode != 0
    client = s3["client"]
    bucket, prefix = remote[5:].split("/", 1)
    latest = client.get_object(Bucket=bucket, Key=f"{prefix}/latest")["Body"].read().decode()
    assert latest == "step_00000008"
    shutil.rmtree(out / "checkpoints")  # the node's local disk is gone
    run(pretrain_cmd(*mirrored, f"ckpt.dir={out}", "ckpt.resume=auto"))
    assert losses(summary(out)) == losses(summary(straight))
    assert summary(out)["parameter_digests"] == summary(straight)["parameter_digests"]
    assert client.get_object(Bucket=bucket, Key=f"{prefix}/latest")["Body"].read().decode() == "step_00000012"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")["Contents"]]
    assert sorted({k.split("/")[1] for k in keys if "/step_" in k}) == ["step_00000008", "step_00000012"]  # keep=2
