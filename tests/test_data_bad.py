"""Bad input: every case raises an error naming the shard and the problem, or is skipped and counted."""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from data_pipeline import (DataConfig, DataError, ShardError, ShardUnreachable, build_loader, write_series)
from data_pipeline.testing import identity_series
from tests.s3_server import free_port

SEQ = 10
LENGTHS = [40, 50, 60, 45, 55, 35]


def corpus(tmp: Path, fmt: str = "parquet", recs=None, **kw) -> dict:
    recs = recs if recs is not None else identity_series(LENGTHS, 2)
    return write_series(recs, str(tmp), fmt, shard_samples=2, progress=False, **kw)


def loader(source: str, batch: int = 4, **kw):
    kw.setdefault("normalize", False)
    return build_loader(DataConfig(source=source, **kw), seq_len=SEQ, batch_size=batch, seed=0)


def shard_path(m: dict, i: int) -> Path:
    return Path(m["_url"]).parent / m["shards"][i]["url"]


def corrupt(p: Path, fmt: str) -> Path:
    """Overwrite bytes in place (same size: only the checksum or the decoder can tell)."""
    data = bytearray(p.read_bytes())
    if fmt == "parquet":
        data[-60:-10] = b"\xff" * 50  # the footer (schema + row-group metadata)
    else:
        data[512:560] = b"\xff" * 48  # the first member: the .npy header
    p.write_bytes(bytes(data))
    return p


def rewrite_manifest(m: dict, **changes) -> str:
    body = {k: v for k, v in m.items() if not k.startswith("_")}
    body.update(changes)
    Path(m["_url"]).write_text(json.dumps(body))
    return m["_url"]


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_corrupt_shard_names_the_shard(tmp_path, fmt):
    m = corpus(tmp_path, fmt)
    p = corrupt(shard_path(m, 1), fmt)
    with pytest.raises(ShardError, match=re.escape(str(p)) + r": corrupt or modified: content does not match"):
        list(loader(m["_url"]))
    msg = r"corrupt or truncated Parquet file" if fmt == "parquet" else r"000000002.npy: not a valid .npy"
    with pytest.raises(ShardError, match=re.escape(str(p)) + ": " + msg):
        list(loader(m["_url"], verify_checksums=False))


def test_worker_process_errors_propagate_with_the_shard_name(tmp_path):
    m = corpus(tmp_path)
    p = shard_path(m, 2)
    p.write_bytes(p.read_bytes()[:-100] + b"\0" * 100)
    t0 = time.monotonic()
    with pytest.raises(ShardError, match=re.escape(str(p)) + ": corrupt or modified"):
        list(loader(m["_url"], num_workers=2))
    assert time.monotonic() - t0 < 30  # never a hang


def test_truncated_shard(tmp_path):
    m = corpus(tmp_path, "webdataset")
    p = shard_path(m, 0)
    full = p.read_bytes()
    p.write_bytes(full[: len(full) // 2])
    with pytest.raises(ShardError, match=re.escape(str(p)) + rf": truncated: {len(full) // 2} bytes, "
                                                              rf"the manifest says {len(full)}"):
        list(loader(m["_url"]))
    # without a manifest (bare glob) the decoder itself notices
    with pytest.raises(ShardError, match=re.escape(str(p)) + ": (corrupt or )?truncated tar"):
        loader(str(tmp_path / "*.tar"))


def test_wrong_schema(tmp_path):
    t = pa.table({"id": ["a"], "values": pa.array([[1.0, 2.0]], pa.list_(pa.float64())),
                  "n_channels": [1], "length": [2]})
    pq.write_table(t, tmp_path / "double.parquet")
    with pytest.raises(ShardError, match=r"double.parquet: wrong schema: column 'values' is list<element: double>, "
                                         r"expected list<item: float>"):
        loader(str(tmp_path / "double.parquet"))
    t32 = t.set_column(1, "values", pa.array([[1.0, 2.0]], pa.list_(pa.float32())))
    pq.write_table(t32.drop_columns(["length"]), tmp_path / "nolen.parquet")
    with pytest.raises(ShardError, match=r"nolen.parquet: wrong schema: missing column 'length'"):
        loader(str(tmp_path / "nolen.parquet"))
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, payload in (("k.json", b"{}"), ("k.npy", _npy(np.zeros((2, 5), np.float64)))):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    (tmp_path / "f64.tar").write_bytes(buf.getvalue())
    with pytest.raises(ShardError, match=r"f64.tar: k.npy: expected a C-order float32 \[channels, time\] array, "
                                         r"got float64"):
        loader(str(tmp_path / "f64.tar"))


def _npy(a: np.ndarray) -> bytes:
    import io
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


def test_nan_inf_error_or_skip_counted(tmp_path, caplog):
    recs = identity_series(LENGTHS, 2)
    recs[3].values[0, 5] = np.nan
    recs[3].values[1, 9] = np.inf
    with pytest.raises(DataError, match=r"series 's3' has 2 NaN/inf value\(s\)"):
        corpus(tmp_path / "refused", recs=recs)  # the converter refuses by default
    m = corpus(tmp_path / "ok", recs=recs, allow_nonfinite=True)
    p = shard_path(m, 1)
    with pytest.raises(ShardError, match=re.escape(str(p)) + r": series 's3' \(#1\) has 2 NaN/inf value\(s\)"):
        list(loader(m["_url"], num_workers=2))
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        steps, bad = [], 0
        for rank in range(2):  # 3 shards < 2 ranks x 2 workers: striding, every worker meets the bad series
            ld = build_loader(DataConfig(source=m["_url"], normalize=False, on_bad_sample="skip", num_workers=2),
                              seq_len=SEQ, batch_size=4, rank=rank, world_size=2, seed=0)
            batches = list(ld)
            assert len(batches) == len(ld)  # topped up: every rank still takes its steps
            assert all(np.isfinite(b.numpy()).all() for b in batches)
            steps.append(len(batches))
            bad += ld.stats["bad_series"]
        assert steps[0] == steps[1]
        assert bad == 1  # summed over ranks, as the trainer does: counted once
    ld = loader(m["_url"], on_bad_sample="skip")
    list(ld)
    s = ld.stats
    # its windows are skipped where they come up, again in the top-up lap if that reaches them
    assert s["bad_series"] == 1 and s["skipped_bad"] >= LENGTHS[3] - SEQ + 1
    assert s["resampled"] > 0 and s["windows"] == 4 * len(ld)
    assert any("series 's3' (#1) has 2 NaN/inf" in r for r in ld.bad_reports)
    assert "skipped bad input" in caplog.text


def test_short_series_error_names_the_shard(tmp_path):
    m = corpus(tmp_path, recs=identity_series([40, 5, 50], 2))
    with pytest.raises(DataError, match=re.escape(str(shard_path(m, 0))) + r": series #1 has 5 rows .* shorter "
                                                                             r"than one window \(10\)"):
        loader(m["_url"], short_series="error")
    ld = loader(m["_url"])
    assert ld.stats["skipped_short"] == 1


def test_empty_shards(tmp_path):
    m = corpus(tmp_path)
    shards = [dict(s) for s in m["shards"]]
    shards[1].update(samples=0, shapes=[], points=0)
    url = rewrite_manifest(m, shards=shards)
    with pytest.raises(ShardError, match=re.escape(str(shard_path(m, 1))) + r": empty shard \(the manifest lists 0"):
        loader(url)
    ld = loader(url, on_bad_sample="skip")
    assert ld.stats["bad_shards"] == 1 and len(list(ld)) == len(ld) > 0
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "a.parquet").write_bytes(b"")
    with pytest.raises(ShardError, match=r"zero/a.parquet: empty shard \(0 bytes\)"):
        loader(str(tmp_path / "zero" / "*.parquet"))
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "values": pa.array([], pa.list_(pa.float32())),
                             "n_channels": pa.array([], pa.int32()), "length": pa.array([], pa.int64())}),
                   tmp_path / "zero" / "rows.parquet")
    with pytest.raises(ShardError, match=r"rows.parquet: empty shard \(no series\)"):
        loader(str(tmp_path / "zero" / "rows.parquet"))


def test_missing_shard_error_or_skip(tmp_path):
    m = corpus(tmp_path)
    shard_path(m, 0).unlink()
    with pytest.raises(ShardError, match=re.escape(str(shard_path(m, 0))) + ": not found"):
        list(loader(m["_url"], shuffle=False))
    ld = loader(m["_url"], on_bad_sample="skip")
    assert len(list(ld)) == len(ld)
    assert ld.stats["bad_shards"] == 1 and "not found" in ld.bad_reports[0]


def test_stale_manifest_is_detected(tmp_path):
    m = corpus(tmp_path)
    shard_path(m, 0).write_bytes(shard_path(m, 1).read_bytes())  # another valid shard in its place
    with pytest.raises(ShardError, match=r"data-00000.parquet: (modified|corrupt or modified)"):
        list(loader(m["_url"], shuffle=False))
    shards = [dict(s) for s in m["shards"]]
    shards[0]["bytes"] = m["shards"][1]["bytes"]
    url = rewrite_manifest(m, shards=shards)
    with pytest.raises(ShardError, match=r"data-00000.parquet: series 's2' has shape \(2, 60\), the manifest "
                                         r"says \(2, 40\)"):
        list(loader(url, shuffle=False, verify_checksums=False))


def test_bad_manifests(tmp_path):
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(DataError, match=r"m.json: invalid JSON"):
        loader(str(tmp_path / "m.json"))
    (tmp_path / "m.json").write_text(json.dumps({"format_version": 1, "format": "parquet", "splits": {}}))
    with pytest.raises(DataError, match=r"m.json: missing field 'shards'"):
        loader(str(tmp_path / "m.json"))
    with pytest.raises(DataError, match=r"nope.json: not found"):
        loader(str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match=r"data.source .*nope.csv: file not found"):
        loader(str(tmp_path / "nope.csv"))
    m = corpus(tmp_path / "c")
    with pytest.raises(DataError, match=r"no shards hold the 'val' split \(available: \['train'\]\)"):
        loader(m["_url"], split="val")


def test_unreachable_object_store_fails_fast(tmp_path):
    dead = {"key": "x", "secret": "y", "config_kwargs": {"retries": {"max_attempts": 1}},
            "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}", "region_name": "us-east-1"}}
    t0 = time.monotonic()
    with pytest.raises(DataError, match=r"manifest s3://nobucket/ds/manifest.json: unreachable after 2 attempts "
                                        r"\(EndpointConnectionError"):
        loader("s3://nobucket/ds/manifest.json", storage_options=dead, retries=1, retry_backoff=0.01)
    # shards on the dead store, manifest elsewhere: an error even with on_bad_sample: skip
    m = corpus(tmp_path)
    shards = [dict(s, url=f"s3://nobucket/ds/{s['url']}") for s in m["shards"]]
    url = rewrite_manifest(m, shards=shards)
    with pytest.raises(ShardUnreachable, match=r"shard s3://nobucket/ds/data-0000\d.parquet: unreachable after 2"):
        list(loader(url, storage_options=dead, retries=1, retry_backoff=0.01, on_bad_sample="skip"))
    assert time.monotonic() - t0 < 20


class FlakyFS(MemoryFileSystem):
    """memory:// that fails the first `fail` reads of each file with a connection reset."""
    protocol = ("flaky",)
    fail = 2
    seen: dict = {}

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("flaky://", "memory://", 1))

    def cat_file(self, path, *a, **kw):
        n = FlakyFS.seen.get(path, 0)
        FlakyFS.seen[path] = n + 1
        if n < FlakyFS.fail:
            raise ConnectionResetError(104, "Connection reset by peer")
        return super().cat_file(path, *a, **kw)

    def pipe_file(self, path, value, *a, **kw):
        n = FlakyFS.seen.get(("w", path), 0)
        FlakyFS.seen[("w", path)] = n + 1
        if n < FlakyFS.fail:
            raise ConnectionResetError(104, "Connection reset by peer")
        return super().pipe_file(path, value, *a, **kw)


def test_transient_write_errors_are_retried_with_a_bound():
    fsspec.register_implementation("flaky", FlakyFS, clobber=True)
    FlakyFS.fail, FlakyFS.seen = 2, {}
    m = write_series(identity_series(LENGTHS, 2), "flaky://flaky-out", "parquet", shard_samples=2, progress=False)
    FlakyFS.fail = 0
    assert len(list(loader(m["_url"]))) > 0  # every shard and the manifest arrived despite two resets each
    FlakyFS.fail, FlakyFS.seen = 9, {}
    with pytest.raises(OSError, match=r"write flaky://flaky-out2/.*: unreachable after 4 attempts"):
        write_series(identity_series(LENGTHS, 2), "flaky://flaky-out2", "parquet", shard_samples=2, progress=False)


def test_transient_errors_are_retried_with_a_bound():
    fsspec.register_implementation("flaky", FlakyFS, clobber=True)
    write_series(identity_series(LENGTHS, 2), "memory://flaky-ds", "parquet", shard_samples=2, progress=False)
    FlakyFS.fail, FlakyFS.seen = 2, {}
    ld = loader("flaky://flaky-ds/manifest.json", retries=3, retry_backoff=0.001)
    assert len(list(ld)) == len(ld)
    assert ld.stats["retries"] == 2 * 3  # two failures on each of the three shards
    FlakyFS.fail, FlakyFS.seen = 5, {}
    with pytest.raises(DataError, match=r"flaky://flaky-ds/manifest.json: unreachable after 4 attempts "
                                        r"\(ConnectionResetError"):
        loader("flaky://flaky-ds/manifest.json", retries=3, retry_backoff=0.001)


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_corrupt_shard_skipped_and_counted_from_manifest_and_glob(tmp_path, fmt):
    m = corpus(tmp_path, fmt)
    p = corrupt(shard_path(m, 1), fmt)
    ld = loader(m["_url"], on_bad_sample="skip")  # the manifest's checksum catches it
    assert len(list(ld)) == len(ld) and ld.stats["bad_shards"] == 1
    glob = str(p.parent / ("*.parquet" if fmt == "parquet" else "*.tar"))  # no manifest: shards scanned
    with pytest.raises(ShardError, match=re.escape(str(p))):
        loader(glob)
    ld = loader(glob, on_bad_sample="skip")
    assert len(list(ld)) == len(ld) and ld.stats["bad_shards"] == 1


def test_null_shape_columns_name_the_shard(tmp_path):
    t = pa.table({"id": ["a", "b"], "values": pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float32())),
                  "n_channels": pa.array([1, None], pa.int32()), "length": pa.array([2, 2], pa.int32())})
    pq.write_table(t, tmp_path / "nulls.parquet")
    with pytest.raises(ShardError, match=r"nulls.parquet: 1 row\(s\) with a null 'n_channels'"):
        loader(str(tmp_path / "nulls.parquet"))
