"""Issue 12, fine-tuning and published weights: the non-finite guard (stop / skip_step, plain and
DeepSpeed engines), published folders refused when their weights are non-finite or unverifiable,
progress output, the true mean train loss, the rates both engines log, and how the README caps a run."""
import json
import re

import pytest
import torch

import trainer.finetune as ftm
import trainer.publish as publish_mod
from models import SimMTM, load_pretrained, load_simmtm
from models.hub import load_state, save_pretrained
from trainer.checkpoint import CheckpointError
from trainer.config import REPO_ROOT, load_config
from trainer.engine import NonFiniteError
from trainer.finetune import FinetuneConfig, Split, finetune, lr_schedule

from .test_finetune import TINY_MODEL, _synthetic

pytestmark = pytest.mark.usefixtures("restore_env")  # tests/conftest.py

ENGINES = {"torch": [], "deepspeed": ["dist.deepspeed=true"],
           "zero2": ["dist.deepspeed=true", "dist.zero_stage=2"]}


def cfg_of(*overrides) -> FinetuneConfig:
    """64 training windows in batches of 16: 4 steps per epoch."""
    cfg = load_config(None, ["task.horizon=8", "train.epochs=2", "task.patience=4", "train.batch_size=16",
                             "optim.lr=3e-3", "train.num_threads=1", "train.progress=false", *overrides],
                      cls=FinetuneConfig)
    cfg.model = TINY_MODEL
    return cfg


def fit(*overrides, train: Split = None) -> dict:
    data = {"train": train or _synthetic(0, 64), "val": _synthetic(1, 32), "test": _synthetic(2, 16)}
    return finetune(cfg_of(*overrides), data=data)


def with_nan(items) -> Split:
    s = _synthetic(0, 64)
    x = s.x.clone()
    x[list(items), 0, 5] = float("nan")
    return Split(x, s.y)


def inf_gradients_at(monkeypatch, updates: set):
    """The head's first tensor gets an inf gradient in the given backward passes (1-based): a finite
    loss with a non-finite gradient norm."""
    real, seen = ftm.build_model, {"n": 0}

    def hook(g):
        seen["n"] += 1
        return torch.full_like(g, float("inf")) if seen["n"] in updates else g

    def build(cfg, num_classes=0):
        model, arch = real(cfg, num_classes)
        next(model.head.parameters()).register_hook(hook)
        return model, arch
    monkeypatch.setattr(ftm, "build_model", build)


def all_finite(model) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point())


# ----------------------------------------------------------------------------- 1. non-finite guard

@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_nonfinite_loss_stops_naming_the_step_and_saves_nothing(tmp_path, engine):
    with pytest.raises(NonFiniteError, match=r"non-finite loss at fine-tuning step 1 \(epoch 0\); stopped, "
                                             r"nothing saved.*on_nonfinite=skip_step"):
        fit(f"out={tmp_path}", *ENGINES[engine], train=with_nan(range(64)))
    assert not (tmp_path / "result.json").exists()


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_nonfinite_gradient_norm_stops(monkeypatch, engine):
    inf_gradients_at(monkeypatch, {2})
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm at fine-tuning step 2 \(epoch 0\)"):
        fit(*ENGINES[engine])


@pytest.mark.parametrize("engine", list(ENGINES))
def test_skip_step_drops_nonfinite_updates_and_counts_them(monkeypatch, engine):
    """Two inf-gradient updates and two NaN-loss batches (one NaN window, seen once per epoch): all
    four dropped, the run finishes with finite weights, and the train loss averages the good steps."""
    inf_gradients_at(monkeypatch, {2, 3})
    r = fit("train.on_nonfinite=skip_step", *ENGINES[engine], train=with_nan([7]))
    assert all_finite(r["_model"]) and r["mse"] is not None
    assert r["skipped_steps"] == 4 and r["steps"] == 8
    assert all(h["train_loss"] == h["train_loss"] for h in r["history"])  # not NaN


@pytest.mark.parametrize("engine", list(ENGINES))
def test_skipped_updates_leave_the_weights_untouched(monkeypatch, engine):
    """Every gradient inf: every update dropped, on every engine, so the weights are the initial ones."""
    initial = ftm.build_model(cfg_of())[0].state_dict()
    inf_gradients_at(monkeypatch, set(range(1, 100)))
    r = fit("train.on_nonfinite=skip_step", "train.max_nonfinite_in_row=100", "train.epochs=1", *ENGINES[engine])
    assert all(torch.equal(v, initial[k]) for k, v in r["_model"].state_dict().items())
    assert r["skipped_steps"] == r["steps"] == 4


@pytest.mark.parametrize("what", ["loss", "gradient norm"])
def test_skip_step_stops_after_max_in_row(monkeypatch, what):
    if what == "gradient norm":
        inf_gradients_at(monkeypatch, set(range(1, 100)))
    train = with_nan(range(64)) if what == "loss" else None
    with pytest.raises(NonFiniteError, match=rf"non-finite {what} at fine-tuning step 3 \(epoch 0\), 3 skipped "
                                             r"updates in a row \(train.max_nonfinite_in_row=3\)"):
        fit("train.on_nonfinite=skip_step", "train.max_nonfinite_in_row=3", train=train)


def test_diverged_validation_is_never_selected(monkeypatch):
    """Weights whose validation score is NaN are never kept as the best: with no finite epoch the run
    stops instead of evaluating (and saving) them."""
    real = ftm.evaluate

    def nan_val(model, split, *a, **k):
        m = real(model, split, *a, **k)
        return {**m, "mse": float("nan"), "loss": float("nan")} if len(split.x) == 32 else m
    monkeypatch.setattr(ftm, "evaluate", nan_val)
    with pytest.raises(NonFiniteError, match="no epoch of 2 ended with a finite validation score"):
        fit()


# ----------------------------------------------------------------------------- 2, 3. published weights

def _published(tmp_path, nan: bool = False):
    """A folder save_pretrained wrote (digest recorded); `nan`: one encoder weight is NaN."""
    torch.manual_seed(0)
    model = SimMTM(TINY_MODEL)
    name, p = next(model.encoder.named_parameters())
    if nan:
        with torch.no_grad():
            p.view(-1)[0] = float("nan")
    save_pretrained(model, str(tmp_path / "pub"))
    return tmp_path / "pub", f"encoder.{name}"


def test_publish_refuses_nonfinite_weights(pretrained_run, tmp_path, monkeypatch):
    real = publish_mod.consolidated_state

    def poisoned(*a):
        sd = real(*a)
        sd[key] = sd[key].clone()
        sd[key].view(-1)[0] = float("inf")
        return sd
    key = "encoder.norm.weight"
    monkeypatch.setattr(publish_mod, "consolidated_state", poisoned)
    with pytest.raises(CheckpointError, match=rf"step_00000002: tensor {re.escape(key)} holds NaN or inf.*"
                                              r"refusing to publish"):
        publish_mod.publish(pretrained_run, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_loading_refuses_nonfinite_weights(tmp_path):
    folder, name = _published(tmp_path, nan=True)
    for load in (load_pretrained, load_simmtm, load_state):
        with pytest.raises(ValueError, match=rf"{re.escape(str(folder))}: tensor {re.escape(name)} .*NaN or inf"):
            load(str(folder))


def test_folder_without_digest_loads_only_with_opt_in(tmp_path):
    folder, _ = _published(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["weights_sha256"]
    (folder / "config.json").write_text(json.dumps(cfg))
    for load in (load_pretrained, load_simmtm, load_state):
        with pytest.raises(ValueError, match=rf"{re.escape(str(folder))}: .*no weights_sha256.*allow_unverified=True"):
            load(str(folder))
    x = torch.randn(2, TINY_MODEL.seq_len)
    assert torch.equal(load_pretrained(str(folder), allow_unverified=True)(x),
                       load_simmtm(str(folder), allow_unverified=True).encoder(x))
    assert "weights_sha256" in json.loads((REPO_ROOT / "checkpoints/simmtm-foundation/config.json").read_text())
    load_state("simmtm-foundation")  # the bundled model keeps loading by default


# ----------------------------------------------------------------------------- 4-7. steering a run

def test_progress_bars_for_training_and_evaluation(capsys):
    fit("train.progress=true", "train.epochs=1")
    err = capsys.readouterr().err
    assert "fine-tune" in err and "val (epoch 0)" in err and "test" in err and "batch" in err
    fit("train.progress=false", "train.epochs=1")
    assert "batch" not in capsys.readouterr().err


def test_train_loss_is_the_mean_of_the_steps_run(monkeypatch):
    """train.max_steps=3 stops inside a 4-step epoch: the logged loss is the mean of those 3."""
    seen, real = [], ftm.F.mse_loss

    def spy(*a, **k):
        loss = real(*a, **k)
        seen.append(float(loss.detach()))
        return loss
    monkeypatch.setattr(ftm.F, "mse_loss", spy)
    r = fit("train.max_steps=3")
    assert r["steps"] == 3 and len(seen) == 3
    assert r["history"][0]["train_loss"] == pytest.approx(sum(seen) / 3, rel=1e-6)


def test_both_engines_log_the_rates_each_update_used():
    """Per epoch, the rates the epoch's last update ran with: the same under both engines, and those of
    the schedule at that update (warm-up over 3 steps; the encoder joins after one head-only epoch)."""
    ov = ["optim.warmup_steps=3", "task.head_warmup_epochs=1", "train.epochs=3", "task.patience=5"]
    runs = [fit(*ov, *ENGINES[e]) for e in ("torch", "deepspeed")]
    logged = [[r for h in run["history"] for r in (h["lr_encoder"], h["lr_head"])] for run in runs]
    assert logged[0] == logged[1]
    cfg = cfg_of(*ov)
    (enc, head), join = lr_schedule(cfg.task, cfg.optim, 4, 12)
    lr = cfg.optim.lr
    want = [r for s in (3, 7, 11) for r in (lr * cfg.task.encoder_lr_mult * enc(s), lr * head(s))]
    assert join == 4 and want[2] > 0 and logged[0] == pytest.approx(want)


def test_readme_says_how_to_cap_a_finetuning_run():
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("## Fine-tune and evaluate"):]
    section = section[:section.index("\n## ", 3)]
    for key in ("train.max_steps", "train.epochs", "task.evaluate_test=false"):
        assert key in section, key
