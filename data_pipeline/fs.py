"""Filesystem access through fsspec, with bounded retries for transient object-store errors.

Why a layer: every read goes through `read_bytes` and every write of a file meant to last (shards,
manifests, checkpoints' metadata, published models, results) through `atomic_write`, so the retry policy
and the error text (always naming the URL) live in one place. Filesystem objects are cached per process
id because s3fs/aiohttp sessions must not cross a `fork` into DataLoader workers.
"""
from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import threading
import time
from typing import Any, Callable, Optional

from fsspec.core import url_to_fs

# Seconds one object-store operation may take in all, retries and backoff included (data.io_timeout).
# A frozen endpoint (process stopped, a black-holed route) accepts connections and never answers: without
# a deadline in time a bound in attempts alone never fires. Local files are not bounded.
DEFAULT_IO_TIMEOUT = 60.0
# botocore's per-request socket timeouts for S3 (s3fs's own defaults, made explicit and overridable via
# storage_options.config_kwargs): they end a request stuck on a frozen endpoint even after the
# operation's deadline has given up on it.
S3_CONNECT_TIMEOUT = 5.0
S3_READ_TIMEOUT = 15.0

_CACHE: dict[tuple, tuple[Any, str]] = {}
_LOCK = threading.Lock()

# Errors that retrying cannot fix: a missing key stays missing, a forbidden bucket stays forbidden.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError,
              TypeError, KeyError, NotImplementedError)
# Class names (anywhere in the MRO) of errors that are worth another try: network trouble,
# throttling, server-side 5xx, truncated HTTP bodies (botocore, aiohttp, urllib3, s3fs).
_TRANSIENT_NAME = re.compile(
    r"Connection|Timeout|Throttl|SlowDown|ServiceUnavailable|InternalError|IncompleteRead|"
    r"ResponseParser|ClientPayload|ServerDisconnected|ProtocolError|EndpointConnection|HTTPClientError")
_TRANSIENT_TEXT = re.compile(r"SlowDown|Throttl|ServiceUnavailable|InternalError|\b50[0234]\b|"
                             r"reduce your request rate|Connection reset|timed out", re.I)


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def is_local(url: str) -> bool:
    return protocol_of(url) in ("file", "local")


def filesystem(url: str, storage_options: Optional[dict] = None) -> tuple[Any, str]:
    """(fs, path-within-fs) for `url`; one fs object per (process, protocol, options)."""
    opts = dict(storage_options or {}) if not is_local(url) else {}
    key = (os.getpid(), protocol_of(url), json.dumps(opts, sort_keys=True, default=str))
    with _LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        fs = hit[0]
        return fs, fs._strip_protocol(url)
    if protocol_of(url) in ("s3", "s3a"):
        # botocore retries connection errors ~5 times with its own backoff (~8 s to fail on a dead
        # endpoint); keep it to 2 attempts so `data.retries` / `retry_backoff` bound the total wait.
        ck = dict(opts.get("config_kwargs") or {})
        ck.setdefault("retries", {"max_attempts": 2, "mode": "standard"})
        ck.setdefault("connect_timeout", S3_CONNECT_TIMEOUT)
        ck.setdefault("read_timeout", S3_READ_TIMEOUT)
        opts["config_kwargs"] = ck
    fs, path = url_to_fs(url, **opts)
    with _LOCK:
        _CACHE[key] = (fs, "")
    return fs, path


def join(base_url: str, rel: str) -> str:
    """Resolve a manifest-relative shard path; absolute paths and full URLs pass through."""
    if "://" in rel or rel.startswith("/"):
        return rel
    return posixpath.join(posixpath.dirname(base_url), rel)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, _PERMANENT):
        return False
    names = " ".join(c.__name__ for c in type(exc).__mro__)
    if _TRANSIENT_NAME.search(names):
        return True
    if type(exc).__name__ == "ClientError" or isinstance(exc, OSError):
        return bool(_TRANSIENT_TEXT.search(str(exc))) or isinstance(exc, OSError)
    return False


class IOTimeout(TimeoutError):
    """One attempt of an object-store operation did not answer before the operation's deadline."""


def call_with_timeout(fn: Callable[[], Any], timeout: Optional[float], what: str = "") -> Any:
    """`fn()`, but give up after `timeout` s (None: wait for ever) with IOTimeout.

    The call runs on a daemon thread, which is abandoned if it hangs (the storage client's own socket
    timeouts end it later); no other way bounds a blocking call into a library in time."""
    if timeout is None:
        return fn()
    done = threading.Event()
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = e
        finally:
            done.set()
    threading.Thread(target=run, daemon=True, name="fs-io").start()
    if not done.wait(max(0.0, timeout)):
        raise IOTimeout(f"{what}: no answer within {timeout:g} s" if what else f"no answer within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["result"]


def retrying(fn: Callable[[], Any], what: str, retries: int = 3, backoff: float = 0.2,
             on_retry: Optional[Callable[[BaseException], None]] = None,
             timeout: Optional[float] = None) -> Any:
    """Call `fn`, retrying transient errors `retries` times with exponential backoff (capped 10 s).

    Permanent errors raise at once; the final error names `what` and the attempt count. `timeout`
    (seconds, None = unbounded) is a deadline for the whole operation: every attempt, retry and
    backoff sleep together; an attempt still without an answer at the deadline is given up.
    """
    attempt = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            left = None if deadline is None else deadline - time.monotonic()
            return call_with_timeout(fn, left)
        except IOTimeout as e:
            raise OSError(f"{what}: unreachable after {attempt + 1} attempts (IOTimeout: no answer within "
                          f"the {timeout:g} s deadline, data.io_timeout)") from e
        except Exception as e:  # noqa: BLE001 - classified below
            if not is_transient(e):
                raise
            pause = min(10.0, backoff * (2 ** attempt))
            out_of_time = deadline is not None and time.monotonic() + pause >= deadline
            if attempt >= retries or out_of_time:
                within = f" within the {timeout:g} s deadline" if out_of_time and attempt < retries else ""
                raise OSError(f"{what}: unreachable after {attempt + 1} attempts{within} "
                              f"({type(e).__name__}: {e})") from e
            if on_retry is not None:
                on_retry(e)
            time.sleep(pause)
            attempt += 1


def _deadline(url: str, timeout: Optional[float]) -> Optional[float]:
    return None if is_local(url) else timeout


def read_bytes(url: str, storage_options: Optional[dict] = None, retries: int = 3, backoff: float = 0.2,
               on_retry: Optional[Callable[[BaseException], None]] = None,
               timeout: Optional[float] = DEFAULT_IO_TIMEOUT) -> bytes:
    def _read() -> bytes:
        fs, path = filesystem(url, storage_options)
        return fs.cat_file(path)
    return retrying(_read, url, retries, backoff, on_retry, _deadline(url, timeout))


def atomic_write(url: str, data: bytes, storage_options: Optional[dict] = None, retries: int = 3,
                 backoff: float = 0.2, timeout: Optional[float] = DEFAULT_IO_TIMEOUT) -> None:
    """Write a whole file so that no reader (another rank converting the same CSV, a loader of a half-published
    model, a resume after a crash) ever sees part of it, with the reads' bounded retries. Local: a temp file in the
    same folder, fsynced, then os.replace. Object stores: one whole-object put, atomic and idempotent there. Other
    remote file systems (sftp, hdfs, ...): one put, as atomic as the file system makes it."""
    fs, path = filesystem(url, storage_options)
    if is_local(url):
        def put() -> None:
            os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
    else:
        def put() -> None:
            parent = posixpath.dirname(path)
            if parent and protocol_of(url) not in ("s3", "s3a", "gs", "gcs", "az", "abfs"):
                fs.makedirs(parent, exist_ok=True)
            fs.pipe_file(path, data)
    retrying(put, f"write {url}", retries, backoff, timeout=_deadline(url, timeout))


def bounded(url: str, fn: Callable[[], Any], what: str, timeout: Optional[float] = DEFAULT_IO_TIMEOUT) -> Any:
    """One metadata call (exists, isdir, glob) under the operation deadline; a hang names the URL."""
    try:
        return call_with_timeout(fn, _deadline(url, timeout))
    except IOTimeout:
        raise OSError(f"{what} {url}: unreachable (IOTimeout: no answer within the {timeout:g} s deadline, "
                      f"data.io_timeout)") from None


def exists(url: str, storage_options: Optional[dict] = None, timeout: Optional[float] = DEFAULT_IO_TIMEOUT) -> bool:
    fs, path = filesystem(url, storage_options)
    return bounded(url, lambda: fs.exists(path), "exists", timeout)


def isdir(url: str, storage_options: Optional[dict] = None, timeout: Optional[float] = DEFAULT_IO_TIMEOUT) -> bool:
    fs, path = filesystem(url, storage_options)
    return bounded(url, lambda: fs.isdir(path), "isdir", timeout)


def glob(url: str, storage_options: Optional[dict] = None, timeout: Optional[float] = DEFAULT_IO_TIMEOUT) -> list[str]:
    """Expand a glob to full URLs (same protocol as given), sorted for a stable shard order."""
    fs, path = filesystem(url, storage_options)
    found = sorted(bounded(url, lambda: fs.glob(path), "glob", timeout))
    if is_local(url):
        return found
    return [fs.unstrip_protocol(p) for p in found]


def invalidate(url: str, storage_options: Optional[dict] = None) -> None:
    """Drop listing caches (s3fs caches directory listings, which would hide freshly written shards)."""
    fs, _ = filesystem(url, storage_options)
    try:
        fs.invalidate_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass


__all__ = ["filesystem", "join", "read_bytes", "atomic_write", "exists", "isdir", "glob", "retrying", "is_transient",
           "protocol_of", "is_local", "invalidate", "call_with_timeout", "bounded", "IOTimeout", "DEFAULT_IO_TIMEOUT"]
