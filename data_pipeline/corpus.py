"""Build the multi-domain pre-training corpus from the shared real data in one command.

    python -m data_pipeline.corpus --out runs/corpus/foundation [--shared ../shared/data] [--format parquet]

Every usable *training* series under the shared data folder becomes univariate float32 `Series`
records, written through `convert.write_dataset` (two RawInputs per source file: split `train` and a
deterministic hash-chosen `val` hold-out) to any fsspec URL, with `manifest.json`, `DATA_CARD.md` and
`data_card.json` beside the shards. The stream z-scores each series by itself
(`data.normalize=false data.series_norm=true data.channels=independent`), so no global statistics
are needed.

What is read (paths relative to --shared):
- forecasting/**/*.csv: the TSLib train rows only (ETTh* 0..8640, ETTm* 0..34560, else first 70%)
- classification/*/train.pt: every sample's channels
- corpus/: UCR/UEA/TSER `*_TRAIN` files, Monash `.tsf` (competition test horizon dropped), M4
  `*-train.csv`, M3 `.xls` (only with an installed Excel engine), and plain CSV tables (PJM, NAB, ...)
Evaluation splits (`*_TEST*`, `*-test*`, val/test `.pt`, TSLib val/test rows) are never read, and any
path naming ETTh2, ETTm2 or weather is refused (`ForbiddenSourceError`).
"""
from __future__ import annotations

import argparse
import fnmatch
import gzip
import hashlib
import io
import json
import os
import re
import sys
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from . import fs as _fs
from .errors import DataError
from .readers import RawInput, read_csv, read_pt, read_ts, read_tsv, stem
from .shards import FORMATS, Series

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SHARED = "../shared/data"

# ----------------------------------------------------------------------------- the hard exclusion

FORBIDDEN = re.compile(r"etth2|ettm2|weather", re.I)


class ForbiddenSourceError(DataError):
    """A path naming ETTh2, ETTm2 or weather reached the corpus builder: these sets are held out."""


def guard(path: str) -> str:
    """Refuse (raise) any file whose path or name matches ETTh2, ETTm2 or weather (case-insensitive)."""
    if FORBIDDEN.search(str(path)):
        raise ForbiddenSourceError(f"{path}: ETTh2/ETTm2/weather data must never enter the pre-training corpus")
    return path


# ----------------------------------------------------------------------------- options and counters

@dataclass
class Policy:
    val_fraction: float = 0.02
    min_length: int = 64
    short: str = "skip"  # skip | pad (kept as is; the stream's data.short_series=pad pads them)
    max_abs: float = 1e10
    max_series_per_file: int = 0  # 0: no cap
    tsf_drop_horizon: bool = True  # drop the last @horizon points of Monash series (the test horizon)

    def check(self) -> None:
        if self.short not in ("skip", "pad"):
            raise DataError(f"--short must be skip or pad, got {self.short!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.min_length < 1 or self.max_abs <= 0 or self.max_series_per_file < 0:
            raise DataError("--min-length >= 1, --max-abs > 0 and --max-series-per-file >= 0 required")


class SkipFile(Exception):
    """A whole input file is left out; the message is the reason recorded in the data card."""


@dataclass
class FileResult:
    rel: str
    kind: str
    dataset: str
    freq_label: str = "n/a"
    counts: Counter = field(default_factory=Counter)
    series: list = field(default_factory=list)  # (Series, hash) kept
    skipped: Optional[str] = None
    notes: list = field(default_factory=list)


# ----------------------------------------------------------------------------- metadata from the READMEs

_TOP_META = {  # shared/data/README.md has no frequency/domain columns for these
    "forecasting/ETT-small/ETTh1.csv": ("hourly", "energy (electricity transformer)"),
    "forecasting/ETT-small/ETTm1.csv": ("15min", "energy (electricity transformer)"),
    "forecasting/exchange_rate/exchange_rate.csv": ("daily", "finance (exchange rates)"),
    "forecasting/illness/national_illness.csv": ("weekly", "health (influenza-like illness)"),
    "classification/Gesture/train.pt": ("n/a", "motion (accelerometer gestures)"),
    "classification/Epilepsy/train.pt": ("n/a", "EEG"),
}


def _expand_braces(p: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", p)
    if not m:
        return [p]
    return [x for opt in m.group(1).split(",") for x in _expand_braces(p[:m.start()] + opt + p[m.end():])]


def _md_tables(text: str) -> list[dict]:
    """Rows of every markdown table in `text`, as dicts keyed by the lower-cased header cells."""
    rows, header = [], None
    for ln in text.splitlines():
        if not ln.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if header is None:
            header = [c.lower() for c in cells]
        elif not all(set(c) <= set("-: ") for c in cells):
            rows.append(dict(zip(header, cells)))
    return rows


def load_meta(root: str) -> dict[str, dict]:
    """file (relative to root) -> {shape, frequency, domain, origin, licence} from the data READMEs."""
    meta: dict[str, dict] = {}
    for readme, prefix in (("README.md", ""), ("corpus/README.md", "corpus/")):
        try:
            with open(os.path.join(root, readme), encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        for r in _md_tables(text):
            fcol = r.get("file", "")
            if not fcol or "/" not in fcol:
                continue
            for p in _expand_braces(fcol.strip("`")):
                key = prefix + p
                meta[key] = {"shape": r.get("shape") or next((v for k, v in r.items() if k.startswith("shape")), ""),
                             "frequency": r.get("frequency", ""), "domain": r.get("domain", ""),
                             "origin": r.get("source") or next((v for k, v in r.items() if k.startswith("source")), ""),
                             "licence": r.get("licence", "")}
    for k, (fr, dom) in _TOP_META.items():
        m = meta.setdefault(k, {"shape": "", "origin": "", "licence": ""})
        m["frequency"], m["domain"] = fr, dom
    return meta


def _meta_for(meta: dict, rel: str) -> dict:
    return meta.get(rel) or meta.get(rel[:-3] if rel.endswith(".gz") else rel + ".gz") or {}


_FREQ_RULES = [(r"\b5[- ]?min", "5min"), (r"15[- ]?min", "15min"), (r"half[- ]hourly|30[- ]?min", "30min"),
               (r"hourly|\bh\b", "hourly"), (r"daily|\bd\b|business days", "daily"), (r"weekly|\bw\b", "weekly"),
               (r"monthly|\bms?\b", "monthly"), (r"quarterly|\bqs?\b", "quarterly"),
               (r"yearly|annual|\bys?\b|\bas?\b", "yearly")]
_ALIAS = {"5min": "5min", "15min": "15min", "30min": "30min", "hourly": "h", "daily": "D", "weekly": "W",
          "monthly": "MS", "quarterly": "QS", "yearly": "YS"}


def freq_label(text: Optional[str]) -> str:
    t = (text or "").strip().lower()
    if not t or t.startswith("n/a") or t.startswith("(see"):
        return "n/a"
    for pat, lab in _FREQ_RULES:
        if re.search(pat, t):
            return lab
    return "other: " + t.split("(")[0].strip()


def domain_label(text: Optional[str]) -> str:
    t = re.sub(r"\([^)]*\)", "", text or "").strip(" ;,")
    return t or "unknown"


# ----------------------------------------------------------------------------- discovery

_TABLE_FOLDERS = ("pjm_hourly_energy", "nab_realdata", "readytensor_forecasting", "statsmodels_datasets",
                  "sktime_aeon_small", "pmdarima_datasets", "classic_small", "anomaly_detection")
_DUPLICATES = {"corpus/monash_tsf/m4_hourly_dataset.tsf.gz":
               "duplicate: the same 414 series as m4_official/Hourly-train.csv.gz plus their test horizon"}
_EVAL_NAME = re.compile(r"(_|-|^)(test|val|valid|validation)(_|-|\.|$)", re.I)
# Archive sets cut from the same recordings as a downstream evaluation set: their training files may
# hold that set's test series, so they stay out (the evaluation sets' own TRAIN files are fine).
RELATED_TO_EVAL = {
    "UWaveGestureLibrary": "TF-C Gesture (the same uWave recordings)",
    "UWaveGestureLibraryAll": "TF-C Gesture (the same uWave recordings)",
    "UWaveGestureLibraryX": "TF-C Gesture (the same uWave recordings)",
    "UWaveGestureLibraryY": "TF-C Gesture (the same uWave recordings)",
    "UWaveGestureLibraryZ": "TF-C Gesture (the same uWave recordings)",
    "Computers": "ElectricDevices (the same Powering the Nation household study)",
    "LargeKitchenAppliances": "ElectricDevices (the same Powering the Nation household study)",
    "RefrigerationDevices": "ElectricDevices (the same Powering the Nation household study)",
    "ScreenType": "ElectricDevices (the same Powering the Nation household study)",
    "SmallKitchenAppliances": "ElectricDevices (the same Powering the Nation household study)",
    "FordB": "FordA (the same engine-noise problem, other recordings)",
}


def classify(rel: str) -> tuple[Optional[str], str]:
    """(kind, reason): the reader for a file under the shared root, or None and why it is not read."""
    low = rel.lower()
    base = os.path.basename(rel)
    parts = rel.split("/")
    if base.lower().endswith(".md") or base.lower().startswith(("license", "readme", ".")):
        return None, "documentation/licence"
    if _EVAL_NAME.search(stem(base)):
        return None, "evaluation split (test/val file)"
    if rel in _DUPLICATES:
        return None, _DUPLICATES[rel]
    if parts[0] == "forecasting":
        return ("tslib", "") if low.endswith(".csv") else (None, "not a forecasting CSV")
    if parts[0] == "classification":
        if base == "train.pt":
            return "pt", ""
        return None, "not a training split" if low.endswith(".pt") else "not a data file"
    if parts[0] != "corpus" or len(parts) < 3:
        return None, "outside the known layout"
    folder = parts[1]
    if folder in ("ucr_2018", "uea_2018") and len(parts) > 3 and parts[2] in RELATED_TO_EVAL:
        return None, f"related to a downstream evaluation set: {RELATED_TO_EVAL[parts[2]]}"
    if folder in ("ucr_2018", "uea_2018", "tser_regression"):
        if low.endswith("_train.tsv.gz") or low.endswith("_train.tsv"):
            return "ucr", ""
        if low.endswith("_train.ts.gz") or low.endswith("_train.ts"):
            return "ts", ""
        if re.search(r"_train\.csv(\.gz)?$", low):
            return None, "duplicate: a CSV copy of the same set's _TRAIN .tsv"
        return None, "not a TRAIN file"
    if folder == "monash_tsf":
        return ("tsf", "") if low.endswith((".tsf.gz", ".tsf")) else (None, "not a .tsf file")
    if folder == "m4_official":
        return ("m4", "") if re.search(r"-train\.csv(\.gz)?$", low) else (None, "not an M4 train file")
    if folder == "m3_competition":
        return ("m3", "") if low.endswith((".xls", ".xlsx")) else (None, "not the M3 workbook")
    if folder in _TABLE_FOLDERS:
        if low.endswith((".csv.gz", ".csv")):
            return "table", ""
        if low.endswith(".json"):
            return None, "metadata (not a series file)"
        return None, "not a plain CSV table (raw text/fixed-width file; its data is also in a CSV here)"
    return None, "unknown folder"


def discover(root: str, sources: Sequence[str] = ()) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """([(rel, kind)], [(rel, reason)]) over the files under `root`, sorted; forbidden names raise."""
    use, excluded = [], []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            rel = os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
            guard(rel)
            if sources and not any(fnmatch.fnmatch(rel, g) for g in sources):
                continue
            kind, why = classify(rel)
            (use.append((rel, kind)) if kind else excluded.append((rel, why)))
    return sorted(use), sorted(excluded)


# ----------------------------------------------------------------------------- readers (-> univariate candidates)

def _load(path: str) -> bytes:
    guard(path)
    with open(path, "rb") as f:
        data = f.read()
    return gzip.decompress(data) if path.endswith(".gz") else data


def _inner(rel: str) -> str:
    return rel[:-3] if rel.endswith(".gz") else rel


def read_tslib(res: FileResult, path: str, data: bytes) -> list:
    raw = read_csv(_inner(path), data, "auto")
    a, b = raw.borders["train"] if raw.borders else (0, raw.series[0].values.shape[1])
    res.notes.append(f"train rows [{a}, {b}) only")
    res.dataset = raw.name
    v = raw.series[0].values
    names = raw.channel_names or [str(i) for i in range(v.shape[0])]
    return [(f"{names[c]}", v[c, a:b].astype(np.float64)) for c in range(v.shape[0])]


def read_train_pt(res: FileResult, path: str, data: bytes) -> list:
    raw = read_pt(_inner(path), data)
    res.dataset = raw.name
    return [(f"{i}/{c}", s.values[c].astype(np.float64)) for i, s in enumerate(raw.series)
            for c in range(s.values.shape[0])]


def read_ucr(res: FileResult, path: str, data: bytes) -> list:
    import pandas as pd

    res.dataset = re.sub(r"_(TRAIN|TEST)$", "", stem(path), flags=re.I)
    try:
        x = pd.read_csv(io.BytesIO(data), sep="\t", header=None).iloc[:, 1:].to_numpy(dtype=np.float64)
    except Exception:  # noqa: BLE001 - odd rows: the project's (slower, stricter) UCR reader
        try:
            raw = read_tsv(_inner(path), data)
        except DataError as e:
            raise SkipFile(f"unreadable UCR .tsv ({str(e)[:100]})") from None
        return [(f"{i}", s.values[0].astype(np.float64)) for i, s in enumerate(raw.series)]
    return [(f"{i}", x[i]) for i in range(x.shape[0])]


def read_ts_file(res: FileResult, path: str, data: bytes) -> list:
    """UEA/UCR/TSER `.ts`: regression targets (`@targetLabel true`) are dropped before parsing."""
    text = data.decode("utf-8", errors="replace")
    if re.search(r"^\s*@targetlabel\s+true", text, re.I | re.M):
        out, in_data = [], False
        for ln in text.splitlines():
            s = ln.strip()
            if in_data and s and not s.startswith("#"):
                out.append(s.rsplit(":", 1)[0])
            elif s.lower().startswith("@targetlabel"):
                out.append("@targetLabel false")
            else:
                out.append(ln)
                in_data = in_data or s.lower().startswith("@data")
        text = "\n".join(out)
        res.notes.append("regression targets dropped")
    try:
        raw = read_ts(_inner(path), text.encode())
    except DataError as e:
        raise SkipFile(f"unreadable .ts ({str(e)[:120]})") from None
    res.dataset = raw.name
    return [(f"{i}/{c}", s.values[c].astype(np.float64)) for i, s in enumerate(raw.series)
            for c in range(s.values.shape[0])]


def read_tsf(res: FileResult, path: str, data: bytes, drop_horizon: bool = True) -> list:
    """Monash `.tsf`: `@attribute name type` / `@frequency` / `@horizon` headers, `@data`, then rows
    `attr1:attr2:...:v1,v2,...` (`?` = missing). The last `horizon` points (the forecasting
    competition's test horizon: per-series `horizon` attribute or the `@horizon` header) are dropped."""
    res.dataset = stem(path)
    attrs: list[str] = []
    header: dict[str, str] = {}
    out: list = []
    in_data = False
    dropped = 0
    for n, ln in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        s = ln.strip()
        if not s or s.startswith("#"):
            continue
        if not in_data:
            if s.lower().startswith("@data"):
                in_data = True
            elif s.lower().startswith("@attribute"):
                attrs.append(s.split()[1])
            elif s.startswith("@"):
                k, _, v = s[1:].partition(" ")
                header[k.lower()] = v.strip()
            continue
        fields = s.split(":")
        if len(fields) != len(attrs) + 1:
            raise SkipFile(f"line {n}: {len(fields)} ':' fields, expected {len(attrs) + 1} (attributes + values)")
        att = dict(zip(attrs, fields[:-1]))
        try:
            v = np.array(fields[-1].replace("?", "nan").split(","), dtype=np.float64)
        except ValueError as e:
            raise SkipFile(f"line {n}: {str(e)[:80]}") from None
        h = att.get("horizon") or header.get("horizon")
        if drop_horizon and h and h.isdigit() and int(h) > 0:
            k = min(int(h), v.size)
            v, dropped = v[: v.size - k], dropped + k
        out.append((att.get("series_name") or str(len(out)), v))
    if not in_data:
        raise SkipFile("no @data section")
    res.freq_label = freq_label(header.get("frequency"))
    res.counts["points_dropped_tsf_horizon"] += dropped
    if dropped:
        res.notes.append(f"last @horizon points of every series dropped ({dropped} points)")
    return out


def read_m4(res: FileResult, path: str, data: bytes) -> list:
    import pandas as pd

    res.dataset = "M4-" + stem(path).split("-")[0]
    df = pd.read_csv(io.BytesIO(data), dtype={0: str}, low_memory=False)
    ids = df.iloc[:, 0].astype(str).tolist()
    x = df.iloc[:, 1:].to_numpy(dtype=np.float64)
    return [(ids[i], x[i]) for i in range(x.shape[0])]


def read_m3(res: FileResult, path: str, data: bytes) -> list:
    import pandas as pd

    res.dataset = "M3"
    try:
        sheets = pd.read_excel(io.BytesIO(data), sheet_name=None)
    except ImportError as e:
        raise SkipFile(f"pandas cannot read .xls without an Excel engine ({str(e).splitlines()[0][:120]})") from None
    except Exception as e:  # noqa: BLE001
        raise SkipFile(f"unreadable workbook ({str(e)[:120]})") from None
    out = []
    for name, df in sheets.items():
        cols = [c for c in df.columns if str(c).strip().isdigit()]
        if not str(name).startswith("M3") or not cols:
            continue
        idc = df.columns[0]
        x = df[cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        out += [(f"{name}/{df[idc].iloc[i]}", x[i]) for i in range(x.shape[0])]
    if not out:
        raise SkipFile("no M3 sheet with numbered value columns")
    return out


_TIME_NAMES = {"date", "time", "timestamp", "datetime", "datetime_gmt", "month", "year", "quarter", "period", "t",
               "obs", "day", "week", "day_num", "invoicedate", "index"}
_LABEL_NAMES = {"label", "labels", "is_anomaly", "anomaly", "class", "target", "outlier"}
_ID_RE = re.compile(r"(^|[\s_])(id|ids|code|ticker|iso\d?)$|objectid|stockcode|country|region|firm|^type$", re.I)
_MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]


def read_table(res: FileResult, path: str, data: bytes) -> list:
    """A plain table: time column(s) + numeric columns, every numeric column one series. Identifier,
    text, label and anomaly-flag columns are not series; long/panel files are skipped."""
    import pandas as pd

    res.dataset = stem(path)
    try:
        df = pd.read_csv(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001
        raise SkipFile(f"not a plain CSV table ({str(e).strip().splitlines()[0][:100]})") from None
    if df.shape[0] == 0:
        raise SkipFile("empty table")
    names = {c: str(c).strip().lower() for c in df.columns}
    time_cols = [c for c in df.columns if names[c] in _TIME_NAMES or names[c].startswith("unnamed")]
    label_cols = [c for c in df.columns if names[c] in _LABEL_NAMES]
    rest = [c for c in df.columns if c not in time_cols and c not in label_cols]
    id_cols = [c for c in rest if _ID_RE.search(names[c])]
    text_cols = [c for c in rest if c not in id_cols and not pd.api.types.is_numeric_dtype(df[c])]
    if id_cols or text_cols:
        raise SkipFile(f"long/panel format: identifier/text column(s) {[str(c) for c in (id_cols + text_cols)][:4]}")
    if time_cols and len(df) > 1 and df[time_cols].duplicated().mean() > 0.05:
        raise SkipFile(f"long format: time column(s) {[str(c) for c in time_cols]} repeat")
    if set(_MONTHS) <= {str(c).strip().upper()[:3] for c in rest}:  # year x month matrix: flatten row-major
        mcols = sorted((c for c in rest if str(c).strip().upper()[:3] in _MONTHS),
                       key=lambda c: _MONTHS.index(str(c).strip().upper()[:3]))
        res.notes.append("year x month matrix flattened")
        return [("values", df[mcols].to_numpy(dtype=np.float64).reshape(-1))]
    if len(time_cols) == 1 and not pd.api.types.is_numeric_dtype(df[time_cols[0]]):
        with warnings.catch_warnings():  # e.g. '1974Q1' strings: deprecated, still parsed
            warnings.simplefilter("ignore")
            dates = pd.to_datetime(df[time_cols[0]], errors="coerce", format="mixed")
        if dates.notna().all() and not dates.is_monotonic_increasing:
            df = df.iloc[np.argsort(dates.to_numpy(), kind="stable")]
            res.counts["files_sorted_by_time"] += 1
            res.notes.append("rows sorted by time")
    if not rest:
        raise SkipFile("no numeric value column")
    return [(str(c), df[c].to_numpy(dtype=np.float64)) for c in rest]


_READERS = {"tslib": read_tslib, "pt": read_train_pt, "ucr": read_ucr, "ts": read_ts_file, "tsf": read_tsf,
            "m4": read_m4, "m3": read_m3, "table": read_table}


# ----------------------------------------------------------------------------- policies

def _hash01(sid: str) -> float:
    return int(hashlib.sha1(sid.encode()).hexdigest()[:15], 16) / float(16 ** 15)


def _segments(v: np.ndarray) -> list[np.ndarray]:
    fin = np.isfinite(v)
    idx = np.flatnonzero(np.diff(np.concatenate(([0], fin.view(np.int8), [0]))))
    return [v[a:b] for a, b in zip(idx[0::2], idx[1::2])]


def apply_policies(res: FileResult, cands: list, pol: Policy, freq: Optional[str]) -> None:
    c = res.counts
    for sid, v in cands:
        c["series_read"] += 1
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        nan = np.isnan(v)
        if nan.all():
            c["skipped_empty"] += 1
            continue
        first, last = int(np.argmax(~nan)), int(v.size - np.argmax(~nan[::-1]))
        v = v[first:last]  # leading/trailing NaN are padding, not gaps
        fin = v[~np.isnan(v)]
        if np.isinf(fin).any() or np.abs(fin).max() > pol.max_abs:
            c["skipped_nonfinite_or_huge"] += 1
            continue
        segs = [v] if not np.isnan(v).any() else _segments(v)
        if len(segs) > 1 or segs[0].size != v.size:
            c["split_at_nan"] += 1
            c["segments_from_nan_split"] += len(segs)
        for k, seg in enumerate(segs):
            if seg.size < pol.min_length:
                if pol.short == "skip":
                    c["skipped_short"] += 1
                    continue
                c["kept_short"] += 1
            seg32 = seg.astype(np.float32)
            if seg32.min() == seg32.max():
                c["skipped_constant"] += 1
                continue
            if pol.max_series_per_file and len(res.series) >= pol.max_series_per_file:
                c["skipped_cap"] += 1
                continue
            full = f"{res.rel}/{sid}" + (f"/seg{k}" if len(segs) > 1 else "")
            res.series.append((Series(full, seg32[None, :], source=res.dataset, freq=freq), _hash01(full)))
            c["series"] += 1
            c["points"] += seg.size


# ----------------------------------------------------------------------------- build

def default_shared() -> str:
    return os.path.normpath(os.path.join(REPO_ROOT, DEFAULT_SHARED))


def _resolve_shared(shared: Optional[str]) -> str:
    if not shared:
        return default_shared()
    return shared if os.path.isabs(shared) else os.path.normpath(os.path.join(REPO_ROOT, shared))


def _folder(rel: str) -> str:
    p = rel.split("/")
    return "/".join(p[:2]) if p[0] == "corpus" and len(p) > 2 else p[0]


def build_corpus(out: str, shared: Optional[str] = None, *, fmt: str = "parquet", val_fraction: float = 0.02,
                 min_length: int = 64, short: str = "skip", max_abs: float = 1e10, max_series_per_file: int = 0,
                 sources: Sequence[str] = (), storage_options: Optional[dict] = None, shard_mb: float = 64.0,
                 tsf_drop_horizon: bool = True, name: str = "foundation", progress: bool = True) -> dict:
    """Build the corpus at the fsspec URL `out`; returns the manifest plus `counts`, `card`, `build_seconds`."""
    from .convert import write_dataset

    t0 = time.time()
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    pol = Policy(val_fraction, min_length, short, max_abs, max_series_per_file, tsf_drop_horizon)
    pol.check()
    for s in sources:
        guard(s)
    root = _resolve_shared(shared)
    if not os.path.isdir(root):
        raise DataError(f"shared data folder {root} not found (--shared)")
    meta = load_meta(root)
    use, excluded = discover(root, sources)
    if not use:
        raise DataError(f"{root}: no usable input files" + (f" match {list(sources)}" if sources else ""))
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)

    results: list[FileResult] = []
    fold_stats: dict[str, list] = {}
    for j, (rel, kind) in enumerate(use):
        folder = _folder(rel)
        st = fold_stats.setdefault(folder, [0, 0, 0.0])
        t1 = time.time()
        md = _meta_for(meta, rel)
        res = FileResult(rel, kind, stem(rel), freq_label(md.get("frequency")))
        path = os.path.join(root, rel)
        guard(path)
        try:
            data = _load(path)
            reader = _READERS[kind]
            cands = reader(res, path, data, pol.tsf_drop_horizon) if kind == "tsf" else reader(res, path, data)
            if "realAdExchange" in rel:
                res.freq_label = "hourly"
            elif "nyc_taxi" in rel:
                res.freq_label = "30min"
            apply_policies(res, cands, pol, _ALIAS.get(res.freq_label))
            if not res.series:
                res.skipped = "no series left after the policies"
        except SkipFile as e:
            res.skipped = str(e)
        except (DataError, ValueError, OSError) as e:
            res.skipped = f"unreadable ({type(e).__name__}: {str(e)[:120]})"
        results.append(res)
        st[0] += res.counts["series"]
        st[1] += res.counts["points"]
        st[2] += time.time() - t1
        if j + 1 == len(use) or _folder(use[j + 1][0]) != folder:
            say(f"[corpus] {folder}: {st[0]} series, {st[1]} points, {st[2]:.1f}s")

    # validation hold-out by hash; at least one val (and one train) series when there are >= 2
    allser = [(h, fi, si) for fi, r in enumerate(results) for si, (_, h) in enumerate(r.series)]
    split_of = {(fi, si): ("val" if h < pol.val_fraction else "train") for h, fi, si in allser}
    if len(allser) >= 2:
        if not any(v == "val" for v in split_of.values()):
            _, fi, si = min(allser)
            split_of[(fi, si)] = "val"
        if not any(v == "train" for v in split_of.values()):
            _, fi, si = max(allser)
            split_of[(fi, si)] = "train"

    raws: list[RawInput] = []
    for fi, r in enumerate(results):
        for split in ("train", "val"):
            ser = [s for si, (s, _) in enumerate(r.series) if split_of[(fi, si)] == split]
            if ser:
                r.counts[f"{split}_series"] += len(ser)
                r.counts[f"{split}_points"] += sum(s.values.size for s in ser)
                raws.append(RawInput(r.rel, r.dataset, ser, split=split,
                                     raw=hashlib.sha256(f"{r.rel}:{split}".encode()).digest() +
                                     hashlib.sha256(b"".join(s.values.tobytes() for s in ser)).digest()))
    if not raws:
        raise DataError("no series survived the policies; nothing to write")
    say(f"[corpus] writing {sum(len(r.series) for r in raws)} series ({len(raws)} inputs) to {out}")
    t1 = time.time()
    manifest = write_dataset(raws, out, fmt, name=name, shard_mb=shard_mb, storage_options=storage_options,
                             progress=False, max_abs=pol.max_abs)  # the builder already applied its own limit
    say(f"[corpus] wrote {len(manifest['shards'])} shards in {time.time() - t1:.1f}s")

    card = make_card(results, excluded, manifest, pol, root, meta, fmt, name)
    out = out.rstrip("/")
    _fs.atomic_write(f"{out}/data_card.json", json.dumps(card, indent=1, sort_keys=True).encode(), storage_options)
    _fs.atomic_write(f"{out}/DATA_CARD.md", render_card(card).encode(), storage_options)
    result = dict(manifest)
    result["counts"] = card["counts"]
    result["card"] = card
    result["build_seconds"] = round(time.time() - t0, 2)
    say(f"[corpus] done: {card['totals']['series']} series, {card['totals']['points']} points, "
        f"{result['build_seconds']:.1f}s")
    return result


# ----------------------------------------------------------------------------- data card

_REASONS = {
    "skipped_short": "shorter than --min-length (policy skip)",
    "skipped_nonfinite_or_huge": "inf or |x| > --max-abs",
    "skipped_constant": "constant (std == 0)",
    "skipped_empty": "all missing",
    "skipped_cap": "over --max-series-per-file",
}


COUNT_KEYS = ("series_read", "series", "points", "train_series", "train_points", "val_series", "val_points",
              "split_at_nan", "segments_from_nan_split", "kept_short", "points_dropped_tsf_horizon",
              "files_sorted_by_time")


def _top(c: Counter, n: int = 5) -> list:
    return [[f, k] for f, k in sorted(c.items(), key=lambda x: (-x[1], x[0]))[:n]]


def make_card(results: list[FileResult], excluded: list, manifest: dict, pol: Policy, root: str, meta: dict,
              fmt: str, name: str) -> dict:
    counts: Counter = Counter()
    per = {k: defaultdict(lambda: {"series": 0, "points": 0, "files": 0}) for k in ("domain", "frequency", "folder")}
    top: dict[str, Counter] = defaultdict(Counter)
    sources, skipped_files = [], []
    for r in results:
        counts.update(r.counts)
        md = _meta_for(meta, r.rel)
        dom = domain_label(md.get("domain"))
        if r.skipped:
            skipped_files.append({"file": r.rel, "reason": r.skipped})
        for k in _REASONS:
            if r.counts[k]:
                top[k][r.rel] += r.counts[k]
        if r.counts["split_at_nan"]:
            top["split_at_nan"][r.rel] += r.counts["split_at_nan"]
        if r.counts["series"]:
            for key, val in (("domain", dom), ("frequency", r.freq_label), ("folder", _folder(r.rel))):
                e = per[key][val]
                e["series"] += r.counts["series"]
                e["points"] += r.counts["points"]
                e["files"] += 1
        sources.append({"file": r.rel, "dataset": r.dataset, "reader": r.kind, "domain": dom,
                        "domain_raw": md.get("domain", ""), "frequency": r.freq_label,
                        "frequency_raw": md.get("frequency", ""), "licence": md.get("licence") or "unknown",
                        "origin": md.get("origin", ""), "shape_raw": md.get("shape", ""),
                        "series": r.counts["series"], "points": r.counts["points"],
                        "val_series": r.counts["val_series"], "skipped": r.skipped,
                        "notes": r.notes,
                        "counts": {k: v for k, v in sorted(r.counts.items()) if v and k not in ("series", "points")}})
    used = [s for s in sources if s["series"]]
    card = {
        "name": name, "format": fmt, "created_by": "python -m data_pipeline.corpus",
        # where the inputs were, relative to the repository when inside or beside it (no machine paths)
        "shared_root": os.path.relpath(os.path.normpath(root), REPO_ROOT).replace(os.sep, "/"),
        "policies": {"val_fraction": pol.val_fraction, "val_rule": "sha1(series id) < val_fraction",
                     "min_length": pol.min_length, "short": pol.short, "max_abs": pol.max_abs,
                     "max_series_per_file": pol.max_series_per_file, "tsf_drop_horizon": pol.tsf_drop_horizon,
                     "nan": "leading/trailing NaN trimmed; series split at inner NaN runs into finite segments",
                     "dtype": "float32, univariate", "normalisation": "none stored: use data.normalize=false "
                     "data.series_norm=true data.channels=independent"},
        "totals": {"series": counts["series"], "points": counts["points"],
                   "train": {"series": counts["train_series"], "points": counts["train_points"]},
                   "val": {"series": counts["val_series"], "points": counts["val_points"]},
                   "files_used": len(used), "files_read_but_skipped": len(skipped_files),
                   "files_not_read": len(excluded), "shards": len(manifest["shards"]),
                   "shard_bytes": sum(s["bytes"] for s in manifest["shards"])},
        "counts": {k: counts[k] for k in sorted(set(counts) | set(_REASONS) | set(COUNT_KEYS))},
        "per_domain": {k: v for k, v in sorted(per["domain"].items())},
        "per_frequency": {k: v for k, v in sorted(per["frequency"].items())},
        "per_folder": {k: v for k, v in sorted(per["folder"].items())},
        "skipped_series": {k: {"count": counts[k], "why": _REASONS[k],
                               "top_files": _top(top[k])}
                           for k in _REASONS},
        "split_at_nan": {"series": counts["split_at_nan"], "segments": counts["segments_from_nan_split"],
                         "top_files": _top(top["split_at_nan"])},
        "skipped_files": skipped_files,
        "not_read": [{"file": f, "reason": w} for f, w in excluded],
        "not_read_by_reason": dict(sorted(Counter(w for _, w in excluded).items())),
        "hard_exclusions": "ETTh2, ETTm2 and weather are refused by name (ForbiddenSourceError); "
                           "UCR/UEA/TSER/M4 test files, classification val/test .pt and TSLib val/test rows are "
                           "never read; Monash .tsf test horizons (@horizon) are dropped",
        "caveats": ["cif_2016: 48 of 72 series are artificial (per the file header)",
                    "UCR UWaveGestureLibraryX/Y/Z (TRAIN) come from the same uWave recordings as TF-C Gesture",
                    "m4_hourly_dataset.tsf is not read: same series as m4_official/Hourly-train.csv"],
        "manifest": {"content_hash": manifest["content_hash"], "samples": manifest["samples"],
                     "points": manifest["points"], "splits": manifest["splits"]},
        "sources": sources,
    }
    return card


def render_card(card: dict) -> str:
    t = card["totals"]
    L = [f"# Data card: {card['name']} (SimMTM pre-training corpus)", "",
         f"Built by `{card['created_by']}` from `{card['shared_root']}/`; {card['format']} shards + `manifest.json` "
         "in this folder. Every record is one univariate float32 series; z-score per series when training "
         "(`data.normalize=false data.series_norm=true data.channels=independent`).", "",
         "## Totals", "",
         f"- series: **{t['series']:,}**, points: **{t['points']:,}**",
         f"- train: {t['train']['series']:,} series / {t['train']['points']:,} points; "
         f"val (hold-out, {card['policies']['val_rule']}, fraction {card['policies']['val_fraction']}): "
         f"{t['val']['series']:,} series / {t['val']['points']:,} points",
         f"- files used: {t['files_used']}, read but skipped: {t['files_read_but_skipped']}, "
         f"not read: {t['files_not_read']}; shards: {t['shards']} ({t['shard_bytes'] / 2**20:.1f} MiB)",
         f"- content hash: `{card['manifest']['content_hash']}`", "",
         "## Policies", ""]
    L += [f"- {k}: {v}" for k, v in card["policies"].items()]
    L += ["", f"Hard exclusions: {card['hard_exclusions']}.", ""]
    for title, key in (("Per domain", "per_domain"), ("Per frequency", "per_frequency"), ("Per folder", "per_folder")):
        L += [f"## {title}", "", "| | series | points | files |", "|---|---:|---:|---:|"]
        L += [f"| {k} | {v['series']:,} | {v['points']:,} | {v['files']} |" for k, v in card[key].items()]
        L += [""]
    L += ["## Skipped and split series", "", "| what | count | top files |", "|---|---:|---|"]
    for k, v in card["skipped_series"].items():
        L.append(f"| {k}: {v['why']} | {v['count']:,} | " + ", ".join(f"{f} ({n})" for f, n in v["top_files"]) + " |")
    s = card["split_at_nan"]
    L.append(f"| split_at_nan: series split at inner NaN runs ({s['segments']:,} segments) | {s['series']:,} | "
             + ", ".join(f"{f} ({n})" for f, n in s["top_files"]) + " |")
    c = card["counts"]
    L += ["", f"Also: series read {c.get('series_read', 0):,}; short segments kept (policy pad) "
          f"{c.get('kept_short', 0):,}; Monash test-horizon points dropped {c.get('points_dropped_tsf_horizon', 0):,}; "
          f"tables re-sorted by time {c.get('files_sorted_by_time', 0)}.", ""]
    L += ["## Files read but skipped", "", "| file | reason |", "|---|---|"]
    L += [f"| {d['file']} | {d['reason']} |" for d in card["skipped_files"]] or ["| (none) | |"]
    L += ["", "## Files not read (by reason)", ""]
    L += [f"- {w}: {n}" for w, n in card["not_read_by_reason"].items()]
    L += ["", "## Caveats", ""] + [f"- {x}" for x in card["caveats"]]
    L += ["", "## Sources", "", "| file | domain | frequency | licence | series | points | notes |",
          "|---|---|---|---|---:|---:|---|"]
    for src in card["sources"]:
        if src["series"]:
            L.append(f"| {src['file']} | {src['domain']} | {src['frequency']} | {src['licence']} | "
                     f"{src['series']:,} | {src['points']:,} | {'; '.join(src['notes'])} |")
    L += ["", "Full per-file counts and upstream origins: `data_card.json`.", ""]
    return "\n".join(L)


# ----------------------------------------------------------------------------- CLI

def main(argv: Optional[Sequence[str]] = None) -> int:
    from .convert import _parse_options

    from trainer.cli import DEBUG_EPILOG

    p = argparse.ArgumentParser(prog="python -m data_pipeline.corpus", description=__doc__.split("\n\n")[0],
                                epilog=DEBUG_EPILOG)
    p.add_argument("--out", required=True, help="output folder URL (local path, s3://bucket/prefix, memory://...)")
    p.add_argument("--shared", default=None, 
                   help=f"shared data root (default {DEFAULT_SHARED}, relative to the repo root)")
    p.add_argument("--format", default="parquet", choices=FORMATS)
    p.add_argument("--name", default="foundation")
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--min-length", type=int, default=64)
    p.add_argument("--short", default="skip", choices=["skip", "pad"])
    p.add_argument("--max-abs", type=float, default=1e10)
    p.add_argument("--max-series-per-file", type=int, default=0, help="0: no cap (else the first N per file)")
    p.add_argument("--keep-tsf-horizon", action="store_true", help="keep the Monash test horizon points")
    p.add_argument("--shard-mb", type=float, default=64.0)
    p.add_argument("--sources", nargs="*", default=[], metavar="GLOB",
                   help="only files whose path relative to --shared matches one of these globs")
    p.add_argument("-o", "--storage-option", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    try:
        m = build_corpus(a.out, a.shared, fmt=a.format, val_fraction=a.val_fraction, min_length=a.min_length,
                         short=a.short, max_abs=a.max_abs, max_series_per_file=a.max_series_per_file,
                         sources=a.sources, storage_options=_parse_options(a.storage_option), shard_mb=a.shard_mb,
                         tsf_drop_horizon=not a.keep_tsf_horizon, name=a.name)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = m["card"]["totals"]
    print(f"{m['_url']}: {len(m['shards'])} shard(s), {t['series']} series ({t['val']['series']} val), "
          f"{t['points']} points, {m['build_seconds']:.1f}s, content_hash {m['content_hash'][:16]}")
    return 0


if __name__ == "__main__":
    from trainer import cli

    sys.exit(cli.run(main))
