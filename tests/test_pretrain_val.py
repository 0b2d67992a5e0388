"""Validation during pre-training, the best checkpoint, the authors' per-epoch cosine and the
constraint loss's reference values (tiny model on the bundled ETTh1, real processes, CPU)."""
import json
import math
import re
import subprocess
import sys

import pytest
import torch

from trainer.config import REPO_ROOT
from trainer.engine import epoch_cosine

from .launch_utils import clean_env, pretrain_cmd, run, summary

STEPS, VAL_EVERY = 8, 2
# lr 0.3: a schedule that overshoots, so the lowest validation loss is not the last one (step 2 here)
VAL = ["model.dropout=0.1", f"train.max_steps={STEPS}", "optim.lr=0.3", "optim.warmup_steps=1", "ckpt.every=1",
       "ckpt.keep=1", "train.val_batches=2"]
LOSS_KEYS = ("loss", "loss_rec", "loss_cl")


def train_losses(s):
    return {h["step"]: tuple(h[k] for k in LOSS_KEYS) for h in s["history"]}


@pytest.fixture(scope="module")
def val_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("val")
    proc = run(pretrain_cmd(*VAL, f"train.val_every={VAL_EVERY}", f"ckpt.dir={out}", f"ckpt.publish={out / 'pub'}"))
    return out, proc


def test_validation_is_recorded_logged_and_printed(val_run):
    out, proc = val_run
    s = summary(out)
    vals = [h for h in s["history"] if "val_loss" in h]
    assert [h["step"] for h in vals] == list(range(VAL_EVERY, STEPS + 1, VAL_EVERY))
    assert all(math.isfinite(h[k]) for h in vals for k in ("val_loss", "val_loss_rec", "val_loss_cl"))
    assert re.search(r"step 2/8 .* \| val \d+\.\d+ rec \d+\.\d+ cl \d+\.\d+", proc.stdout)
    assert "validation loss" in proc.stdout and "best checkpoint" in proc.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tb"))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    assert {"val/loss", "val/reconstruction", "val/constraint", "loss/constraint_formed"} <= set(tags)
    assert [e.step for e in ea.Scalars("val/loss")] == [h["step"] for h in vals]


def test_best_pointer_names_lowest_val_loss_and_survives_rotation(val_run):
    out, _ = val_run
    s = summary(out)
    vals = [h for h in s["history"] if "val_loss" in h]
    lowest = min(vals, key=lambda h: h["val_loss"])
    ck = out / "checkpoints"
    best = (ck / "best").read_text()
    assert best == f"step_{lowest['step']:08d}" and s["best"]["val_loss"] == lowest["val_loss"]
    assert lowest["step"] < STEPS, "the test needs a best that is not the last checkpoint"
    # keep=1: the newest checkpoint, plus the best one, which rotation never deletes
    assert sorted(p.name for p in ck.glob("step_*")) == sorted({best, f"step_{STEPS:08d}"})
    assert (ck / best / "COMPLETE").exists() and (ck / "latest").read_text() == f"step_{STEPS:08d}"
    assert json.loads((ck / best / "state.json").read_text())["best"]["tag"] == best


def test_publish_picks_best(val_run, tmp_path):
    out, proc = val_run
    s = summary(out)
    m = json.loads((out / "pub" / "metrics.json").read_text())  # published at the end of the run
    assert m["selected"] == "best" and m["steps"] == s["best"]["step"] and m["val_loss"] == s["best"]["val_loss"]
    assert f"step {s['best']['step']}, val loss {s['best']['val_loss']:.4f}" in (out / "pub" / "README.md").read_text()
    assert s["published_from"]["selected"] == "best"
    cli = [sys.executable, "trainer/publish.py", str(out)]
    p = subprocess.run([*cli, str(tmp_path / "b")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["steps"] == s["best"]["step"]
    p = subprocess.run([*cli, str(tmp_path / "l"), "--last"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    last = json.loads((tmp_path / "l" / "metrics.json").read_text())
    assert last["steps"] == STEPS and last["selected"] == "last"


def test_validation_leaves_training_bitwise_unchanged(val_run, tmp_path):
    """Dropout on, the plain engine: validation must not consume or move any training RNG stream."""
    out, _ = val_run
    run(pretrain_cmd(*VAL, f"ckpt.dir={tmp_path}", "log.tensorboard=false"))
    plain, with_val = summary(tmp_path), summary(out)
    assert "val_loss" not in json.dumps(plain["history"])
    a, b = train_losses(plain), train_losses(with_val)
    assert set(a) <= set(b) and all(a[k] == b[k] for k in a)
    assert plain["parameter_digests"] == with_val["parameter_digests"]


def test_resume_auto_continues_with_the_same_best(val_run, tmp_path):
    out, _ = val_run
    cmd = pretrain_cmd(*VAL, f"train.val_every={VAL_EVERY}", f"ckpt.dir={tmp_path}", "log.tensorboard=false")
    crashed = subprocess.run(cmd, cwd=REPO_ROOT, env=clean_env(SIMMTM_CRASH_DURING_SAVE="step_00000006"),
                             capture_output=True, text=True, timeout=300)
    assert crashed.returncode != 0
    ck = tmp_path / "checkpoints"
    assert (ck / "latest").read_text() == "step_00000005"
    best_before = (ck / "best").read_text()
    proc = run([*cmd, "ckpt.resume=auto"])
    assert f"best so far: {best_before}" in proc.stdout
    straight, resumed = summary(out), summary(tmp_path)
    assert [(h["step"], h.get("val_loss")) for h in resumed["history"]] == \
        [(h["step"], h.get("val_loss")) for h in straight["history"]]
    assert resumed["best"] == {**straight["best"]} and (ck / "best").read_text() == straight["best"]["tag"]
    assert resumed["parameter_digests"] == straight["parameter_digests"]


def test_summary_reports_constraint_bounds(val_run):
    out, proc = val_run
    s = summary(out)
    cl = s["constraint"]
    m, n = cl["num_views"], cl["num_series"]
    assert m == 3 and n == 4 * 7 * (m + 1)  # batch 4 windows x 7 channels x (M+1) rows, 1 rank
    assert cl["perfect"] == pytest.approx(m * math.log(m)) and cl["chance"] == pytest.approx(m * math.log(n - 1))
    for key, loss in (("first", cl["first"]), ("last", cl["last"]), ("val_last", cl["val_last"])):
        assert cl[f"{key}_formed"] == pytest.approx((cl["chance"] - loss) / (cl["chance"] - cl["perfect"]))
    assert f"perfect grouping {cl['perfect']:.2f}, chance {cl['chance']:.2f}" in proc.stdout


def test_constraint_loss_bounds_match_the_model_definition():
    from models.similarity import constraint_loss, mask_self, positive_index, similarity_logits
    from trainer.pretrain import constraint_bounds

    n0, m = 6, 3
    n = n0 * (m + 1)
    idx = torch.arange(n)
    pos = positive_index(n, n0, m, 0, "cpu")
    b = constraint_bounds(m, n)
    grouped = torch.eye(n0, dtype=torch.float64)[idx % n0]  # a group's M+1 rows identical, groups orthogonal
    loss = constraint_loss(mask_self(similarity_logits(grouped, grouped, 0.01), idx), pos)
    assert float(loss) == pytest.approx(b["perfect"], abs=1e-6)
    same = torch.ones(n, 4, dtype=torch.float64)  # all alike: chance
    loss = constraint_loss(mask_self(similarity_logits(same, same, 0.2), idx), pos)
    assert float(loss) == pytest.approx(b["chance"], rel=1e-12)


def test_summary_says_higher_when_a_loss_rises():
    from trainer.pretrain import _change

    assert _change(0.5, 1.0) == "(100.0% higher)" and _change(1.0, 0.25) == "(75.0% lower)"


def test_rotation_never_deletes_best(tmp_path):
    from trainer import checkpoint
    from trainer.config import load_config
    from trainer.engine import build_engine

    cfg = load_config(None, ["optim.warmup_steps=1"])
    engine, _ = build_engine(torch.nn.Linear(2, 2), cfg, torch.device("cpu"), 10)
    for step in range(1, 6):
        checkpoint.save(engine, tmp_path, step, {}, {"step": step}, keep=2, best=step == 2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000004", "step_00000005"]
    assert checkpoint.best_tag(tmp_path) == "step_00000002" and checkpoint.latest_tag(tmp_path) == "step_00000005"
    checkpoint.set_best(tmp_path, None)
    assert checkpoint.best_tag(tmp_path) is None


def _epoch_cosine_run(out, *extra):
    # stride 128, batch 16: 4 steps per epoch, so 10 steps cover 3 epochs
    proc = run(pretrain_cmd("optim.schedule=epoch_cosine", "optim.min_lr_ratio=0.1", "data.window_stride=128",
                            "train.batch_size=16", "train.max_steps=10", "log.tensorboard=false", f"ckpt.dir={out}",
                            *extra))
    spe = int(re.search(r"\((\d+)/epoch\)", proc.stdout).group(1))
    s = summary(out)
    assert len(s["history"]) == 10 and spe < 10
    epochs = math.ceil(10 / spe)
    for h in s["history"]:  # the rate step k (1-based) used: lambda(k - 1)
        assert h["lr"] == pytest.approx(1e-3 * epoch_cosine(h["step"] - 1, spe, epochs, 0.1), rel=1e-12, abs=0), h
    assert len({h["lr"] for h in s["history"]}) == epochs  # constant within an epoch
    return s, proc


def test_epoch_cosine_lr_plain_engine(tmp_path):
    _, proc = _epoch_cosine_run(tmp_path)
    assert "engine=torch" in proc.stdout


def test_epoch_cosine_lr_deepspeed_engine_with_validation(tmp_path):
    s, proc = _epoch_cosine_run(tmp_path, "dist.deepspeed=true", "train.val_every=5", "train.val_batches=1")
    assert "engine=deepspeed" in proc.stdout
    assert [h["step"] for h in s["history"] if "val_loss" in h] == [5, 10]
    assert (tmp_path / "checkpoints" / "best").exists()


def test_best_checkpoint_is_never_chosen_on_test_or_training_data(tmp_path):
    """train.val_split=test would select the published checkpoint on the test split; = data.split on the
    data it trains on. Both are refused with the key named, before any step."""
    for split in ("test", "train"):
        proc = subprocess.run(pretrain_cmd(*VAL, "train.val_every=2", f"train.val_split={split}",
                                           f"ckpt.dir={tmp_path / split}"),
                              cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "train.val_split" in proc.stderr and "held-back" in proc.stderr
        assert not (tmp_path / split / "checkpoints").exists()
