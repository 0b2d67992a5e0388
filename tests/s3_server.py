"""A real S3 endpoint on loopback (moto server mode in its own process) for tests and the benchmark.

No in-process mocking: s3fs/botocore talk HTTP to 127.0.0.1 exactly as they would to AWS or MinIO.
Import the `s3` fixture into a test module: `from tests.s3_server import s3  # noqa: F401`.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import Iterator

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_s3_server(process: bool = False) -> Iterator[dict]:
    """Start moto on a free loopback port; yields {"endpoint_url", "storage_options", "new_bucket", "client"}.

    process=False: moto's threaded server inside this process (tests: quick to start).
    process=True: `python -m moto.server` in a child process, so the server does not compete with
    the measured code for this interpreter's GIL (benchmarks).
    """
    import logging

    import boto3

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    if process:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError(f"moto server did not start on port {port}")
                time.sleep(0.1)
        stop = proc.terminate
    else:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        stop = server.stop
    client = boto3.client("s3", region_name="us-east-1", endpoint_url=endpoint)

    def new_bucket(prefix: str = "dp") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        client.create_bucket(Bucket=name)
        return name

    try:
        yield {"endpoint_url": endpoint, "new_bucket": new_bucket, "client": client,
               "process": proc if process else None,  # the server's process (tests may freeze it)
               "storage_options": {"key": "testing", "secret": "testing",
                                   "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}}
    finally:
        if process and proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)  # a test may have frozen it: a stopped process ignores SIGTERM
        stop()
        if process:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3() -> Iterator[dict]:
    with local_s3_server(process=True) as srv:  # a separate server process, as a real endpoint
        yield srv
