"""data_pipeline.fs.atomic_write: the one writer of lasting files, with bounded retries, on real files and S3."""
import errno
import os

import pytest

from data_pipeline import fs
from tests.s3_server import s3  # noqa: F401 - session fixture


def failing(times: int, real, exc=lambda: OSError(errno.EIO, "Input/output error")):
    """`real`, failing its first `times` calls with `exc()`; `.calls` counts them all."""
    def call(*a, **kw):
        call.calls += 1
        if call.calls <= times:
            raise exc()
        return real(*a, **kw)
    call.calls = 0
    return call


def test_local_write_retries_a_transient_failure_and_leaves_no_temp_file(tmp_path, monkeypatch):
    url = str(tmp_path / "new" / "dir" / "model.json")
    monkeypatch.setattr(fs.os, "fsync", failing(1, os.fsync))
    fs.atomic_write(url, b'{"a": 1}', backoff=0.001)
    assert fs.os.fsync.calls == 2
    assert (tmp_path / "new" / "dir" / "model.json").read_bytes() == b'{"a": 1}'
    assert os.listdir(tmp_path / "new" / "dir") == ["model.json"]


def test_local_write_that_keeps_failing_names_the_url_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    path.write_bytes(b"old")
    monkeypatch.setattr(fs.os, "fsync", failing(99, os.fsync))
    with pytest.raises(OSError, match=rf"write {path}: unreachable after 3 attempts \(OSError: .*Input/output"):
        fs.atomic_write(str(path), b"new", retries=2, backoff=0.001)
    assert fs.os.fsync.calls == 3
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["metrics.json"]


def test_permanent_errors_are_not_retried(tmp_path, monkeypatch):
    monkeypatch.setattr(fs.os, "fsync", failing(99, os.fsync, lambda: PermissionError(errno.EACCES, "denied")))
    with pytest.raises(PermissionError):
        fs.atomic_write(str(tmp_path / "x.json"), b"{}", backoff=0.001)
    assert fs.os.fsync.calls == 1 and os.listdir(tmp_path) == []


def test_s3_write_retries_a_transient_failure(s3, monkeypatch):  # noqa: F811
    so = s3["storage_options"]
    url = f"s3://{s3['new_bucket']('io')}/published/config.json"
    s3fs, _ = fs.filesystem(url, so)
    real, reset = s3fs.pipe_file, lambda: ConnectionResetError(104, "Connection reset by peer")
    monkeypatch.setattr(s3fs, "pipe_file", failing(2, real, reset))
    fs.atomic_write(url, b"{}", so, backoff=0.001)
    assert s3fs.pipe_file.calls == 3 and fs.read_bytes(url, so) == b"{}"
    monkeypatch.setattr(s3fs, "pipe_file", failing(99, real, reset))
    with pytest.raises(OSError, match=rf"write {url}: unreachable after 2 attempts \(ConnectionResetError"):
        fs.atomic_write(url, b"[]", so, retries=1, backoff=0.001)
    assert fs.read_bytes(url, so) == b"{}"
