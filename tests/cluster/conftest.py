"""Shared fixtures of the cluster tests: the project's pins read from pyproject.toml, the image tag rule,
a local `ray start --head` cluster to submit jobs to."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import tomllib

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def pins() -> dict[str, str]:
    """The Ray minor version pyproject.toml allows (``ray_minor`` "2.60", ``ray_below`` "2.61"), the
    oldest Python it supports (``python_min`` "3.10") and the torch that ./dev installs by default."""
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    ray_req = next(d for d in project["dependencies"] if d.replace(" ", "").startswith("ray["))
    match = re.search(r">=\s*(\d+\.\d+)(?:\.\d+)?\s*,\s*<\s*(\d+\.\d+)", ray_req)
    assert match, f"pyproject.toml's Ray requirement should be a minor-version range, got {ray_req!r}"
    python_min = re.search(r">=\s*(\d+\.\d+)", project["requires-python"]).group(1)
    torch = re.search(r"TORCH_VERSION:-([0-9.]+)", (REPO_ROOT / "dev").read_text())
    assert torch, "./dev should name its default torch version (TORCH_VERSION:-X.Y.Z)"
    return {
        "ray_minor": match.group(1),
        "ray_below": match.group(2),
        "python_min": python_min,
        "torch": torch.group(1),
    }


@pytest.fixture(scope="session")
def ray_image():
    """A function checking one image reference against the pins; returns its parts or fails naming it.

    ``rayproject/ray:<ray>-py<XY>-cu<XYZ>``: Ray inside the project's range, a Python the project
    supports, and an explicit CUDA tag (the ``-gpu`` alias moves between releases).
    """
    pattern = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3)(?P<pyminor>\d+)-cu(?P<cuda>\d{3})$")

    def check(image: str, pins: dict[str, str], where: str) -> dict[str, str]:
        match = pattern.match(image)
        assert match, f"{where}: image {image!r} is not rayproject/ray:<version>-py3XY-cuXYZ"
        ray_minor = ".".join(match["ray"].split(".")[:2])
        assert ray_minor == pins["ray_minor"], (
            f"{where}: image {image!r} has Ray {match['ray']}, pyproject.toml pins Ray {pins['ray_minor']}.x"
        )
        py = (3, int(match["pyminor"]))
        py_min = tuple(int(x) for x in pins["python_min"].split("."))
        assert py >= py_min, f"{where}: image {image!r} has Python 3.{py[1]}, the project needs >= {pins['python_min']}"
        return {"ray": match["ray"], "python": f"3.{py[1]}", "cuda": match["cuda"]}

    return check


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
    # Not `ray stop`: it would stop every Ray on the machine, other people's included.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _pids_using(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while pids and time.time() < deadline and _pids_using(temp_dir):
            time.sleep(0.5)


@pytest.fixture
def ray_head():
    """A `ray start --head` on loopback with ports of its own, as tests/train/test_job_submit.py starts it,
    plus the `spot` resource that the cluster configs' spot workers advertise. Yields the job API address
    and the environment to run `ray` and `python` with."""
    temp_dir = tempfile.mkdtemp(prefix="rjc", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    flags = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port")
    flags += ("runtime-env-agent-port", "metrics-export-port", "ray-client-server-port")
    ports = {flag: _free_port() for flag in flags}
    try:
        subprocess.run(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--node-ip-address=127.0.0.1",
                "--dashboard-host=127.0.0.1",
                *[f"--{flag}={port}" for flag, port in ports.items()],
                "--num-cpus=4",
                '--resources={"spot": 4}',
                "--object-store-memory=200000000",
                f"--temp-dir={temp_dir}",
                "--disable-usage-stats",
            ],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=180,
        )
        yield {"address": f"http://127.0.0.1:{ports['dashboard-port']}", "env": env}
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
