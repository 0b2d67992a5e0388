"""Shard formats (Parquet, WebDataset) and the per-data-set manifest; see README.md for the spec.

Both formats hold one record per *series* (multivariate, variable length), never per window: the
window length is a training-time choice, so shards stay reusable across L, stride and splits.
Decoding is zero-copy where the format allows it: the Parquet list<float32> child buffer and the
tar member bytes are viewed by numpy, not copied.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import fs as _fs
from .errors import DataError, shard_error

MANIFEST_VERSION = 1
FORMATS = ("parquet", "webdataset")
SUFFIX = {"parquet": ".parquet", "webdataset": ".tar"}

PARQUET_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("values", pa.list_(pa.float32()), nullable=False),  # C*T, channel-major
    pa.field("n_channels", pa.int32(), nullable=False),
    pa.field("length", pa.int64(), nullable=False),
    pa.field("source", pa.string()),
    pa.field("freq", pa.string()),
    pa.field("start", pa.string()),  # ISO-8601 timestamp of the first point, where known
    pa.field("label", pa.int64()),  # class label of classification sets
])
_REQUIRED = {"id": pa.string(), "values": pa.list_(pa.float32()), "n_channels": None, "length": None}


@dataclass
class Series:
    """One record: a [C, T] float32 array plus its metadata."""
    id: str
    values: np.ndarray
    source: str = ""
    freq: Optional[str] = None
    start: Optional[str] = None
    label: Optional[int] = None
    split: Optional[str] = None  # train/val/test for data sets split by file (TF-C, UCR); not stored per row

    def __post_init__(self) -> None:
        v = np.asarray(self.values)
        if v.ndim == 1:
            v = v[None, :]
        if v.ndim != 2:
            raise DataError(f"series {self.id!r}: expected [C, T] values, got shape {v.shape}")
        self.values = np.ascontiguousarray(v, dtype=np.float32)


@dataclass
class ShardData:
    """A decoded shard: per-series [C, T] float32 views into the shard's buffers."""
    url: str
    ids: list[str]
    arrays: list[np.ndarray]
    labels: list[Optional[int]] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.arrays)


# ----------------------------------------------------------------------------- encode

def encode_parquet(records: list[Series]) -> bytes:
    flat = np.concatenate([r.values.reshape(-1) for r in records]) if records else np.zeros(0, np.float32)
    offsets = np.zeros(len(records) + 1, dtype=np.int32)
    np.cumsum([r.values.size for r in records], out=offsets[1:])
    if offsets[-1] != flat.size or flat.size >= 2**31:
        raise DataError("a Parquet shard holds < 2**31 values; lower the shard size")
    values = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.float32()))
    table = pa.Table.from_arrays([
        pa.array([r.id for r in records], pa.string()),
        values,
        pa.array([r.values.shape[0] for r in records], pa.int32()),
        pa.array([r.values.shape[1] for r in records], pa.int64()),
        pa.array([r.source for r in records], pa.string()),
        pa.array([r.freq for r in records], pa.string()),
        pa.array([r.start for r in records], pa.string()),
        pa.array([r.label for r in records], pa.int64()),
    ], schema=PARQUET_SCHEMA)
    buf = io.BytesIO()
    # byte-stream-split + zstd compresses float series well and decodes fast; one row group per shard.
    pq.write_table(table, buf, compression="zstd", use_byte_stream_split=["values"],
                   use_dictionary=["source", "freq"], row_group_size=max(1, len(records)))
    return buf.getvalue()


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a, dtype="<f4"), allow_pickle=False)
    return buf.getvalue()


def encode_webdataset(records: list[Series], first_index: int = 0) -> bytes:
    """Tar of `<key>.npy` + `<key>.json` pairs; fixed mtime/owner so conversion is byte-reproducible."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for i, r in enumerate(records):
            key = f"{first_index + i:09d}"
            meta = {"id": r.id, "n_channels": int(r.values.shape[0]), "length": int(r.values.shape[1]),
                    "source": r.source, "freq": r.freq, "start": r.start, "label": r.label}
            for name, payload in ((f"{key}.npy", _npy_bytes(r.values)),
                                  (f"{key}.json", json.dumps(meta, sort_keys=True).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def encode(records: list[Series], fmt: str, first_index: int = 0) -> bytes:
    if fmt == "parquet":
        return encode_parquet(records)
    if fmt == "webdataset":
        return encode_webdataset(records, first_index)
    raise DataError(f"unknown shard format {fmt!r} (known: {', '.join(FORMATS)})")


# ----------------------------------------------------------------------------- decode

def decode_parquet(url: str, data: bytes) -> ShardData:
    try:
        table = pq.ParquetFile(pa.BufferReader(data)).read()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for damaged files
        raise shard_error(url, f"corrupt or truncated Parquet file ({type(e).__name__}: {e})") from None
    schema = table.schema
    for name, tp in _REQUIRED.items():
        if name not in schema.names:
            raise shard_error(url, f"wrong schema: missing column {name!r} (has {schema.names}); "
                                   f"expected {PARQUET_SCHEMA.names}")
        got = schema.field(name).type
        if tp is not None and not got.equals(tp):
            raise shard_error(url, f"wrong schema: column {name!r} is {got}, expected {tp}")
        if tp is None and not pa.types.is_integer(got):
            raise shard_error(url, f"wrong schema: column {name!r} is {got}, expected an integer")
    for name in ("id", "n_channels", "length"):
        nulls = table.column(name).null_count
        if nulls:
            raise shard_error(url, f"{nulls} row(s) with a null {name!r}")
    ids = table.column("id").to_pylist()
    n_ch = table.column("n_channels").to_numpy()
    lengths = table.column("length").to_numpy()
    labels = table.column("label").to_pylist() if "label" in schema.names else [None] * len(ids)
    arrays: list[np.ndarray] = []
    row = 0
    for chunk in table.column("values").chunks:
        if chunk.null_count:
            raise shard_error(url, f"{chunk.null_count} row(s) with a null 'values' list")
        offsets = chunk.offsets.to_numpy()
        try:
            flat = chunk.values.to_numpy(zero_copy_only=True)  # the float32 child buffer, not a copy
        except pa.ArrowInvalid:
            raise shard_error(url, "null entries inside 'values'") from None
        for i in range(len(chunk)):
            seg = flat[offsets[i]:offsets[i + 1]]
            c, t = int(n_ch[row]), int(lengths[row])
            if c < 1 or c * t != seg.size:
                raise shard_error(url, f"series {ids[row]!r}: n_channels x length = {c} x {t} "
                                       f"does not match {seg.size} values")
            arrays.append(seg.reshape(c, t))
            row += 1
    return ShardData(url, ids, arrays, labels)


# numpy parses .npy headers with ast.literal_eval, and CPython 3.11's AST conversion is not thread-safe
# ("SystemError: AST constructor recursion depth mismatch" when read-ahead threads decode at once, seen
# in CI on 3.11.7): one header at a time. Headers are ~100 bytes; the array itself stays zero-copy.
_NPY_HEADER_LOCK = threading.Lock()


def _parse_npy(url: str, key: str, data: bytes, offset: int, size: int) -> np.ndarray:
    head = io.BytesIO(data[offset:offset + min(size, 4096)])
    try:
        with _NPY_HEADER_LOCK:
            version = np.lib.format.read_magic(head)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(head)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(head)
    except Exception as e:  # noqa: BLE001
        raise shard_error(url, f"{key}.npy: not a valid .npy ({e})") from None
    if dtype != np.dtype("<f4") or fortran or len(shape) != 2:
        raise shard_error(url, f"{key}.npy: expected a C-order float32 [channels, time] array, "
                               f"got {dtype} {'F-order ' if fortran else ''}shape {shape}")
    count = int(np.prod(shape))
    start = offset + head.tell()
    if start + 4 * count > offset + size:
        raise shard_error(url, f"{key}.npy: truncated ({size} bytes for shape {shape})")
    return np.frombuffer(data, dtype="<f4", count=count, offset=start).reshape(shape)  # zero-copy view


def decode_webdataset(url: str, data: bytes) -> ShardData:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            members = tf.getmembers()
    except tarfile.TarError as e:
        raise shard_error(url, f"corrupt or truncated tar file ({e})") from None
    end = max((m.offset_data + -(-m.size // 512) * 512 for m in members), default=0)
    if data[end:end + 1024] != bytes(1024):
        # tarfile stops quietly at a member boundary; a complete archive ends with two zero blocks
        raise shard_error(url, "corrupt or truncated tar file (no end-of-archive marker after the last member)")
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    order: list[str] = []
    for m in members:
        if not m.isfile():
            continue
        if m.offset_data + m.size > len(data):
            raise shard_error(url, f"truncated tar file: member {m.name} ends past the end of the data")
        # webdataset's rule: the key is the path up to the first dot of the basename
        base = m.name.rsplit("/", 1)[-1]
        if "." not in base:
            continue
        stem, ext = base.split(".", 1)
        key = m.name[:len(m.name) - len(base)] + stem
        if key not in groups:
            groups[key] = {}
            order.append(key)
        groups[key][ext] = m
    ids, arrays, labels, metas = [], [], [], []
    for key in order:
        g = groups[key]
        if "npy" not in g or "json" not in g:
            raise shard_error(url, f"sample {key!r}: expected {key}.npy and {key}.json, found "
                                   f"{sorted(key + '.' + e for e in g)}")
        try:
            meta = json.loads(data[g["json"].offset_data:g["json"].offset_data + g["json"].size])
        except ValueError as e:
            raise shard_error(url, f"{key}.json: invalid JSON ({e})") from None
        arr = _parse_npy(url, key, data, g["npy"].offset_data, g["npy"].size)
        ids.append(str(meta.get("id", key)))
        arrays.append(arr)
        labels.append(meta.get("label"))
        metas.append(meta)
    return ShardData(url, ids, arrays, labels, metas)


def decode(url: str, data: bytes, fmt: str) -> ShardData:
    if not data:
        raise shard_error(url, "empty shard (0 bytes)")
    shard = decode_parquet(url, data) if fmt == "parquet" else decode_webdataset(url, data)
    if len(shard) == 0:
        raise shard_error(url, "empty shard (no series)")
    return shard


def sniff_format(url: str) -> str:
    u = url.lower()
    if u.endswith(".parquet") or u.endswith(".pq"):
        return "parquet"
    if u.endswith(".tar"):
        return "webdataset"
    raise DataError(f"{url}: cannot tell the shard format from the name; set data.format")


# ----------------------------------------------------------------------------- statistics

class ChannelStats:
    """Per-channel mean/std (population, as sklearn's StandardScaler) merged series by series.

    Chan et al.'s parallel update keeps it exact in float64 even when mean >> std.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: Optional[np.ndarray] = None
        self.m2: Optional[np.ndarray] = None

    def add(self, x: np.ndarray) -> None:
        if x.shape[1] == 0:
            return
        x = x.astype(np.float64)
        nb, mb = x.shape[1], x.mean(axis=1)
        m2b = ((x - mb[:, None]) ** 2).sum(axis=1)
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        if mb.shape != self.mean.shape:
            raise DataError(f"channel count changed ({self.mean.shape[0]} -> {mb.shape[0]})")
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * nb / n
        self.m2 = self.m2 + m2b + delta ** 2 * self.n * nb / n
        self.n = n

    def to_dict(self, fitted_on: str) -> Optional[dict]:
        if self.mean is None:
            return None
        std = np.sqrt(self.m2 / self.n)
        std = np.where(std > 0, std, 1.0)  # constant channels: scale 1, like StandardScaler
        return {"mean": self.mean.tolist(), "std": std.tolist(), "points_per_channel": int(self.n),
                "fitted_on": fitted_on}


# ----------------------------------------------------------------------------- manifest

def rle_shapes(records: Iterable[Series]) -> list[list[int]]:
    """[[C, T, count], ...]: compact for fixed-length sets, exact for ragged ones."""
    out: list[list[int]] = []
    for r in records:
        c, t = r.values.shape
        if out and out[-1][0] == c and out[-1][1] == t:
            out[-1][2] += 1
        else:
            out.append([int(c), int(t), 1])
    return out


def expand_shapes(shapes: list) -> tuple[np.ndarray, np.ndarray]:
    """RLE shapes -> (channels, lengths) int64 arrays, one entry per series."""
    if not shapes:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    a = np.asarray(shapes, dtype=np.int64).reshape(-1, 3)
    return np.repeat(a[:, 0], a[:, 2]), np.repeat(a[:, 1], a[:, 2])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Fields that the hashes below do not cover: the hashes themselves, the writer's tag, in-memory `_` keys.
_UNHASHED = ("content_hash", "created_by", "header_hash", "shards_hash")
# Fields derived from the shard list (covered by shards_hash, not by header_hash).
_SHARD_FIELDS = ("shards", "samples", "points", "n_channels")


def _canonical_hash(obj: Any) -> str:
    return sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def content_hash(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k not in _UNHASHED and not k.startswith("_")}
    return _canonical_hash(body)


def header_hash(manifest: dict) -> str:
    """Hash of everything but the shard list: statistics, splits, channel names, format, source."""
    return _canonical_hash({k: v for k, v in manifest.items()
                            if k not in _UNHASHED and k not in _SHARD_FIELDS and not k.startswith("_")})


def shards_hash(manifest: dict) -> str:
    return _canonical_hash([manifest.get(k) for k in _SHARD_FIELDS])


def shard_entry(url: str, records: list[Series], data: bytes, split: Optional[str]) -> dict:
    return {"url": url, "split": split, "samples": len(records),
            "points": int(sum(r.values.size for r in records)), "shapes": rle_shapes(records),
            "bytes": len(data), "sha256": sha256(data)}


def make_manifest(name: str, fmt: str, shards: list[dict], *, splits: dict, stats: Optional[dict],
                  channel_names: Optional[list[str]] = None, freq: Optional[str] = None,
                  source: Optional[dict] = None) -> dict:
    chans = {c for s in shards for c, _, _ in s["shapes"]}
    m = {"format_version": MANIFEST_VERSION, "name": name, "format": fmt, "source": source,
         "channel_names": channel_names, "n_channels": chans.pop() if len(chans) == 1 else None,
         "freq": freq, "splits": splits, "stats": stats, "shards": shards,
         "samples": sum(s["samples"] for s in shards), "points": sum(s["points"] for s in shards)}
    m["content_hash"] = content_hash(m)
    m["header_hash"], m["shards_hash"] = header_hash(m), shards_hash(m)
    m["created_by"] = "data_pipeline.convert"
    return m


_HEX64 = re.compile(r"[0-9a-f]{64}")


def verify_hashes(m: dict, url: str) -> None:
    """Refuse a manifest edited after conversion (statistics, splits, ... or a garbled content_hash).

    content_hash is what resumes compare, so it must describe this manifest. Manifests written by this
    version also carry header_hash (everything but the shard list) and shards_hash (the shard list):
    an edit of the header is always refused; an edit of only the shard list is left to the per-shard
    checks on read (size, sha256, series shapes), which name the shard. Older manifests (no
    header_hash) must match their content_hash exactly."""
    def bad(problem: str) -> DataError:
        return DataError(f"manifest {url}: {problem}; re-convert the data set (python -m "
                         f"data_pipeline.convert) instead of editing its manifest")
    ch = m.get("content_hash")
    if ch is None:
        return  # hand-written manifest without hashes: nothing to check against
    if not isinstance(ch, str) or not _HEX64.fullmatch(ch):
        raise bad(f"content_hash {ch!r} is not a sha256 hex digest (garbled)")
    for k in ("header_hash", "shards_hash"):
        if k in m and (not isinstance(m[k], str) or not _HEX64.fullmatch(m[k])):
            raise bad(f"{k} {m[k]!r} is not a sha256 hex digest (garbled)")
    actual = content_hash(m)
    if "header_hash" not in m:
        if actual != ch:
            raise bad(f"content does not match its content_hash (stored {ch[:16]}..., computed "
                      f"{actual[:16]}...): edited after conversion")
        return
    if header_hash(m) != m["header_hash"]:
        raise bad("statistics/splits/metadata were edited after conversion (header_hash mismatch)")
    if m.get("shards_hash") == shards_hash(m) and actual != ch:
        raise bad(f"content_hash does not match the manifest (stored {ch[:16]}..., computed {actual[:16]}...)")


def validate_manifest(m: Any, url: str) -> dict:
    def bad(problem: str) -> DataError:
        return DataError(f"manifest {url}: {problem}")
    if not isinstance(m, dict):
        raise bad("top level must be a JSON object")
    for k in ("format_version", "format", "shards", "splits"):
        if k not in m:
            raise bad(f"missing field {k!r}")
    if m["format_version"] != MANIFEST_VERSION:
        raise bad(f"format_version {m['format_version']} is not supported (expected {MANIFEST_VERSION})")
    if m["format"] not in FORMATS:
        raise bad(f"format {m['format']!r} is not one of {FORMATS}")
    if not isinstance(m["shards"], list) or not m["shards"]:
        raise bad("lists no shards")
    for i, s in enumerate(m["shards"]):
        for k in ("url", "samples", "shapes"):
            if k not in s:
                raise bad(f"shard #{i} is missing {k!r}")
    if m.get("stats") is not None:
        st = m["stats"]
        if not isinstance(st, dict) or len(st.get("mean") or []) != len(st.get("std") or []) or not st.get("mean"):
            raise bad("stats must hold equal-length 'mean' and 'std' lists")
        mean, std = np.asarray(st["mean"], dtype=np.float64), np.asarray(st["std"], dtype=np.float64)
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise bad("stats must hold finite means and finite, positive standard deviations")
    verify_hashes(m, url)
    return m


def load_manifest(url: str, storage_options: Optional[dict] = None, retries: int = 3, backoff: float = 0.2,
                  timeout: Optional[float] = _fs.DEFAULT_IO_TIMEOUT) -> dict:
    try:
        raw = _fs.read_bytes(url, storage_options, retries=retries, backoff=backoff, timeout=timeout)
    except FileNotFoundError:
        raise DataError(f"manifest {url}: not found") from None
    except OSError as e:
        raise DataError(f"manifest {e}" if str(e).startswith(url) else f"manifest {url}: {e}") from None
    try:
        m = json.loads(raw)
    except ValueError as e:
        raise DataError(f"manifest {url}: invalid JSON ({e})") from None
    m = validate_manifest(m, url)
    m["_url"] = url
    return m


def write_manifest(url: str, manifest: dict, storage_options: Optional[dict] = None) -> None:
    body = {k: v for k, v in manifest.items() if not k.startswith("_")}
    _fs.atomic_write(url, json.dumps(body, indent=1).encode() + b"\n", storage_options)


def shard_url(manifest: dict, entry: dict) -> str:
    return _fs.join(manifest.get("_url", ""), entry["url"])


def check_against_manifest(shard: ShardData, entry: dict) -> None:
    """A shard whose series do not match its manifest entry is stale or damaged: say so."""
    c, t = expand_shapes(entry["shapes"])
    if len(shard) != len(c):
        raise shard_error(shard.url, f"holds {len(shard)} series but the manifest lists {len(c)} "
                                     f"(truncated, or the manifest is stale)")
    for i, a in enumerate(shard.arrays):
        if a.shape != (c[i], t[i]):
            raise shard_error(shard.url, f"series {shard.ids[i]!r} has shape {a.shape}, "
                                         f"the manifest says {(int(c[i]), int(t[i]))}")
