"""Fixtures shared by the whole suite: the local S3 test server."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest


@pytest.fixture(scope="module")
def s3_options(tmp_path_factory):
    """A moto S3 server subprocess on 127.0.0.1 and a free port; pyarrow S3FileSystem kwargs for it."""
    pytest.importorskip("moto.server", reason="moto[server] provides the local S3 endpoint")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto server did not start on port {port}; see {log.name}")
            time.sleep(0.2)
    yield {
        "endpoint_override": f"127.0.0.1:{port}",
        "scheme": "http",
        "access_key": "testing",
        "secret_key": "testing",
        "region": "us-east-1",
    }
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
