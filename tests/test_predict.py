"""Fine-tuned models you can use (issue 15, item 3): fine-tuning saves the selected model with what
prediction needs, and `python -m trainer.predict` / `predict()` turn a CSV into forecasts or class
probabilities: the last window or every window, dates continued, channels named, clear errors; the
README's commands run as written."""
import json
import re
import shlex
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from data_pipeline import resolve_manifest
from models.heads import Classifier, Forecaster
from trainer.config import REPO_ROOT, load_config
from trainer.finetune import FinetuneConfig, finetune
from trainer.predict import predict

from .launch_utils import clean_env
from .test_finetune import TINY_MODEL
from .test_hub_mixin import fake_hf  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("restore_env")  # tests/conftest.py

ETTH1 = REPO_ROOT / "data" / "ETTh1.csv"
CHANNELS = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
H = 12
TINY_FT = ["train.epochs=1", "task.val_stride=32", "data.window_stride=64", "task.test_stride=64",
           "task.eval_batch_size=256", "train.batch_size=8", "train.num_threads=1", "train.progress=false"]


def tiny_finetune(out, *overrides) -> dict:
    cfg = load_config(None, [f"out={out}", *TINY_FT, *overrides], cls=FinetuneConfig)
    cfg.model = TINY_MODEL
    return finetune(cfg)


@pytest.fixture(scope="module")
def forecaster(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft")
    tiny_finetune(out, f"task.horizon={H}")
    return out / "model"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A classifier fine-tuned on a TF-C folder of 2-channel series whose labels are 3 and 7."""
    root = tmp_path_factory.mktemp("cls")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 48), ("val", 16), ("test", 16)):
        labels = torch.tensor([3, 7] * (n // 2))
        x = torch.randn(n, 2, 48, generator=g) + (labels == 7)[:, None, None] * torch.linspace(0, 3, 48)
        torch.save({"samples": x, "labels": labels}, root / f"{split}.pt")
    tiny_finetune(root / "out", "task.kind=classify", f"data.source={root}")
    return root / "out" / "model"


def head_of_etth1(rows: int, path) -> pd.DataFrame:
    frame = pd.read_csv(ETTH1).head(rows)
    frame.to_csv(path, index=False)
    return frame


def test_finetuning_saves_the_selected_model_with_what_prediction_needs(forecaster):
    cfg = json.loads((forecaster / "config.json").read_text())
    stats = resolve_manifest(str(ETTH1), cache_dir=str(REPO_ROOT / "data/shards"))["stats"]
    assert cfg["model"]["seq_len"] == 48 and cfg["task"]["kind"] == "forecast" and cfg["task"]["horizon"] == H
    assert cfg["predict"] == {"channels": CHANNELS, "num_channels": 7, "labels": None,
                              "normalization": {"kind": "zscore", "mean": stats["mean"], "std": stats["std"]}}
    assert cfg["finetuning"]["data"] == "data/ETTh1.csv" and len(cfg["weights_sha256"]) == 64


def test_forecast_of_the_last_window_equals_the_model_on_it(forecaster):
    out = predict(str(forecaster), ETTH1)
    frame = pd.read_csv(ETTH1, parse_dates=["date"])
    last = frame["date"].iloc[-1]
    assert list(out.columns) == ["cutoff", "date", *CHANNELS] and len(out) == H
    assert (out["cutoff"] == last).all()
    assert list(out["date"]) == list(pd.date_range(last, periods=H + 1, freq="h")[1:])
    stats = json.loads((forecaster / "config.json").read_text())["predict"]["normalization"]
    mean, std = np.asarray(stats["mean"])[:, None], np.asarray(stats["std"])[:, None]
    window = (frame[CHANNELS].to_numpy().T[:, -48:] - mean) / std
    with torch.no_grad():
        y = Forecaster.from_pretrained(forecaster)(torch.from_numpy(window).float()[None])[0].double().numpy()
    np.testing.assert_allclose(out[CHANNELS].to_numpy(), (y * std + mean).T, rtol=1e-12)


def test_rolling_forecasts_every_window(forecaster, tmp_path):
    frame = head_of_etth1(100, tmp_path / "head.csv")
    out = predict(str(forecaster), tmp_path / "head.csv", rolling=True)
    assert len(out) == (100 - 48 + 1) * H
    dates = pd.to_datetime(frame["date"])
    assert list(out["cutoff"].unique()) == list(dates[47:])
    first = out.iloc[:H]
    assert list(first["date"]) == list(dates[48:48 + H])  # inside the CSV: its own dates
    last = predict(str(forecaster), tmp_path / "head.csv")
    pd.testing.assert_frame_equal(out.iloc[-H:].reset_index(drop=True), last)


def test_a_frame_without_dates_gets_row_positions(forecaster):
    frame = pd.read_csv(ETTH1).head(60)[CHANNELS[::-1]]  # any column order: matched by name
    out = predict(str(forecaster), frame)
    assert list(out.columns) == ["cutoff", "row", *CHANNELS]
    assert (out["cutoff"] == 59).all() and list(out["row"]) == list(range(60, 60 + H))
    dated = predict(str(forecaster), pd.read_csv(ETTH1).head(60))
    np.testing.assert_allclose(out[CHANNELS].to_numpy(), dated[CHANNELS].to_numpy())


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.predict", *map(str, args)], cwd=REPO_ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=120)


def test_cli_writes_the_forecasts_and_refuses_bad_input_in_one_line(forecaster, tmp_path):
    ok = cli("--model", forecaster, "--data", ETTH1, "--out", tmp_path / "f.csv")
    assert ok.returncode == 0, ok.stderr
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "f.csv", parse_dates=["cutoff", "date"]),
                                  predict(str(forecaster), ETTH1))
    assert cli("--help").returncode == 0 and "--rolling" in cli("--help").stdout
    head_of_etth1(30, tmp_path / "short.csv")
    short = cli("--model", forecaster, "--data", tmp_path / "short.csv")
    assert short.returncode == 2 and short.stderr.strip().count("\n") == 0
    assert "short.csv: 30 rows, fewer than the model's input window of 48" in short.stderr
    pd.read_csv(ETTH1).head(60).drop(columns=["OT"]).rename(columns={"HUFL": "load"}).to_csv(tmp_path / "other.csv",
                                                                                          index=False)
    other = cli("--model", forecaster, "--data", tmp_path / "other.csv")
    assert other.returncode == 2 and other.stderr.strip().count("\n") == 0
    assert re.search(r"other.csv: channels .* are not the model's .*missing \['HUFL', 'OT'\], unexpected \['load'\]",
                     other.stderr)
    missing = cli("--model", tmp_path / "nothing", "--data", ETTH1)
    assert missing.returncode == 2 and "nothing/config.json: not found" in missing.stderr


def test_classifier_gives_probabilities_per_window(classifier, tmp_path):
    cfg = json.loads((classifier / "config.json").read_text())
    assert cfg["task"]["num_classes"] == 2 and cfg["predict"]["labels"] == [3, 7]
    g = np.random.default_rng(0)
    frame = pd.DataFrame({"date": pd.date_range("2024-01-01", periods=60, freq="min"),
                          "a": g.normal(size=60), "b": g.normal(size=60)})
    out = predict(str(classifier), frame, rolling=True)
    assert list(out.columns) == ["cutoff", "label", "prob_3", "prob_7"] and len(out) == 60 - 48 + 1
    np.testing.assert_allclose(out[["prob_3", "prob_7"]].sum(axis=1), 1.0, rtol=1e-12)
    assert set(out["label"]) <= {3, 7} and out["cutoff"].iloc[-1] == frame["date"].iloc[-1]
    x = torch.tensor(frame[["a", "b"]].to_numpy().T[:, -48:], dtype=torch.float32)[None]
    with torch.no_grad():
        probs = torch.softmax(Classifier.from_pretrained(classifier)(x), -1)[0].double().numpy()
    np.testing.assert_allclose(out[["prob_3", "prob_7"]].iloc[-1], probs, rtol=1e-6)
    with pytest.raises(ValueError, match=r"3 channel column\(s\) .* fine-tuned on 2"):
        predict(str(classifier), frame.assign(c=1.0))


def test_predict_reads_models_and_data_from_hf_urls(fake_hf, forecaster):
    """hf:// for --model and --data, with the Hub's transport replaced by memory (no network here)."""
    import fsspec

    hf = fsspec.filesystem("hf")
    for name in ("config.json", "model.safetensors"):
        hf.pipe_file(f"hf://someone/etth1-tiny/{name}", (forecaster / name).read_bytes())
    hf.pipe_file("hf://datasets/someone/etth1/ETTh1.csv", ETTH1.read_bytes())
    pd.testing.assert_frame_equal(predict("hf://someone/etth1-tiny", "hf://datasets/someone/etth1/ETTh1.csv"),
                                  predict(str(forecaster), ETTH1))


def test_lora_fine_tuning_saves_the_merged_model(tmp_path):
    """A LoRA run saves merged weights: a plain Forecaster, loaded without peft, equal to the trained one."""
    r = tiny_finetune(tmp_path, f"task.horizon={H}", "task.mode=lora")
    saved = Forecaster.from_pretrained(tmp_path / "model")
    assert not any("lora" in k for k in saved.state_dict())
    x = torch.randn(3, 7, 48)
    with torch.no_grad():
        torch.testing.assert_close(saved(x), r["_model"].eval()(x), rtol=1e-5, atol=1e-5)


def readme_section() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("## Use a model: from_pretrained, fine-tune, predict"):]
    return section[:section.index("\n## ", 3)]


def test_readme_commands_run_as_written(tmp_path):
    """The section's code blocks run in order as written, from the repository root: the fine-tuning
    command with tiny overrides appended, and every `runs/` path moved under tmp_path."""
    blocks = re.findall(r"```(python|bash)\n(.*?)```", readme_section(), re.S)
    assert [lang for lang, _ in blocks] == ["python", "bash", "python"]
    tiny = ["train.max_steps=2", "data.window_stride=256", "task.val_stride=256", "task.evaluate_test=false",
            "train.progress=false"]
    for lang, code in blocks:
        code = code.replace("runs/", f"{tmp_path}/runs/")
        if lang == "python":
            commands = [[sys.executable, "-c", code]]
        else:
            commands = [[sys.executable if a == ".venv/bin/python" else a for a in shlex.split(line)]
                        for line in code.splitlines() if line.strip()]
        for cmd in commands:
            cmd += tiny if "trainer/finetune.py" in cmd else []
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"{cmd}: {proc.stderr[-3000:]}"
    (run,) = (tmp_path / "runs").glob("*/model")
    horizon = json.loads((run / "config.json").read_text())["task"]["horizon"]
    forecasts = pd.read_csv(next(run.parent.glob("*.csv")))
    assert list(forecasts.columns) == ["cutoff", "date", *CHANNELS] and len(forecasts) == horizon
    assert (tmp_path / "runs" / "my-encoder" / "config.json").exists()
