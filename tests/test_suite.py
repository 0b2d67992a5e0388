"""The foundation suite: every (set, horizon, regime, seed, init) fine-tuned in-process, records that
resume, the same budget for both inits, tables and targets computed from the records; bundled models
resolve by name; gzipped UCR folders read."""
import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from models import SimMTM
from models.config import SimMTMConfig
from models.hub import resolve, save_pretrained
from trainer.config import REPO_ROOT, load_config
from trainer.suite import SuiteConfig, markdown, run, summarise, targets

TINY = SimMTMConfig(seq_len=48, encoder="patch", patch_len=8, patch_stride=8, d_model=8, n_heads=2, e_layers=1,
                    d_ff=16, proj_dim=8, dropout=0.0)


pytestmark = pytest.mark.usefixtures("restore_env")  # tests/conftest.py


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    torch.manual_seed(0)
    save_pretrained(SimMTM(TINY), str(root / "published"))
    rng = np.random.default_rng(0)
    t = np.arange(600)
    cols = {f"c{i}": np.sin(t / (5 + i)) + 0.1 * rng.normal(size=600) for i in range(2)}
    lines = ["date," + ",".join(cols)] + [f"2020-01-01 {i % 24:02d}:00:00," + ",".join(f"{cols[c][i]:.5f}" for c in cols)
                                          for i in range(600)]
    (root / "toy.csv").write_text("\n".join(lines) + "\n")
    ucr = root / "ucr"
    ucr.mkdir()
    for split, n in (("TRAIN", 40), ("TEST", 20)):  # gzipped like the archive copies in shared/data
        y = np.arange(n) % 2
        x = rng.normal(size=(n, 30)) + 2 * y[:, None] * np.sin(np.arange(30) / 3)  # 30 points: resampled to 48
        body = "\n".join("\t".join([str(y[i] + 1)] + [f"{v:.5f}" for v in x[i]]) for i in range(n)) + "\n"
        (ucr / f"Toy_{split}.tsv.gz").write_bytes(gzip.compress(body.encode()))
    return root


def suite_cfg(world, *extra) -> SuiteConfig:
    base = [f"published={world / 'published'}", f"out={world / 'out'}", "seeds=[0, 1]",
            "regimes=[full, linear_probe]", "finetune_overrides=[train.epochs=2, train.batch_size=8, "
            "task.val_stride=8, data.window_stride=8, task.eval_batch_size=256, train.num_threads=1, "
            "task.head_warmup_epochs=1, optim.warmup_steps=1]",
            f"tasks=[{{name: toy, kind: forecast, source: {world / 'toy.csv'}, horizons: [12]}}, "
            f"{{name: ucr, kind: classify, source: {world / 'ucr'}, overrides: [task.fit_length=interpolate]}}]"]
    return load_config(str(REPO_ROOT / "configs" / "eval_foundation.yaml"), base + list(extra), cls=SuiteConfig)


def test_suite_runs_resumes_and_reports(world, capsys):
    cfg = suite_cfg(world)
    records = run(cfg)
    # tasks x regimes x seeds x inits (one horizon), and the forecasting set's baselines: seasonal naive
    # once, DLinear per seed
    assert len(records) == 2 * 2 * 2 * 2 + 1 + 2
    baselines = [r for r in records if r["init"] not in ("simmtm", "random")]
    assert {(r["init"], r["seed"]) for r in baselines} == {("seasonal_naive", None), ("dlinear", 0), ("dlinear", 1)}
    assert all(r["task"] == "toy" and r["mase"] is not None and r["skill"] is not None for r in baselines)
    records = [r for r in records if r not in baselines]
    by = {(r["task"], r["regime"], r["seed"], r["init"]): r for r in records}
    for (task, regime, seed, init), r in by.items():
        other = by[(task, regime, seed, "random" if init == "simmtm" else "simmtm")]
        assert r["n_train"] == other["n_train"] and r["n_test"] == other["n_test"]  # same data for both
        assert r["steps"] == other["steps"] or r["epochs_run"] != other["epochs_run"]  # same budget per epoch
        if regime == "linear_probe":
            assert r["trainable_params"] < by[(task, "full", seed, init)]["trainable_params"]
    assert all(r["mse"] is not None and r["mase"] is not None for r in records if r["task"] == "toy")
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in records if r["task"] == "ucr")
    stamp = (world / "out" / "results.json").stat().st_mtime_ns
    again = run(cfg)  # resumes: nothing left to run, the file is not rewritten
    assert len(again) == len(records) + len(baselines) and (world / "out" / "results.json").stat().st_mtime_ns == stamp
    text = (world / "out" / "results.md").read_text()
    assert "| toy | 12 | full |" in text and "| ucr | full |" in text and "Sets meeting both" in text
    assert "| toy | 12 | seasonal naive (m=1) | - | 0 |" in text and "| toy | 12 | DLinear | full |" in text
    saved = json.loads((world / "out" / "results.json").read_text())
    assert {r["seed"] for r in saved} == {0, 1, None}


def test_summary_gain_and_targets():
    recs = []
    for seed, (s, r) in enumerate([(0.90, 1.00), (0.92, 1.02), (0.91, 0.98)]):
        for regime in ("full", "label10", "linear_probe"):
            recs += [dict(task="F", kind="forecast", horizon=96, regime=regime, init="simmtm", seed=seed, mse=s,
                          accuracy=None),
                     dict(task="F", kind="forecast", horizon=96, regime=regime, init="random", seed=seed, mse=r,
                          accuracy=None)]
            recs += [dict(task="C", kind="classify", horizon=None, regime=regime, init="simmtm", seed=seed, mse=None,
                          accuracy=0.80),
                     dict(task="C", kind="classify", horizon=None, regime=regime, init="random", seed=seed,
                          mse=None, accuracy=0.79)]
    rows = summarise(recs)
    f = next(x for x in rows if x["task"] == "F" and x["regime"] == "label10")
    assert f["simmtm"] == pytest.approx(0.91) and f["random"] == pytest.approx(1.0)
    assert f["gain"] == pytest.approx(9.0) and f["random_std"] == pytest.approx(0.02)
    t = targets(rows)
    assert t["F"]["label10_met"] and t["F"]["linear_probe_met"] and t["F"]["full_within_1std"]
    assert not t["C"]["label10_met"] and t["C"]["gain"]["label10"] == pytest.approx(1.0)  # 1 point < 2
    assert "Sets meeting both the 10%-label and linear-probe targets: 1 of 2" in markdown(recs)


def test_bundled_model_resolves_by_name_without_deepspeed(tmp_path, monkeypatch):
    """load_pretrained("<name>") finds checkpoints/<name>/ and needs neither DeepSpeed nor a path."""
    import models.hub as hub
    monkeypatch.setattr(hub, "BUNDLED", tmp_path)
    torch.manual_seed(0)
    save_pretrained(SimMTM(TINY), str(tmp_path / "tiny-model"), include_heads=False)
    assert resolve("tiny-model") == str(tmp_path / "tiny-model")
    assert resolve("no-such-model") == "no-such-model"  # unknown names fall through to the usual error
    enc = hub.load_pretrained("tiny-model")
    assert enc(torch.randn(3, 48)).shape == (3, TINY.num_tokens, TINY.d_model)


def test_repo_bundled_foundation_loads_in_a_process_without_deepspeed():
    bundled = REPO_ROOT / "checkpoints"
    names = sorted(p.parent.name for p in bundled.glob("*/config.json"))
    assert names, "no bundled model under checkpoints/"
    code = ("import sys; sys.modules['deepspeed'] = None\n"  # any import of deepspeed would now fail
            "import torch; from models import load_pretrained\n"
            f"for name in {names!r}:\n"
            "    enc = load_pretrained(name)\n"
            "    z = enc(torch.randn(2, enc.cfg.seq_len))\n"
            "    assert torch.isfinite(z).all(); print(name, tuple(z.shape))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert all(n in out.stdout for n in names)
