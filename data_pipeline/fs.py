"""Filesystem access through fsspec, with bounded retries for transient object-store errors.

Why a layer: every read in the pipeline goes through `read_bytes`, so the retry policy, the error
text (always naming the URL) and the byte counters live in one place. Filesystem objects are cached
per process id because s3fs/aiohttp sessions must not cross a `fork` into DataLoader workers.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import threading
import time
from typing import Any, Callable, Optional

from fsspec.core import url_to_fs

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


def retrying(fn: Callable[[], Any], what: str, retries: int = 3, backoff: float = 0.2,
             on_retry: Optional[Callable[[BaseException], None]] = None) -> Any:
    """Call `fn`, retrying transient errors `retries` times with exponential backoff (capped 10 s).

    Permanent errors raise at once; the final error names `what` and the attempt count.
    """
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            if not is_transient(e):
                raise
            if attempt >= retries:
                raise OSError(f"{what}: unreachable after {attempt + 1} attempts "
                              f"({type(e).__name__}: {e})") from e
            if on_retry is not None:
                on_retry(e)
            time.sleep(min(10.0, backoff * (2 ** attempt)))
            attempt += 1


def read_bytes(url: str, storage_options: Optional[dict] = None, retries: int = 3, backoff: float = 0.2,
               on_retry: Optional[Callable[[BaseException], None]] = None) -> bytes:
    def _read() -> bytes:
        fs, path = filesystem(url, storage_options)
        return fs.cat_file(path)
    return retrying(_read, url, retries, backoff, on_retry)


def write_bytes(url: str, data: bytes, storage_options: Optional[dict] = None, retries: int = 3,
                backoff: float = 0.2) -> None:
    """Write a whole object. Local files go through a temp file + rename, so a concurrent reader
    (another rank converting the same CSV on first use) never sees a half-written shard; object
    stores get the same bounded retries as reads (a whole-object PUT is idempotent)."""
    fs, path = filesystem(url, storage_options)
    if is_local(url):
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    parent = posixpath.dirname(path)
    if parent and protocol_of(url) not in ("s3", "s3a", "gs", "gcs", "az", "abfs"):
        fs.makedirs(parent, exist_ok=True)
    retrying(lambda: fs.pipe_file(path, data), f"write {url}", retries, backoff)


def exists(url: str, storage_options: Optional[dict] = None) -> bool:
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)


def glob(url: str, storage_options: Optional[dict] = None) -> list[str]:
    """Expand a glob to full URLs (same protocol as given), sorted for a stable shard order."""
    fs, path = filesystem(url, storage_options)
    found = sorted(fs.glob(path))
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


__all__ = ["filesystem", "join", "read_bytes", "write_bytes", "exists", "glob", "retrying", "is_transient",
           "protocol_of", "is_local", "invalidate"]
