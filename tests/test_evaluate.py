"""The evaluation harness (pre-train -> publish -> fine-tune -> records -> table, resumable) and
distributed fine-tuning under the deepspeed launcher."""
import json
import math

import pytest

from trainer import evaluate
from trainer.config import load_config

from .launch_utils import TINY, VENV_BIN, free_port, pretrain_cmd, run

FT = ["train.epochs=1", "task.val_stride=16", "data.window_stride=64", "task.eval_batch_size=256",
      "train.batch_size=8", "train.num_threads=1"]


def test_harness_runs_resumes_and_reports(tmp_path, monkeypatch):
    cfg = load_config(None, [f"out={tmp_path}", "horizons=[12]"], cls=evaluate.EvalConfig)
    cfg.pretrain_overrides = [*TINY, "train.max_steps=2"]
    cfg.finetune_overrides = FT
    records = evaluate.run(cfg)
    assert {(r["init"], r["horizon"]) for r in records} == {("simmtm", 12), ("random", 12)}
    for r in records:
        assert set(evaluate.FIELDS) <= set(r)
        assert r["task"] == "forecast" and r["setting"] == "in-domain" and r["recipe"] == "budget"
        assert math.isfinite(r["mse"]) and math.isfinite(r["mae"]) and r["accuracy"] is None
        assert r["train_seconds"] > 0
    assert records[0]["pretrain_data"] == "ETTh1" and records[1]["pretrain_data"] is None
    md = (tmp_path / "results.md").read_text()
    assert "| 12 |" in md and "**avg (1 horizon)**" in md and "0.409" in md

    calls = []
    monkeypatch.setattr(evaluate, "_run", lambda cmd, log: calls.append(cmd) or 0.0)
    assert evaluate.run(cfg) == records and calls == []  # complete: nothing re-runs

    # The checkpoint is reused from a moved results folder, and refused for another recipe.
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    tmp_path.rename(moved)
    cfg.out = str(moved)
    (moved / "results.json").unlink()
    again = evaluate.run(cfg)  # records rebuilt from the fine-tunes' results in the moved folder
    assert [(r["init"], r["mse"]) for r in again] == [(r["init"], r["mse"]) for r in records]
    assert [c[1] for c in calls] == ["trainer/finetune.py"] * 2  # no pre-training: fine-tunes only
    cfg.pretrain_overrides = [*TINY, "train.max_steps=3"]
    saved = (moved / "results.json").read_text()
    (moved / "results.json").unlink()
    with pytest.raises(RuntimeError, match="another command"):
        evaluate.run(cfg)
    (moved / "results.json").write_text(saved)
    moved.rename(tmp_path)

    out_json, out_md = tmp_path / "merged.json", tmp_path / "merged.md"
    evaluate.main(["report", str(tmp_path / "results.json"), "--json", str(out_json), "--md", str(out_md)])
    assert len(json.loads(out_json.read_text())) == 2 and "SimMTM MSE" in out_md.read_text()


def test_distributed_finetune_under_deepspeed_launcher(tmp_path):
    pub = tmp_path / "published"
    run(pretrain_cmd("train.max_steps=2", f"ckpt.dir={tmp_path / 'pt'}", f"ckpt.publish={pub}"))
    out = tmp_path / "ft"
    run([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "trainer/finetune.py",
         f"init={pub}", "task.horizon=12", f"out={out}", *FT])
    r = json.loads((out / "result.json").read_text())
    assert r["world_size"] == 2 and r["engine"] == "deepspeed"
    assert r["n_test"] == 2880 - 12 + 1 and math.isfinite(r["mse"])
    assert r["season"] == 24 and math.isfinite(r["mase"]) and math.isfinite(r["skill"])  # sums all-reduced
    assert r["steps"] == math.ceil((r["n_train"] // 2) / 8)  # each rank: half the windows, same steps
