"""Readers of the raw inputs the converter accepts; each yields `Series` records plus split info.

Kept apart from the shard writer so adding an input type touches one function. Inputs are read
through fsspec, so a CSV on S3 converts like a local one.
"""
from __future__ import annotations

import io
import posixpath
import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import fs as _fs
from .errors import DataError
from .shards import Series

SPLITS = ("train", "val", "test")
RAW_SUFFIXES = (".csv", ".pt", ".pth", ".npy", ".npz", ".tsv", ".ts")


@dataclass
class RawInput:
    """What one input file contributes: its series, and how they split into train/val/test.

    `borders` (time-row ranges, shared by every series of the file) for TSLib-style forecasting CSVs;
    `split` for files that *are* one split (TF-C `train.pt`, UCR `*_TRAIN.tsv`); neither: pre-training
    corpus, all of it is `train`.
    """
    path: str
    name: str
    series: list[Series]
    split: Optional[str] = None
    borders: Optional[dict] = None
    channel_names: Optional[list[str]] = None
    freq: Optional[str] = None
    raw: bytes = field(default=b"", repr=False)


def stem(path: str) -> str:
    base = posixpath.basename(path.rstrip("/"))
    return base.split(".", 1)[0] if "." in base else base


def split_from_name(path: str) -> Optional[str]:
    """train/val/test from names like `train.pt`, `Gesture_TEST.tsv`, `x_valid.npz`."""
    s = stem(path).lower()
    for split, pats in (("train", ("train",)), ("val", ("val", "valid", "validation")), ("test", ("test",))):
        if any(re.search(rf"(^|[_\-.]){p}($|[_\-.])", s) for p in pats):
            return split
    return None


# ----------------------------------------------------------------------------- forecasting CSVs

def tslib_borders(n_rows: int, rule: str, name: str) -> Optional[dict]:
    """The Informer/Autoformer split borders (spec "Reference settings"), without the L overlap.

    The stream subtracts the window overlap from the val/test starts at read time, because L is a
    training-time choice: val = [b0 - L, b1) etc.
    """
    if rule == "none":
        return None
    if rule == "auto":
        rule = "ett-hour" if name.startswith("ETTh") else "ett-minute" if name.startswith("ETTm") else "ratio"
    if rule in ("ett-hour", "ett-minute"):
        k = 4 if rule == "ett-minute" else 1
        b = [0, 12 * 30 * 24 * k, 16 * 30 * 24 * k, 20 * 30 * 24 * k]
        if n_rows < b[3]:
            raise DataError(f"{name}: {rule} borders need {b[3]} rows, the file has {n_rows}")
        return {"train": [b[0], b[1]], "val": [b[1], b[2]], "test": [b[2], b[3]]}
    if rule == "ratio":
        n_train, n_test = int(n_rows * 0.7), int(n_rows * 0.2)
        n_val = n_rows - n_train - n_test
        return {"train": [0, n_train], "val": [n_train, n_train + n_val], "test": [n_rows - n_test, n_rows]}
    raise DataError(f"unknown borders rule {rule!r} (auto, ett-hour, ett-minute, ratio, none)")


def date_column(df):
    """The name of a CSV's time column, recognised by name in any case (None: it has none)."""
    return next((c for c in df.columns if str(c).lower() in ("date", "time", "timestamp", "datetime")), None)


def infer_freq(pd, dates) -> Optional[str]:
    if len(dates) < 3:
        return None
    try:
        try:  # pandas 3 warns unless asked for the future offset return type
            with pd.option_context("future.infer_freq_returns_offset", True):
                f = pd.infer_freq(dates)
        except (KeyError, pd.errors.OptionError):
            f = pd.infer_freq(dates)
    except (TypeError, ValueError):
        return None
    return getattr(f, "freqstr", f)


def _first_text_cell(pd, df, cols) -> str:
    """': column 'X' row 12 (file line 13) holds 'abc'' for the first cell that is not a number."""
    for c in cols:
        col = df[c]
        try:
            num = pd.to_numeric(col, errors="coerce")
        except (TypeError, ValueError):
            continue
        hit = np.flatnonzero((col.notna() & num.isna()).to_numpy())
        if len(hit):
            i = int(hit[0])
            return f": column {str(c)!r} row {i + 1} (file line {i + 2}) holds {str(col.iloc[i])!r}, not a number"
    return ""


def read_csv(path: str, data: bytes, borders: str = "auto") -> RawInput:
    import pandas as pd

    if not data.strip():
        raise DataError(f"{path}: empty file (no header, no rows)")
    try:
        df = pd.read_csv(io.BytesIO(data))
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file (no header, no rows)") from None
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: not a readable CSV ({e})") from None
    if len(df) == 0:  # checked first: a header-only file's columns have no numeric dtype either
        raise DataError(f"{path}: no rows (header only: {[str(c) for c in df.columns]})")
    name = stem(path)
    date_col = date_column(df)
    start = freq = None
    if date_col is not None:
        dates = pd.to_datetime(df[date_col], errors="coerce")
        df = df.drop(columns=[date_col])
        if len(dates) and not pd.isna(dates.iloc[0]):
            start = dates.iloc[0].isoformat()
            freq = infer_freq(pd, dates.iloc[:100])
    # pandas' own predicates: numpy's issubdtype raises on pandas extension dtypes (StringDtype, ...)
    bad = [c for c in df.columns
           if not pd.api.types.is_numeric_dtype(df[c].dtype) or pd.api.types.is_bool_dtype(df[c].dtype)]
    if bad:
        raise DataError(f"{path}: non-numeric column(s) {[str(c) for c in bad]}"
                        f"{_first_text_cell(pd, df, bad)}; expected a date column plus numeric channels")
    if df.shape[1] == 0 or len(df) == 0:
        raise DataError(f"{path}: no channels or no rows")
    values = df.to_numpy(dtype=np.float64).T  # [C, T]
    s = Series(name, values, source=name, freq=freq, start=start)
    return RawInput(path, name, [s], borders=tslib_borders(len(df), borders, name),
                    channel_names=[str(c) for c in df.columns], freq=freq, raw=data)


# ----------------------------------------------------------------------------- classification / arrays

def _label_list(labels, n: int, path: str) -> list[Optional[int]]:
    if labels is None:
        return [None] * n
    lab = np.asarray(labels).reshape(-1)
    if lab.shape[0] != n:
        raise DataError(f"{path}: {lab.shape[0]} labels for {n} samples")
    if lab.dtype.kind == "f" and np.all(lab == np.round(lab)):
        lab = lab.astype(np.int64)
    if lab.dtype.kind not in "iu":
        raise DataError(f"{path}: labels must be integers, got dtype {lab.dtype}")
    return [int(v) for v in lab]


def _series_from_array(arr: np.ndarray, labels, path: str, layout: str = "auto") -> list[Series]:
    """[N, C, L] (or [N, L] univariate, [T] one series, [T, C] with layout='tc') -> records."""
    a = np.asarray(arr)
    if a.dtype.kind not in "fiu":
        raise DataError(f"{path}: expected a numeric array, got dtype {a.dtype}")
    if layout == "tc":
        if a.ndim != 2:
            raise DataError(f"{path}: layout 'tc' expects a 2-D [time, channels] array, got {a.shape}")
        a = a.T[None]
    elif a.ndim == 1:
        a = a[None, None, :]
    elif a.ndim == 2:
        a = a[:, None, :]
    elif a.ndim != 3:
        raise DataError(f"{path}: expected [N, C, L], [N, L] or [T], got shape {a.shape}")
    name = stem(path)
    labs = _label_list(labels, a.shape[0], path)
    return [Series(f"{name}/{i}", a[i], source=name, label=labs[i]) for i in range(a.shape[0])]


def load_pt(path: str, data: Optional[bytes] = None, labels: bool = False) -> tuple:
    """(samples, labels or None) of a TF-C `.pt` dict, loaded weights-only; `labels`: required (fine-tuning).
    The one reader of the format, for conversion and fine-tuning alike."""
    import torch

    data = _fs.read_bytes(path) if data is None else data
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: not a loadable .pt file with weights_only=True ({e})") from None
    if not isinstance(obj, dict) or "samples" not in obj or (labels and "labels" not in obj):
        want = "and 'labels' [N]" if labels else "(and 'labels' [N])"
        raise DataError(f"{path}: expected a dict with 'samples' [N, C, L] {want}, "
                        f"got {type(obj).__name__}{' with keys ' + str(list(obj)) if isinstance(obj, dict) else ''}")
    return obj["samples"], obj.get("labels")


def read_pt(path: str, data: bytes) -> RawInput:
    x, y = load_pt(path, data)
    x = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
    y = y.numpy() if hasattr(y, "numpy") else y
    parent = posixpath.basename(posixpath.dirname(path.rstrip("/"))) or stem(path)
    series = _series_from_array(x, y, path)
    for s in series:
        s.source = parent
        s.id = f"{parent}/{stem(path)}/{s.id.rsplit('/', 1)[1]}"
    return RawInput(path, parent, series, split=split_from_name(path), raw=data)


_NPZ_X = ("samples", "x", "X", "data", "values")
_NPZ_Y = ("labels", "y", "Y", "label")


def read_numpy(path: str, data: bytes, layout: str = "auto") -> RawInput:
    try:
        obj = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: not a readable .npy/.npz file ({e})") from None
    if isinstance(obj, np.ndarray):
        x, y = obj, None
    else:
        keys = list(obj.keys())
        xk = next((k for k in _NPZ_X if k in keys), keys[0] if len(keys) == 1 else None)
        if xk is None:
            raise DataError(f"{path}: cannot find the series array; expected one of {_NPZ_X} (has {keys})")
        yk = next((k for k in _NPZ_Y if k in keys), None)
        x, y = obj[xk], (obj[yk] if yk else None)
    return RawInput(path, stem(path), _series_from_array(x, y, path, layout), split=split_from_name(path), raw=data)


def read_tsv(path: str, data: bytes) -> RawInput:
    """UCR archive `.tsv`: one series per line, `label<TAB>v1<TAB>v2...`; NaN-padded tails are trimmed."""
    rows = [ln for ln in data.decode().splitlines() if ln.strip()]
    if not rows:
        raise DataError(f"{path}: empty .tsv file")
    raw_labels, series_vals = [], []
    for i, ln in enumerate(rows):
        parts = re.split(r"[\t,]", ln.strip())
        try:
            vals = np.array([float(v) for v in parts[1:]], dtype=np.float64)
        except ValueError as e:
            raise DataError(f"{path}: line {i + 1}: {e}") from None
        finite = np.flatnonzero(~np.isnan(vals))
        vals = vals[: finite[-1] + 1] if finite.size else vals[:0]
        raw_labels.append(parts[0])
        series_vals.append(vals)
    try:
        num = np.array([float(v) for v in raw_labels])
        labels = num.astype(np.int64) if np.all(num == np.round(num)) else None
    except ValueError:
        labels = None
    if labels is None:  # categorical labels: stable integer codes in sorted order
        classes = sorted(set(raw_labels))
        labels = np.array([classes.index(v) for v in raw_labels], dtype=np.int64)
    name = stem(path)
    ds = re.sub(r"_(TRAIN|TEST)$", "", name, flags=re.I)
    series = [Series(f"{name}/{i}", v, source=ds, label=int(labels[i])) for i, v in enumerate(series_vals)]
    return RawInput(path, ds, series, split=split_from_name(path), raw=data)


def read_ts(path: str, data: bytes) -> RawInput:
    """UEA/UCR `.ts` (sktime format): `@header` lines, then `@data` rows of `dim1:dim2:...:label`, each
    dimension comma-separated, `?` missing. Labels are indices into the `@classLabel true ...` list, so
    a set's TRAIN and TEST files agree on them. Ragged rows are NaN-padded, then all-NaN tails trimmed."""
    header: dict[str, list[str]] = {}
    rows: list[tuple[int, str]] = []
    in_data = False
    for n, ln in enumerate(data.decode().splitlines(), 1):
        s = ln.strip()
        if not s or s.startswith("#"):
            continue
        if in_data:
            rows.append((n, s))
        elif s.lower().startswith("@data"):
            in_data = True
        elif s.startswith("@"):
            key, *rest = s[1:].split()
            header[key.lower()] = rest
        else:
            raise DataError(f"{path}: line {n}: expected an @header line or @data before the values")
    if not rows:
        raise DataError(f"{path}: no @data rows")
    if header.get("timestamps", ["false"])[0].lower() == "true":
        raise DataError(f"{path}: time-stamped .ts files are not supported (export equally spaced values)")
    labelled = header.get("classlabel", ["false"])[0].lower() == "true"
    classes = header.get("classlabel", [])[1:] if labelled else []
    name = stem(path)
    ds = re.sub(r"_(TRAIN|TEST)$", "", name, flags=re.I)
    series = []
    for i, (n, s) in enumerate(rows):
        parts = s.split(":")
        label = None
        if labelled:
            raw = parts.pop().strip()
            if raw not in classes:
                raise DataError(f"{path}: line {n}: class {raw!r} is not in @classLabel {classes}")
            label = classes.index(raw)
        try:
            dims = [np.array([np.nan if v.strip() == "?" else float(v) for v in p.split(",")]) for p in parts]
        except ValueError as e:
            raise DataError(f"{path}: line {n}: {e}") from None
        t = max(len(d) for d in dims)
        arr = np.full((len(dims), t), np.nan)
        for c, d in enumerate(dims):
            arr[c, :len(d)] = d
        keep = np.flatnonzero(~np.isnan(arr).all(axis=0))
        arr = arr[:, : keep[-1] + 1] if keep.size else arr[:, :0]
        series.append(Series(f"{name}/{i}", arr, source=ds, label=label))
    return RawInput(path, ds, series, split=split_from_name(path), raw=data)


def read_input(path: str, storage_options: Optional[dict] = None, borders: str = "auto",
               layout: str = "auto", retries: int = 3) -> RawInput:
    low = path.lower()
    try:
        data = _fs.read_bytes(path, storage_options, retries=retries)
    except FileNotFoundError:
        raise DataError(f"{path}: input file not found") from None
    if low.endswith(".gz"):  # archives ship gzipped (e.g. UCR's NAME_TRAIN.tsv.gz): read through it
        import gzip

        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a valid gzip file ({e})") from None
        low = low[:-3]
    if low.endswith(".csv"):
        return read_csv(path, data, borders)
    if low.endswith((".pt", ".pth")):
        return read_pt(path, data)
    if low.endswith((".npy", ".npz")):
        return read_numpy(path, data, layout)
    if low.endswith(".tsv"):
        return read_tsv(path, data)
    if low.endswith(".ts"):
        return read_ts(path, data)
    raise DataError(f"{path}: unsupported input type (known: {', '.join(RAW_SUFFIXES)})")


def is_raw(path: str) -> bool:
    low = path.lower()
    return low.removesuffix(".gz").endswith(RAW_SUFFIXES)
