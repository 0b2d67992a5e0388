"""Forecasts (or class probabilities) from a fine-tuned model, for new data.

    python -m trainer.predict --model runs/my-ft/model --data my.csv [--out forecasts.csv] [--rolling]

Why a model folder with a "predict" section: a forecast is only usable in the data's own units, channels and
dates, so fine-tuning (`out=DIR`) saves the validation-selected model to DIR/model with what prediction needs
beyond the weights: the channel names, the normalisation fine-tuning applied (train-split z-scoring for a
CSV), the class labels. The input is a CSV (or a DataFrame) with an optional date
column and the model's channels; by default the last `seq_len` rows are the window (`--rolling`: every
window). Forecast rows: `cutoff` (the window's last time), the forecast time (the date column continued at
its inferred frequency, or row positions without one) and one column per channel. Classification rows:
`cutoff`, the most probable `label` and `prob_<label>` per class.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch

from data_pipeline import fs, resolve_manifest
from data_pipeline.errors import DataError
from data_pipeline.readers import date_column, infer_freq
from models.heads import Classifier, Forecaster
from models.hub import CONFIG, join, locate, read_bytes
from trainer.config import repo_path, to_dict
from trainer.finetune import FinetuneConfig

MODEL_DIR = "model"  # the fine-tuned model's folder inside a fine-tuning run's `out`
BATCH = 256  # windows per forward pass


def prediction_spec(cfg: FinetuneConfig, channels: int, classes: Optional[np.ndarray]) -> dict:
    """The "predict" section: channels and normalisation of the data as `forecast_data` reads
    `cfg.data`: z-scored with the train split's statistics for one time-split series (a TSLib CSV) or
    shards read with data.normalize, each series by its own statistics with data.series_norm. Classifiers
    see their inputs as read (they normalise each window inside the model); `classes` are their labels."""
    if classes is not None:
        return {"channels": None, "num_channels": channels, "normalization": {"kind": "none"},
                "labels": [int(c) for c in classes]}
    dc = cfg.data
    m = resolve_manifest(repo_path(dc.source), cache_dir=repo_path(dc.cache_dir, anchor=True),
                         storage_options=dc.storage_options or None)
    single = sum(e["samples"] for e in m["shards"] if e.get("borders")) == 1
    if single or dc.normalize:
        norm = {"kind": "zscore", "mean": m["stats"]["mean"], "std": m["stats"]["std"]}
    else:
        norm = {"kind": "series" if dc.series_norm else "none"}
    return {"channels": m.get("channel_names") if single else None, "num_channels": channels,
            "normalization": norm, "labels": None}


def save_finetuned(module: torch.nn.Module, cfg: FinetuneConfig, channels: int,
                   classes: Optional[np.ndarray] = None) -> str:
    """Save the fine-tuned `module` (a Forecaster or Classifier) to `<cfg.out>/model` with its "predict"
    section; `channels`: the training windows' channel count, `classes`: a classifier's original labels."""
    folder = str(Path(cfg.out) / MODEL_DIR)
    module.save_pretrained(folder, config={
        "predict": prediction_spec(cfg, channels, classes),
        "finetuning": {"init": cfg.init, "data": cfg.data.source, "task": to_dict(cfg.task)}})
    return folder


def load_model(model_dir: str, storage_options: Optional[dict] = None) -> Forecaster | Classifier:
    """A fine-tuned model from a local folder, fsspec URL or Hub id, with the "predict" section checked."""
    folder = locate(model_dir)
    try:
        kind = (json.loads(read_bytes(join(folder, CONFIG), storage_options)).get("task") or {}).get("kind")
    except FileNotFoundError:
        raise FileNotFoundError(f"{join(folder, CONFIG)}: not found (a fine-tuning run with out=DIR saves "
                                f"its model to DIR/{MODEL_DIR})") from None
    model = (Classifier if kind == "classify" else Forecaster).from_pretrained(folder, storage_options=storage_options)
    if "predict" not in (model.hub_config or {}):
        raise ValueError(f"{folder}: config.json has no 'predict' section (channels, normalisation), which "
                         f"trainer/finetune.py writes when it saves a model (out=DIR: DIR/{MODEL_DIR})")
    return model


def read_frame(data: str | Path | pd.DataFrame, storage_options: Optional[dict] = None) -> tuple[pd.DataFrame, str]:
    """(the table, its name for messages) from a CSV path or URL, or a DataFrame as given."""
    if isinstance(data, pd.DataFrame):
        return data, "data"
    try:
        raw = fs.read_bytes(str(data), storage_options)
    except FileNotFoundError:
        raise DataError(f"{data}: not found") from None
    try:
        return pd.read_csv(io.BytesIO(raw)), str(data)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{data}: not a readable CSV ({' '.join(str(e).split())})") from None


def channel_values(frame: pd.DataFrame, spec: dict, name: str) -> tuple[np.ndarray, list[str]]:
    """[C, T] float64 values of the model's channels, in training order, and their names."""
    cols = [c for c in frame.columns if c != date_column(frame)]
    want = spec["channels"]
    if want is not None and set(map(str, cols)) != set(want):
        missing, extra = sorted(set(want) - set(map(str, cols))), sorted(set(map(str, cols)) - set(want))
        raise DataError(f"{name}: channels {[str(c) for c in cols]} are not the model's {want} (missing {missing}, "
                        f"unexpected {extra})")
    if want is None and len(cols) != spec["num_channels"]:
        raise DataError(f"{name}: {len(cols)} channel column(s) {[str(c) for c in cols]}, the model was "
                        f"fine-tuned on {spec['num_channels']}")
    names = want or [str(c) for c in cols]
    table = frame.rename(columns=str)[names]
    bad = [c for c in names if not pd.api.types.is_numeric_dtype(table[c].dtype)]
    if bad:
        raise DataError(f"{name}: non-numeric channel column(s) {bad}")
    return table.to_numpy(np.float64).T, names


def times(frame: pd.DataFrame, name: str) -> tuple[pd.Index, str]:
    """(the rows' times, the name of their column): the parsed date column, or row positions ("row")."""
    col = date_column(frame)
    if col is None:
        return pd.RangeIndex(len(frame)), "row"
    dates = pd.DatetimeIndex(pd.to_datetime(frame[col], errors="coerce"))
    if dates.isna().any():
        raise DataError(f"{name}: column {col!r} row {int(np.flatnonzero(dates.isna())[0]) + 1} is not a date")
    return dates, str(col)


def continued(index: pd.Index, steps: int, name: str) -> pd.Index:
    """`index` followed by `steps` more times: dates at the frequency pandas infers from them, positions +1."""
    if isinstance(index, pd.RangeIndex):
        return pd.RangeIndex(len(index) + steps)
    freq = infer_freq(pd, index)
    if freq is None:
        raise DataError(f"{name}: no regular frequency in the date column (pandas.infer_freq found none: gaps, "
                        f"duplicates or fewer than 3 rows), so forecasts cannot be dated")
    return index.append(pd.date_range(index[-1], periods=steps + 1, freq=freq)[1:])


def normalizer(values: np.ndarray, spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) [C, 1] that fine-tuning's inputs were z-scored with (0 and 1: none)."""
    norm = spec["normalization"]
    if norm["kind"] == "zscore":
        return np.asarray(norm["mean"])[:, None], np.asarray(norm["std"])[:, None]
    if norm["kind"] == "series":  # as data.series_norm: each channel by its own statistics
        return values.mean(1, keepdims=True), np.maximum(values.std(1, keepdims=True), 1e-5)
    return np.zeros((len(values), 1)), np.ones((len(values), 1))


@torch.no_grad()
def run_model(model: torch.nn.Module, x: torch.Tensor, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    """The model on the windows x[:, s:s+L] of [C, T] for each start s, in batches."""
    windows = x.unfold(1, seq_len, 1).permute(1, 0, 2)  # [T-L+1, C, L], a view
    return torch.cat([model(windows[starts[i:i + BATCH]]) for i in range(0, len(starts), BATCH)])


def predict(model_dir: str, data: str | Path | pd.DataFrame, rolling: bool = False,
            storage_options: Optional[dict] = None) -> pd.DataFrame:
    """Forecasts (forecasting models) or class probabilities (classifiers) for the last window of `data`, or
    for every window with `rolling`. `data`: a CSV path/URL or a DataFrame; see the module docstring."""
    model = load_model(model_dir, storage_options)
    spec = model.hub_config["predict"]
    frame, name = read_frame(data, storage_options)
    values, names = channel_values(frame, spec, name)
    index, time_col = times(frame, name)
    seq_len, rows = model.encoder.cfg.seq_len, values.shape[1]
    if rows < seq_len:
        raise DataError(f"{name}: {rows} rows, fewer than the model's input window of {seq_len}")
    starts = np.arange(rows - seq_len + 1) if rolling else np.array([rows - seq_len])
    used = values[:, starts[0]:]
    if not np.isfinite(used).all():
        c, t = np.argwhere(~np.isfinite(used))[0]
        raise DataError(f"{name}: channel {names[c]!r} row {starts[0] + t + 1} is missing or not finite")
    mean, std = normalizer(values, spec)
    out = run_model(model, torch.from_numpy((values - mean) / std).float(), starts, seq_len).double().numpy()
    ends = starts + seq_len - 1
    if isinstance(model, Classifier):
        probs = torch.softmax(torch.from_numpy(out), -1).numpy()
        labels = np.asarray(spec["labels"])
        return pd.DataFrame({"cutoff": index[ends], "label": labels[probs.argmax(1)],
                             **{f"prob_{c}": probs[:, k] for k, c in enumerate(labels)}})
    horizon = out.shape[-1]
    y = out * std[None] + mean[None]  # [N, C, H] in the data's units
    future = continued(index, horizon, name)
    return pd.DataFrame({"cutoff": np.repeat(index[ends], horizon),
                         time_col: future[(ends[:, None] + np.arange(1, horizon + 1)).ravel()],
                         **{c: y[:, k].ravel() for k, c in enumerate(names)}})


def main(argv: Optional[list[str]] = None) -> None:
    from trainer.cli import DEBUG_EPILOG

    ap = argparse.ArgumentParser(prog="python -m trainer.predict", description=__doc__.split("\n\n")[0],
                                 epilog=DEBUG_EPILOG)
    ap.add_argument("--model", required=True,
                    help=f"a fine-tuned model: DIR/{MODEL_DIR} of a run with out=DIR, an fsspec URL or a Hub id")
    ap.add_argument("--data", required=True, help="CSV (path or URL): an optional date column and the model's channels")
    ap.add_argument("--out", help="write the CSV here (path or URL) instead of to stdout")
    ap.add_argument("--rolling", action="store_true", help="every window of the input, not only the last")
    a = ap.parse_args(argv)
    text = predict(a.model, a.data, rolling=a.rolling).to_csv(index=False)
    if a.out:
        fs.atomic_write(a.out, text.encode())
        print(f"wrote {a.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    from trainer import cli
    from trainer import distributed as dist

    dist.exit_process(cli.run(main))
