"""Convert raw series files into shards + a manifest; also the `python -m data_pipeline.convert` CLI.

    python -m data_pipeline.convert data/ETTh1.csv --out data/shards/ETTh1 --format parquet
    python -m data_pipeline.convert ../shared/data/classification/Gesture/{train,val,test}.pt \
        --out s3://bucket/gesture --format webdataset -o endpoint_url=http://127.0.0.1:5000

Shards never mix input files, so a shard's split tag / time borders are those of its file.
Conversion is deterministic (same inputs -> byte-identical shards), which makes concurrent
"convert on first use" by several ranks harmless.
"""
from __future__ import annotations

import argparse
import hashlib
import posixpath
import sys
from typing import Iterable, Optional, Sequence

import numpy as np

from . import fs as _fs
from .errors import DataError
from .readers import RawInput, is_raw, read_input, stem
from .shards import (FORMATS, SUFFIX, ChannelStats, Series, encode, make_manifest, shard_entry,
                     write_manifest)

DEFAULT_SHARD_MB = 64.0
# |x| beyond this is refused by default: such a value (a sentinel like 1e30, a unit error) swamps the
# per-channel mean/std and flattens every other series' normalisation. 0 (or inf) disables the check.
DEFAULT_MAX_ABS = 1e10


def _train_part(raw: RawInput, s: Series) -> Optional[np.ndarray]:
    if raw.borders is not None:
        a, b = raw.borders["train"]
        return s.values[:, a:b]
    if raw.split in (None, "train"):
        return s.values
    return None


def _check_finite(raw: RawInput, s: Series) -> None:
    if s.values.shape[1] == 0:
        raise DataError(f"{raw.path}: series {s.id!r} has no points")
    bad = int(s.values.size - np.count_nonzero(np.isfinite(s.values)))
    if bad:
        raise DataError(f"{raw.path}: series {s.id!r} has {bad} NaN/inf value(s); clean the input or pass "
                        f"--allow-nonfinite (the stream then errors or skips it per data.on_bad_sample)")


def _check_magnitude(raw: RawInput, s: Series, max_abs: float) -> None:
    if max_abs is None or max_abs == 0 or not np.isfinite(max_abs):
        return
    v = s.values
    big = np.isfinite(v) & (np.abs(v) > max_abs)
    n = int(np.count_nonzero(big))
    if n:
        a = np.where(big, np.abs(v), 0)
        c, t = np.unravel_index(int(np.argmax(a)), v.shape)
        raise DataError(f"{raw.path}: series {s.id!r} has {n} value(s) beyond +-{max_abs:g} (largest "
                        f"{float(v[c, t]):.6g} in channel {int(c)}, row {int(t)}); values that large swamp the "
                        f"normalisation statistics: clean the input, or raise the limit (--max-abs, "
                        f"max_abs=...; 0 disables the check)")


def _pack(series: Sequence[Series], shard_mb: float, shard_samples: int) -> Iterable[list[Series]]:
    limit = max(1, int(shard_mb * 2**20)) if shard_mb > 0 else None
    cur: list[Series] = []
    size = 0
    for s in series:
        if cur and ((limit is not None and size + s.values.nbytes > limit) or
                    (shard_samples > 0 and len(cur) >= shard_samples)):
            yield cur
            cur, size = [], 0
        cur.append(s)
        size += s.values.nbytes
    if cur:
        yield cur


def convert(inputs: str | Sequence[str], out: str, fmt: str = "parquet", *, name: Optional[str] = None,
            shard_mb: float = DEFAULT_SHARD_MB, shard_samples: int = 0, borders: str = "auto",
            layout: str = "auto", storage_options: Optional[dict] = None, progress: bool = True,
            allow_nonfinite: bool = False, retries: int = 3, max_abs: float = DEFAULT_MAX_ABS) -> dict:
    """Convert input files to `fmt` shards under the fsspec URL `out`; returns the manifest.

    A shard closes before it would exceed `shard_mb` MB of float32 values or `shard_samples` series
    (0 disables a limit; a single larger series gets a shard of its own). Per-channel statistics are
    fitted on the training part only: the train rows of time-split files, `train` files of
    file-split sets, everything for unsplit corpora. A finite value with |x| > `max_abs` is refused
    with an error naming the file and series (0 disables the check).
    """
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs:
        raise DataError("no inputs to convert")
    raws = [read_input(p, storage_options, borders=borders, layout=layout, retries=retries) for p in inputs]
    return write_dataset(raws, out, fmt, name=name, shard_mb=shard_mb, shard_samples=shard_samples,
                         storage_options=storage_options, progress=progress, allow_nonfinite=allow_nonfinite,
                         max_abs=max_abs)


def write_series(series: Sequence[Series], out: str, fmt: str = "parquet", *, name: str = "series",
                 split: Optional[str] = None, borders: Optional[dict] = None, **kw) -> dict:
    """Shard in-memory `Series` records (one input: one split tag or one set of time borders)."""
    raw = RawInput(name, name, list(series), split=split, borders=borders)
    return write_dataset([raw], out, fmt, name=name, **kw)


def write_dataset(raws: Sequence[RawInput], out: str, fmt: str = "parquet", *, name: Optional[str] = None,
                  shard_mb: float = DEFAULT_SHARD_MB, shard_samples: int = 0,
                  storage_options: Optional[dict] = None, progress: bool = True,
                  allow_nonfinite: bool = False, max_abs: float = DEFAULT_MAX_ABS) -> dict:
    from tqdm.auto import tqdm

    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    if max_abs is not None and not max_abs >= 0:
        raise DataError(f"max_abs must be >= 0 (0 disables the magnitude check), got {max_abs}")
    name = name or raws[0].name
    out = out.rstrip("/")
    stats, hetero = ChannelStats(), False
    shards: list[dict] = []
    src_hash = hashlib.sha256()
    bar = tqdm(total=sum(len(r.series) for r in raws), desc=f"convert {name}", unit="series",
               disable=not progress, file=sys.stderr)
    n_written = 0
    for raw in raws:
        src_hash.update(hashlib.sha256(raw.raw).digest())
        for s in raw.series:
            if not allow_nonfinite:
                _check_finite(raw, s)
            _check_magnitude(raw, s, max_abs)
            part = _train_part(raw, s)
            if part is not None and not hetero:
                try:
                    stats.add(part[:, np.isfinite(part).all(axis=0)] if allow_nonfinite else part)
                except DataError:
                    hetero = True  # channel counts differ: per-channel stats are meaningless
        for group in _pack(raw.series, shard_mb, shard_samples):
            fname = f"{raw.split or 'data'}-{len(shards):05d}{SUFFIX[fmt]}"
            data = encode(group, fmt, first_index=n_written)
            _fs.atomic_write(f"{out}/{fname}", data, storage_options)
            entry = shard_entry(fname, group, data, raw.split)
            if raw.borders is not None:
                entry["borders"] = raw.borders
            shards.append(entry)
            n_written += len(group)
            bar.update(len(group))
            bar.set_postfix(shards=len(shards))
    bar.close()
    if not shards:
        raise DataError(f"{name}: no series to write")
    if any(r.borders for r in raws):
        where = "train rows " + ", ".join(f"{r.name} {r.borders['train']}" for r in raws if r.borders)
    else:
        where = "train split" if any(r.split for r in raws) else "all series"
    available: set[str] = set()
    for r in raws:
        available |= set(r.borders) if r.borders else {r.split or "train"}
    freqs = {r.freq for r in raws}
    manifest = make_manifest(
        name, fmt, shards,
        splits={"by": sorted({"rows" if r.borders else "file" if r.split else "none" for r in raws}),
                "available": [s for s in ("train", "val", "test") if s in available]},
        stats=None if hetero else stats.to_dict(where),
        channel_names=raws[0].channel_names if len(raws) == 1 else None,
        freq=freqs.pop() if len(freqs) == 1 else None,
        source={"files": [posixpath.basename(r.path) for r in raws], "sha256": src_hash.hexdigest()})
    url = f"{out}/manifest.json"
    write_manifest(url, manifest, storage_options)  # last: its presence marks a complete conversion
    _fs.invalidate(url, storage_options)
    manifest["_url"] = url
    return manifest


def convert_csv(path: str, out: str, fmt: str = "parquet", **kw) -> dict:
    """TSLib-style CSV (date column + channels) with the spec's train/val/test borders."""
    return convert([path], out, fmt, **kw)


def convert_pt(paths: str | Sequence[str], out: str, fmt: str = "parquet", **kw) -> dict:
    """TF-C classification files: dicts of `samples` [N, C, L] and `labels` [N]."""
    return convert(paths, out, fmt, **kw)


def convert_numpy(paths: str | Sequence[str], out: str, fmt: str = "parquet", **kw) -> dict:
    """`.npy` ([N, C, L], [N, L], [T]) or `.npz` (`samples`/`x` + optional `labels`/`y`)."""
    return convert(paths, out, fmt, **kw)


def convert_tsv(paths: str | Sequence[str], out: str, fmt: str = "parquet", **kw) -> dict:
    """UCR archive `.tsv` files (`*_TRAIN.tsv`, `*_TEST.tsv`)."""
    return convert(paths, out, fmt, **kw)


def ensure_converted(source: str, cache_dir: str, fmt: str = "parquet", storage_options: Optional[dict] = None,
                     retries: int = 3, progress: bool = False,
                     timeout: Optional[float] = _fs.DEFAULT_IO_TIMEOUT) -> str:
    """Convert a raw file on first use; returns the manifest URL.

    The cache key is the file's content hash: `cache_dir/<name>/<sha256[:16]>-<format>/`, so an edited
    CSV converts afresh and never streams stale shards.
    """
    if not is_raw(source):
        raise DataError(f"{source}: not a raw input file")
    try:
        data = _fs.read_bytes(source, storage_options, retries=retries, timeout=timeout)
    except FileNotFoundError:
        raise DataError(f"data.source {source}: file not found") from None
    except OSError as e:
        raise DataError(f"data.source {e}" if str(e).startswith(source) else f"data.source {source}: {e}") from None
    key = hashlib.sha256(data).hexdigest()[:16]
    out = f"{cache_dir.rstrip('/')}/{stem(source)}/{key}-{fmt}"
    url = f"{out}/manifest.json"
    if _fs.exists(url, storage_options, timeout):
        return url
    convert([source], out, fmt, storage_options=storage_options, progress=progress, retries=retries)
    return url


def _parse_options(items: Sequence[str]) -> dict:
    import yaml

    opts: dict = {}
    for it in items:
        if "=" not in it:
            raise SystemExit(f"--storage-option {it!r}: expected key=value")
        k, v = it.split("=", 1)
        node = opts
        parts = k.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(v)
    return opts


def main(argv: Optional[Sequence[str]] = None) -> int:
    from trainer.cli import DEBUG_EPILOG

    p = argparse.ArgumentParser(prog="python -m data_pipeline.convert", description=__doc__.split("\n\n")[0],
                                epilog=DEBUG_EPILOG)
    p.add_argument("inputs", nargs="+", help="input files: .csv, .pt, .npy, .npz, .tsv, .ts (local or fsspec URLs)")
    p.add_argument("--out", required=True, help="output folder URL (local path, s3://bucket/prefix, memory://...)")
    p.add_argument("--format", default="parquet", choices=FORMATS)
    p.add_argument("--name", default=None, help="data set name (default: from the first input)")
    p.add_argument("--shard-mb", type=float, default=DEFAULT_SHARD_MB, help="target shard size in MB of values")
    p.add_argument("--shard-samples", type=int, default=0, help="max series per shard (0: no limit)")
    p.add_argument("--borders", default="auto", choices=["auto", "ett-hour", "ett-minute", "ratio", "none"],
                   help="train/val/test time borders for CSVs (auto: ETTh*/ETTm* by name, else 70/10/20)")
    p.add_argument("--layout", default="auto", choices=["auto", "tc"],
                   help="npy/npz layout: auto ([N,C,L], [N,L], [T]) or tc (one [time, channels] series)")
    p.add_argument("--allow-nonfinite", action="store_true", help="keep NaN/inf (the stream handles them)")
    p.add_argument("--max-abs", type=float, default=DEFAULT_MAX_ABS,
                   help="refuse finite values with |x| above this (default 1e10; 0 disables)")
    p.add_argument("-o", "--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec storage option, repeatable (e.g. endpoint_url=http://host:9000, "
                        "client_kwargs.region_name=us-east-1)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        m = convert(a.inputs, a.out, a.format, name=a.name, shard_mb=a.shard_mb, shard_samples=a.shard_samples,
                    borders=a.borders, layout=a.layout, storage_options=_parse_options(a.storage_option),
                    progress=not a.no_progress, allow_nonfinite=a.allow_nonfinite, max_abs=a.max_abs)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{m['_url']}: {len(m['shards'])} shard(s), {m['samples']} series, {m['points']} values, "
          f"content_hash {m['content_hash'][:16]}")
    return 0


if __name__ == "__main__":
    from trainer import cli

    sys.exit(cli.run(main))
