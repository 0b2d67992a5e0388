"""Issue 12, items 5, 6, 8: hung object stores, verified manifests and values, CSV input errors."""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from data_pipeline import DataConfig, DataError, ShardError, build_loader, convert, write_series
from data_pipeline.testing import identity_series
from tests.s3_server import local_s3_server

REPO = Path(__file__).resolve().parents[1]
ETTH1 = str(REPO / "data" / "ETTh1.csv")


def _in_thread(fn, limit: float):
    """Run fn on a daemon thread; (finished, seconds, exception). A hang shows as finished=False."""
    box: dict = {}

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            box["e"] = e
    t0 = time.monotonic()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit)
    return not t.is_alive(), time.monotonic() - t0, box.get("e")


# ----------------------------------------------------------------------------- item 5: a frozen store

@pytest.fixture
def frozen_s3():
    """A moto server in its own process, so the test can SIGSTOP it (frozen, not dead)."""
    with local_s3_server(process=True) as srv:
        srv["client"].create_bucket(Bucket="frozen")
        yield srv["process"], srv["storage_options"]


def test_frozen_object_store_fails_in_bounded_time_naming_the_url(frozen_s3):
    proc, so = frozen_s3
    m = write_series(identity_series([40, 50, 60], 2), "s3://frozen/ds", "parquet", shard_samples=1,
                     storage_options=so, progress=False)
    cfg = dict(source=m["_url"], storage_options=so, normalize=False, retries=2, retry_backoff=0.05,
               io_timeout=3.0)
    ld = build_loader(DataConfig(**cfg), seq_len=10, batch_size=4, seed=0)  # store alive: manifest read
    os.kill(proc.pid, signal.SIGSTOP)  # frozen: connections are accepted by the kernel, never answered
    try:
        # a shard read on a frozen store: an error naming the shard within the deadline, not a stall
        done, took, err = _in_thread(lambda: list(ld), 30)
        assert done, "reading from a frozen object store stalled (> 30 s)"
        assert isinstance(err, ShardError), repr(err)
        assert re.search(r"shard s3://frozen/ds/data-0000\d\.parquet: unreachable .*3 s deadline", str(err)), err
        assert took < 15
        # the manifest read itself
        done, took, err = _in_thread(lambda: build_loader(DataConfig(**cfg), seq_len=10, batch_size=4), 30)
        assert done, "reading a manifest from a frozen object store stalled (> 30 s)"
        assert isinstance(err, DataError) and "manifest s3://frozen/ds/manifest.json: unreachable" in str(err), err
        assert took < 15
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert len(list(build_loader(DataConfig(**cfg), seq_len=10, batch_size=4, seed=0))) > 0  # thawed: works


def test_io_timeout_is_a_config_knob_and_s3_gets_socket_timeouts():
    from data_pipeline import fs as _fs

    assert DataConfig().io_timeout == 60.0
    with pytest.raises(ValueError, match="io_timeout"):
        DataConfig(io_timeout=-1).validate()
    fs, _ = _fs.filesystem("s3://b/k", {"key": "k", "secret": "s", "client_kwargs": {"region_name": "us-east-1"}})
    ck = fs.config_kwargs
    assert ck["connect_timeout"] == _fs.S3_CONNECT_TIMEOUT and ck["read_timeout"] == _fs.S3_READ_TIMEOUT


def test_retrying_has_a_deadline_in_time():
    from data_pipeline import fs as _fs

    hang = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(OSError, match=r"memory://x: unreachable after 1 attempts .*0.5 s deadline"):
        _fs.retrying(lambda: hang.wait(60), "memory://x", retries=5, backoff=0.01, timeout=0.5)
    assert time.monotonic() - t0 < 5

    def flaky():
        raise ConnectionResetError(104, "Connection reset by peer")
    t0 = time.monotonic()
    with pytest.raises(OSError, match=r"memory://y: unreachable after \d attempts within the 0.5 s deadline"):
        _fs.retrying(flaky, "memory://y", retries=50, backoff=0.2, timeout=0.5)
    assert time.monotonic() - t0 < 5


# ----------------------------------------------------------------------------- item 6: verified data

def _corpus(tmp: Path, **kw) -> dict:
    return write_series(identity_series([40, 50, 60, 45], 2), str(tmp), "parquet", shard_samples=2,
                        progress=False, **kw)


def _rewrite(m: dict, drop=(), **changes) -> str:
    body = {k: v for k, v in m.items() if not k.startswith("_") and k not in drop}
    body.update(changes)
    Path(m["_url"]).write_text(json.dumps(body))
    return m["_url"]


def _load(url: str, **kw):
    kw.setdefault("normalize", True)
    return build_loader(DataConfig(source=url, **kw), seq_len=10, batch_size=4, seed=0)


def test_edited_statistics_are_refused_naming_the_manifest(tmp_path):
    m = _corpus(tmp_path)
    assert len(list(_load(m["_url"]))) > 0
    stats = dict(m["stats"], mean=[1000.0, 1000.0], std=[0.001, 0.001])
    url = _rewrite(m, stats=stats)
    with pytest.raises(DataError, match=re.escape(f"manifest {url}: ") + r"statistics.* edited"):
        _load(url)
    # an old-style manifest (no header_hash): the content_hash itself catches the edit
    url = _rewrite(m, drop=("header_hash", "shards_hash"), stats=stats)
    with pytest.raises(DataError, match=re.escape(f"manifest {url}: ") + r"content does not match its content_hash"):
        _load(url)
    url = _rewrite(m, drop=("header_hash", "shards_hash"))  # unedited old-style manifests still load
    assert len(list(_load(url))) > 0


def test_garbled_content_hash_is_refused(tmp_path):
    m = _corpus(tmp_path)
    url = _rewrite(m, content_hash="not-a-hash")
    with pytest.raises(DataError, match=re.escape(f"manifest {url}: ") + r"content_hash 'not-a-hash' is not a sha256"):
        _load(url)
    flipped = ("0" if m["content_hash"][0] != "0" else "1") + m["content_hash"][1:]
    url = _rewrite(m, content_hash=flipped)
    with pytest.raises(DataError, match=re.escape(f"manifest {url}: ") + r"content_hash does not match"):
        _load(url)


def test_non_finite_or_zero_statistics_are_refused(tmp_path):
    m = _corpus(tmp_path)
    url = _rewrite(m, drop=("header_hash", "shards_hash", "content_hash"), stats=dict(m["stats"], std=[0.0, 1.0]))
    with pytest.raises(DataError, match=re.escape(f"manifest {url}: ") + r"stats must hold finite means and finite, "
                                                                        r"positive standard deviations"):
        _load(url)


def test_converter_refuses_huge_values_naming_file_and_series(tmp_path):
    recs = identity_series([40, 50], 2)
    recs[1].values[1, 7] = 1e30
    with pytest.raises(DataError, match=r"series 's1' has 1 value\(s\) beyond \+-1e\+10 \(largest 1e\+30 in "
                                        r"channel 1, row 7\)"):
        write_series(recs, str(tmp_path / "a"), "parquet", progress=False)
    m = write_series(recs, str(tmp_path / "b"), "parquet", progress=False, max_abs=0)  # the policy switch
    assert m["samples"] == 2
    csv = tmp_path / "big.csv"
    rows = "\n".join(f"2020-01-01 {h:02d}:00:00,{1e30 if h == 5 else h},{h}" for h in range(24))
    csv.write_text("date,a,b\n" + rows + "\n")
    from data_pipeline.convert import main as convert_main
    assert convert_main([str(csv), "--out", str(tmp_path / "c"), "--no-progress"]) == 2
    with pytest.raises(DataError, match=re.escape(str(csv)) + r": series 'big' has 1 value\(s\) beyond"):
        convert(str(csv), str(tmp_path / "d"), progress=False)
    assert convert(str(csv), str(tmp_path / "e"), progress=False, max_abs=1e31)["samples"] == 1


def test_every_shard_skipped_as_bad_says_so(tmp_path):
    m = _corpus(tmp_path)
    for e in m["shards"]:
        p = tmp_path / e["url"]
        p.write_bytes(b"\xff" * p.stat().st_size)
    with pytest.raises(DataError) as ei:
        _load(str(tmp_path / "*.parquet"), normalize=False, on_bad_sample="skip")
    msg = str(ei.value)
    assert "all 2 shard(s) were skipped as bad (on_bad_sample: skip)" in msg, msg
    assert "no shards hold" not in msg and "data-00000.parquet" in msg


# ----------------------------------------------------------------------------- item 8: CSV input errors

def _csv(tmp: Path, name: str, text: str) -> str:
    p = tmp / name
    p.write_text(text)
    return str(p)


def test_csv_text_cell_names_column_and_row(tmp_path):
    from data_pipeline.readers import read_input

    path = _csv(tmp_path, "text.csv", "date,a,b\n2020-01-01,1,2\n2020-01-02,oops,3\n2020-01-03,4,5\n")
    want = re.escape(path) + r": non-numeric column\(s\) \['a'\]: column 'a' row 2 \(file line 3\) holds 'oops'"
    with pytest.raises(DataError, match=want):
        read_input(path)
    with pytest.raises(DataError, match=want):  # the converter
        convert(path, str(tmp_path / "out"), progress=False)
    with pytest.raises(DataError, match=want):  # pre-training: convert on first use
        build_loader(DataConfig(source=path, cache_dir=str(tmp_path / "cache")), seq_len=2, batch_size=1)


def test_csv_header_only_and_empty_files(tmp_path):
    from data_pipeline.readers import read_input

    path = _csv(tmp_path, "header.csv", "date,a,b\n")
    with pytest.raises(DataError, match=re.escape(path) + r": no rows \(header only: \['date', 'a', 'b'\]\)"):
        read_input(path)
    for name, text in (("empty.csv", ""), ("blank.csv", "\n\n")):
        path = _csv(tmp_path, name, text)
        with pytest.raises(DataError, match=re.escape(path) + r": empty file \(no header, no rows\)"):
            read_input(path)
        with pytest.raises(DataError, match=re.escape(path) + r": empty file"):
            build_loader(DataConfig(source=path, cache_dir=str(tmp_path / "cache")), seq_len=2, batch_size=1)
