"""Issue 12, findings 1-4 and 6 for pre-training: non-finite guard, run folders never silently reused,
rollback to an older checkpoint, provenance of settings changed on resume, missing checkpoint files
named, weights-only intermediate checkpoints. In-process, tiny model, plain engine: seconds each."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from models import SimMTM
from tests.s3_server import s3  # noqa: F401 - session fixture
from trainer import checkpoint
from trainer.engine import NonFiniteError
from trainer.pretrain import main
from trainer.runs import RunFolderError

from .launch_utils import TINY


def pretrain(out, *extra):
    return main(["--config", "configs/etth1_cpu.yaml", *TINY, "train.max_steps=4", "ckpt.every=2", "ckpt.keep=0",
                 f"ckpt.dir={out}", "log.tensorboard=false", *extra])


def finite(folder) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in load_file(str(folder / "model.safetensors")).values())


# ----------------------------------------------------------------------------- 1. non-finite training

def test_divergence_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteError, match=r"non-finite .* at step 3; stopped, .*last good checkpoint is .*step_00000002"):
        pretrain(tmp_path, "optim.lr=1e6", "train.max_steps=8")
    ck = tmp_path / "checkpoints"
    assert checkpoint.latest_tag(ck) == "step_00000002"  # nothing after the divergence was saved
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000002"] and finite(ck / "step_00000002")
    assert not (tmp_path / "summary.json").exists()


def nan_on(monkeypatch, calls):
    """Make SimMTM's loss NaN on the given forward calls (0-based), leaving every other call as is."""
    forward, seen = SimMTM.forward, {"n": 0}

    def patched(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training and seen["n"] in calls:
            out["loss"] = out["loss"] * float("nan")
        seen["n"] += self.training
        return out

    monkeypatch.setattr(SimMTM, "forward", patched)


def test_skip_step_skips_counts_and_finishes_finite(tmp_path, monkeypatch):
    nan_on(monkeypatch, {1, 4})
    s = pretrain(tmp_path, "train.on_nonfinite=skip_step", "train.max_steps=6")
    assert s["nonfinite_skipped"] == 2 and s["steps"] == 6
    assert all(h["loss"] == h["loss"] for h in s["history"])  # the logged losses are the applied steps'
    assert finite(tmp_path / "checkpoints" / "step_00000006")


def test_skip_step_stops_after_too_many_in_a_row(tmp_path, monkeypatch):
    nan_on(monkeypatch, {2, 3, 4})
    with pytest.raises(NonFiniteError, match="at step 3, 3 skipped updates in a row"):
        pretrain(tmp_path, "train.on_nonfinite=skip_step", "train.max_nonfinite_in_row=3", "train.max_steps=8")
    assert checkpoint.latest_tag(tmp_path / "checkpoints") == "step_00000002"


def test_checkpoint_save_refuses_non_finite_weights(tmp_path):
    from trainer.config import load_config
    from trainer.engine import build_engine

    cfg = load_config(None, [*TINY])
    model = SimMTM(cfg.model)
    engine, _ = build_engine(model, cfg, torch.device("cpu"), 10)
    with torch.no_grad():
        next(model.parameters())[0] = float("inf")
    with pytest.raises(NonFiniteError, match="not saved"):
        checkpoint.save(engine, tmp_path, 1, {}, {"step": 1}, keep=0)
    assert checkpoint.latest_tag(tmp_path) is None


# ----------------------------------------------------------------------------- 2. run folders

def test_a_new_run_into_a_used_folder_is_refused(tmp_path):
    pretrain(tmp_path)
    ck = tmp_path / "checkpoints"
    before = ((ck / "latest").read_text(), (tmp_path / "summary.json").read_text())
    with pytest.raises(RunFolderError, match=r"already holds another run .*ckpt.resume=auto.*ckpt.overwrite=true"):
        pretrain(tmp_path, "train.max_steps=2")
    assert ((ck / "latest").read_text(), (tmp_path / "summary.json").read_text()) == before

    s = pretrain(tmp_path, "train.max_steps=2", "ckpt.overwrite=true")  # explicit: start over
    assert s["steps"] == 2 and sorted(p.name for p in ck.glob("step_*")) == ["step_00000002"]


def test_resumed_tensorboard_continues_without_duplicate_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pretrain(tmp_path, "log.tensorboard=true")
    ck = tmp_path / "checkpoints"  # as if killed after logging steps 3-4, before saving step 4
    shutil.rmtree(ck / "step_00000004")
    (ck / "latest").write_text("step_00000002")
    pretrain(tmp_path, "log.tensorboard=true", "ckpt.resume=auto")
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss/total")] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- 3. rollback

def test_rollback_starts_a_branch_and_keeps_the_abandoned_checkpoints(tmp_path):
    straight = pretrain(tmp_path / "a", "train.max_steps=6")
    ck = tmp_path / "a" / "checkpoints"
    abandoned = (ck / "step_00000006" / checkpoint.COMPLETE).read_text()
    s = pretrain(tmp_path / "a", "train.max_steps=6", f"ckpt.resume={ck / 'step_00000004'}")
    assert s["steps"] == 6 and checkpoint.latest_tag(ck) == "step_00000006"
    assert [h["step"] for h in s["history"]] == [1, 2, 3, 4, 5, 6]
    assert s["parameter_digests"] == straight["parameter_digests"]  # the same steps again, exactly
    aside = list((ck / "abandoned").glob("*_after_step_00000004/step_00000006"))
    assert len(aside) == 1 and (aside[0] / checkpoint.COMPLETE).read_text() == abandoned


# ----------------------------------------------------------------------------- 4. provenance

def test_a_setting_that_cannot_change_on_resume_is_refused_by_name(tmp_path):
    pretrain(tmp_path)
    with pytest.raises(RunFolderError, match=r"optim.lr: 0.001 in the checkpoint, 0.5 now"):
        pretrain(tmp_path, "optim.lr=0.5", "train.max_steps=6", "ckpt.resume=auto")


def test_applied_changes_are_recorded_with_their_step(tmp_path):
    pretrain(tmp_path)
    s = pretrain(tmp_path, "train.max_steps=6", "train.log_every=2", "ckpt.resume=auto")
    want = [{"key": "train.log_every", "from": 1, "to": 2, "step": 4},
            {"key": "train.max_steps", "from": 4, "to": 6, "step": 4}]
    assert s["config_changes"] == want
    state = json.loads((tmp_path / "checkpoints" / "step_00000006" / checkpoint.STATE).read_text())
    assert state["config_changes"] == want and state["config"]["train"]["max_steps"] == 6


# ----------------------------------------------------------------------------- 6. checkpoint files

def test_a_file_missing_from_a_complete_checkpoint_is_named(tmp_path):
    pretrain(tmp_path)
    gone = tmp_path / "checkpoints" / "step_00000004" / "optimizer.pt"
    gone.unlink()
    with pytest.raises(checkpoint.CheckpointError, match=f"{gone}: missing"):
        pretrain(tmp_path, "train.max_steps=6", "ckpt.resume=auto")


def test_weights_only_intermediate_checkpoints(tmp_path, monkeypatch):
    """ckpt.save_optimizer_every=2 with every=1: the optimizer state only at even steps and at the end;
    rotation always keeps the newest checkpoint training can continue from, whatever ckpt.keep."""
    from trainer.publish import publish

    straight = pretrain(tmp_path / "a", "ckpt.every=1", "ckpt.save_optimizer_every=2")
    ck = tmp_path / "a" / "checkpoints"
    wo = ck / "step_00000001"
    assert [(ck / checkpoint.tag_for(i) / "optimizer.pt").exists() for i in (1, 2, 3, 4)] == [False, True, False, True]
    shutil.rmtree(ck / "step_00000004")  # as if killed before the final save: `latest` is weights-only
    (ck / "latest").write_text("step_00000003")
    again = pretrain(tmp_path / "a", "ckpt.every=1", "ckpt.save_optimizer_every=2", "ckpt.resume=auto")
    assert again["parameter_digests"] == straight["parameter_digests"]  # continued from step 2, exactly
    assert list((ck / "abandoned").glob("*_after_step_00000002/step_00000003"))
    assert finite(wo) and (wo / "model.safetensors").stat().st_size < (ck / "step_00000002" / "optimizer.pt").stat().st_size
    with pytest.raises(checkpoint.CheckpointError, match="holds weights only"):
        pretrain(tmp_path / "c", f"ckpt.resume={wo}")
    publish(wo, str(tmp_path / "pub"))  # evaluation and publishing read it
    assert finite(tmp_path / "pub")

    listings, save = [], checkpoint.save

    def recording(engine, ckpt_dir, *args, **kwargs):
        folder = save(engine, ckpt_dir, *args, **kwargs)
        listings.append(sorted(p.name for p in folder.parent.glob("step_*")))
        return folder

    monkeypatch.setattr(checkpoint, "save", recording)
    pretrain(tmp_path / "b", "ckpt.every=1", "ckpt.keep=1", "ckpt.save_optimizer_every=2", "train.max_steps=4")
    assert listings == [["step_00000001"], ["step_00000002"], ["step_00000002", "step_00000003"], ["step_00000004"]]


# ----------------------------------------------------------------------------- 9. the logged rate

def test_both_engines_apply_and_log_the_same_learning_rates(tmp_path):
    """DeepSpeed's own WarmupCosineLR applied its first rate for two updates (0, 0, 1/3, 2/3 with a
    3-step warm-up, the plain engine 0, 1/3, 2/3): both now run the same schedule."""
    from .launch_utils import pretrain_cmd, run, summary

    rates = {}
    for engine in ("false", "true"):
        run(pretrain_cmd("optim.warmup_steps=3", "train.max_steps=5", f"dist.deepspeed={engine}",
                         f"ckpt.dir={tmp_path / engine}", "log.tensorboard=false"))
        rates[engine] = [h["lr"] for h in summary(tmp_path / engine)["history"]]
    assert rates["false"] == rates["true"] == pytest.approx([0.0, 1e-3 / 3, 2e-3 / 3, 0.5e-3, 0.0])


def test_rollback_moves_the_mirrors_latest_too(tmp_path, s3):  # noqa: F811
    """With ckpt.remote, resume=auto after a crash reads the mirror when it is newer: a rollback must
    point the mirror's `latest` back as well, or the abandoned timeline would come back from S3."""
    from trainer import runs

    remote = f"s3://{s3['new_bucket']('rollback')}/run"
    pretrain(tmp_path, "train.max_steps=6", f"ckpt.remote={remote}",
             f"ckpt.storage_options={json.dumps(s3['storage_options'])}")
    runs.branch(tmp_path / "checkpoints", "step_00000004", remote, s3["storage_options"])
    bucket, prefix = remote[5:].split("/", 1)
    assert s3["client"].get_object(Bucket=bucket, Key=f"{prefix}/latest")["Body"].read().decode() == "step_00000004"
