"""Fine-tuning: tiny end-to-end runs from a just-published checkpoint, label fractions, validation-only
selection, linear probe, input-length errors."""
import json
import math
import os

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


@pytest.fixture(autouse=True)
def _restore_env():
    """finetune() exports RANK/WORLD_SIZE (as pre-training does); keep other tests' environment clean."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


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
    full = _fit(_synthetic(2, 16), "train.epochs=1")["_model"]
    assert not all(torch.equal(full.encoder.state_dict()[k], ref[k]) for k in ref)


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
