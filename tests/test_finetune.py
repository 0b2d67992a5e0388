"""Fine-tuning: tiny end-to-end runs from a just-published checkpoint, label fractions, validation-only
selection, linear probe, input-length errors."""
import json
import math

import numpy as np
import pytest
import torch

from models.config import SimMTMConfig
from trainer.config import load_config
from trainer.finetune import FinetuneConfig, Split, finetune, label_subset

from trainer.config import REPO_ROOT

from .launch_utils import pretrain_cmd, run

GESTURE = REPO_ROOT.parent / "shared" / "data" / "classification" / "Gesture"  # the shared copy tests read

TINY_FT = ["train.epochs=1", "task.val_stride=16", "data.window_stride=64", "task.eval_batch_size=256",
           "train.batch_size=8", "train.num_threads=1"]
TINY_MODEL = SimMTMConfig(seq_len=48, d_model=8, n_heads=2, e_layers=1, d_ff=16, proj_dim=16, dropout=0.0)


pytestmark = pytest.mark.usefixtures("restore_env")  # tests/conftest.py


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    out = tmp_path_factory.mktemp("pt")
    run(pretrain_cmd("train.max_steps=2", f"ckpt.dir={out}", f"ckpt.publish={out / 'published'}"))
    return out / "published"


def cfg_of(*overrides) -> FinetuneConfig:
    return load_config(None, list(overrides), cls=FinetuneConfig)


def test_forecast_end_to_end_from_published(published, tmp_path):
    r = finetune(cfg_of(f"init={published}", "task.horizon=24", f"out={tmp_path}", *TINY_FT))
    assert r["seq_len"] == 48 and r["horizon"] == 24
    assert r["n_test"] == 2880 - 24 + 1  # the whole test split, stride 1: rows 11520-48 .. 14400
    assert math.isfinite(r["mse"]) and math.isfinite(r["mae"]) and r["accuracy"] is None
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["mse"] == pytest.approx(r["mse"]) and saved["config"]["init"] == str(published)


def test_classify_end_to_end_from_published(published, tmp_path):
    r = finetune(cfg_of(f"init={published}", "task.kind=classify", "task.fit_length=interpolate",
                        f"data.source={GESTURE}", *TINY_FT))
    assert r["n_train"] == 320 and r["n_test"] == 120 and r["num_classes"] == 8
    assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["macro_f1"] <= 1.0 and 0.0 <= r["auroc"] <= 1.0
    assert r["mse"] is None


def test_input_length_mismatch_names_both_numbers(published):
    with pytest.raises(ValueError, match=r"206.*seq_len 48"):
        finetune(cfg_of(f"init={published}", "task.kind=classify",
                        f"data.source={GESTURE}", *TINY_FT))


def test_label_fraction_respected_and_reproducible():
    a, b = label_subset(1000, 0.1, seed=3), label_subset(1000, 0.1, seed=3)
    assert len(a) == 100 and np.array_equal(a, b) and len(np.unique(a)) == 100
    assert not np.array_equal(a, label_subset(1000, 0.1, seed=4))
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    s = label_subset(len(labels), 0.1, seed=0, labels=labels)
    assert [int((labels[s] == c).sum()) for c in range(4)] == [5, 3, 2, 1]  # ceil per class, none lost
    assert np.array_equal(label_subset(10, 1.0, 0), np.arange(10))


def _synthetic(seed: int, n: int, horizon: int = 8) -> Split:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(48 + horizon, dtype=torch.float32)
    phase = torch.rand(n, 2, 1, generator=g) * 6.28
    w = torch.sin(t / 4 + phase) + 0.3 * torch.randn(n, 2, 48 + horizon, generator=g)
    return Split(w[..., :48].contiguous(), w[..., 48:].contiguous())


def _fit(test: Split, *overrides):
    data = {"train": _synthetic(0, 64), "val": _synthetic(1, 32), "test": test}
    cfg = load_config(None, ["task.horizon=8", "train.epochs=4", "task.patience=4", "train.batch_size=16",
                             "optim.lr=3e-3", "train.num_threads=1", *overrides], cls=FinetuneConfig)
    cfg.model = TINY_MODEL
    return finetune(cfg, data=data)


def test_label_fraction_in_training():
    r = _fit(_synthetic(2, 16), "task.label_fraction=0.25", "train.epochs=1")
    assert r["n_train"] == 16


def test_selection_uses_validation_only():
    """Same train/val, very different test sets: the selected epoch, the validation history and the
    selected weights must not change. If test data steered selection, they would differ."""
    a = _fit(_synthetic(2, 16))
    flipped = _synthetic(2, 16)
    b = _fit(Split(flipped.x, -3.0 * flipped.y + 5.0))  # a test set that prefers other weights
    assert a["best_epoch"] == b["best_epoch"] and a["epochs_run"] == b["epochs_run"] == 4
    assert [h["val_mse"] for h in a["history"]] == [h["val_mse"] for h in b["history"]]
    sa, sb = a["_model"].state_dict(), b["_model"].state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["mse"] != b["mse"]
    best = min(range(4), key=lambda e: a["history"][e]["val_mse"])
    assert a["best_epoch"] == best


def test_linear_probe_leaves_encoder_unchanged():
    torch.manual_seed(2023)
    from models import Encoder
    ref = {k: v.clone() for k, v in Encoder(TINY_MODEL).state_dict().items()}  # what init=random builds
    r = _fit(_synthetic(2, 16), "task.mode=linear_probe", "train.epochs=2")
    model = r["_model"]
    assert all(torch.equal(model.encoder.state_dict()[k], ref[k]) for k in ref)
    assert r["steps"] > 0
    torch.manual_seed(2024)
    full = _fit(_synthetic(2, 16), "train.epochs=1", "task.head_warmup_epochs=0")["_model"]
    assert not all(torch.equal(full.encoder.state_dict()[k], ref[k]) for k in ref)


def test_head_warmup_keeps_encoder_then_trains_it(monkeypatch):
    """LP-FT: during the head warm-up the encoder's rate is exactly 0 (weights bitwise unchanged) while
    the head learns; after it the encoder trains too. Snapshots are taken at each epoch's validation."""
    from models import Encoder
    import trainer.finetune as ftm
    torch.manual_seed(2023)
    ref = {k: v.clone() for k, v in Encoder(TINY_MODEL).state_dict().items()}
    snaps, real = [], ftm.evaluate

    def spy(model, split, *a, **k):
        if split is not None and len(snaps) < 2:
            snaps.append(({k: v.clone() for k, v in model.encoder.state_dict().items()},
                          {k: v.clone() for k, v in model.head.state_dict().items()}))
        return real(model, split, *a, **k)
    monkeypatch.setattr(ftm, "evaluate", spy)
    _fit(_synthetic(2, 16), "train.epochs=2", "task.head_warmup_epochs=1", "task.patience=5")
    (enc0, head0), (enc1, head1) = snaps[0], snaps[1]
    assert all(torch.equal(enc0[k], ref[k]) for k in ref)  # epoch 0: encoder untouched
    assert not all(torch.equal(enc1[k], ref[k]) for k in ref)  # epoch 1: encoder trained
    assert not all(torch.equal(head0[k], head1[k]) for k in head0)


def test_lr_schedule_per_step():
    from trainer.config import OptimConfig
    from trainer.engine import warmup_cosine
    from trainer.finetune import TaskConfig, lr_schedule

    opt = OptimConfig(lr=1e-4, warmup_steps=2, min_lr_ratio=0.1)
    (enc, head), join = lr_schedule(TaskConfig(head_warmup_epochs=2, encoder_lr_mult=0.5), opt, 5, 30)
    assert join == 10
    assert [enc(s) for s in range(10)] == [0.0] * 10  # linear probe phase
    assert [head(s) for s in range(30)] == [warmup_cosine(s, 30, 2, 0.1) for s in range(30)]
    assert [enc(s) for s in range(10, 30)] == [warmup_cosine(s - 10, 20, 2, 0.1) for s in range(10, 30)]
    assert enc(10) == 0.0 and enc(11) == 0.5 and 0.99 < enc(12) <= 1.0  # the encoder's own warm-up restarts
    # the authors' schedule as their code runs: epoch 0 at lr/25, then lr halving per epoch
    (enc, head), join = lr_schedule(TaskConfig(schedule="authors", head_warmup_epochs=0), opt, 4, 40)
    want = [1 / 25, 1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625]
    assert join == 0 and [head(4 * e + i) for e in range(10) for i in range(4)] == [w for w in want for _ in range(4)]
    assert [enc(s) for s in range(40)] == [head(s) for s in range(40)]
    (enc, head), _ = lr_schedule(TaskConfig(mode="linear_probe"), opt, 4, 40)
    assert all(enc(s) == 0.0 for s in range(40)) and head(5) > 0
    # a run too short for both phases fine-tunes fully; the authors' schedule has no head phase
    assert lr_schedule(TaskConfig(head_warmup_epochs=2), opt, 5, 10)[1] == 0
    assert lr_schedule(TaskConfig(schedule="authors", head_warmup_epochs=2), opt, 5, 40)[1] == 0


def test_engine_applies_group_rates():
    """The optimizer really runs the encoder at encoder_lr_mult x lr with the per-group multipliers."""
    from trainer.finetune import FinetuneConfig
    from trainer.engine import build_engine
    from trainer.config import load_config
    from models import Encoder
    from models.heads import Forecaster

    cfg = load_config(None, ["optim.lr=0.01", "optim.warmup_steps=1"], cls=FinetuneConfig)
    model = Forecaster(Encoder(TINY_MODEL), 4)
    groups = [{"params": list(model.encoder.parameters()), "lr": 0.01 * 0.3},
              {"params": list(model.head.parameters()), "lr": 0.01}]
    eng, _ = build_engine(model, cfg, torch.device("cpu"), 10, param_groups=groups,
                          lr_lambda=[lambda s: 0.0 if s < 2 else 1.0, lambda s: 1.0])
    seen = []
    for _ in range(4):
        seen.append(eng.get_lr())
        eng.backward(model(torch.randn(2, 1, 48)).pow(2).mean())
        eng.step()
    assert seen == [[0.0, 0.01], [0.0, 0.01], [0.003, 0.01], [0.003, 0.01]]


def _ucr_uea(tmp_path):
    """Tiny UCR (.tsv, univariate) and UEA (.ts, 2 channels, string classes) sets, 48 points."""
    rng = np.random.default_rng(0)
    ucr, uea = tmp_path / "ucr", tmp_path / "uea"
    ucr.mkdir()
    uea.mkdir()
    for split, n in (("TRAIN", 24), ("TEST", 12)):
        y = np.arange(n) % 2
        x = rng.normal(size=(n, 48)) + y[:, None] * np.sin(np.arange(48) / 3)
        np.savetxt(ucr / f"Toy_{split}.tsv", np.column_stack([y + 1, x]), delimiter="\t")
        rows = [":".join(",".join(f"{v:.5f}" for v in x[i] * s) for s in (1, -1)) + (":up" if y[i] else ":down")
                for i in range(n)]
        (uea / f"Toy_{split}.ts").write_text("@problemName Toy\n@timeStamps false\n@univariate false\n"
                                             "@classLabel true down up\n@data\n" + "\n".join(rows) + "\n")
    return ucr, uea


def test_classify_ucr_tsv_and_uea_ts_folders(tmp_path):
    ucr, uea = _ucr_uea(tmp_path)
    arch = ["model.seq_len=48", "model.d_model=8", "model.n_heads=2", "model.e_layers=1", "model.d_ff=16"]
    for root, channels in ((ucr, 1), (uea, 2)):
        r = finetune(cfg_of("init=random", "task.kind=classify", f"data.source={root}", *arch, *TINY_FT))
        assert r["num_classes"] == 2 and r["n_test"] == 12 and r["n_train"] + r["n_val"] == 24, r
        assert 0.0 <= r["accuracy"] <= 1.0


def test_linear_probe_under_deepspeed_zero2(tmp_path):
    """A frozen encoder contributes no optimizer group: ZeRO partitions only trainable groups and
    fails on an empty one. The probe must run under DeepSpeed ZeRO-2 and leave the encoder untouched."""
    from models import Encoder
    torch.manual_seed(2023)
    ref = {k: v.clone() for k, v in Encoder(TINY_MODEL).state_dict().items()}
    r = _fit(_synthetic(2, 16), "task.mode=linear_probe", "train.epochs=1", "dist.deepspeed=true",
             "dist.zero_stage=2")
    assert r["engine"] == "deepspeed" and r["steps"] > 0
    enc = r["_model"].encoder.state_dict()
    assert all(torch.equal(enc[k], ref[k]) for k in ref)
