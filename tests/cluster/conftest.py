"""Shared fixtures of the cluster tests: the project's pins read from pyproject.toml, the image tag rule,
a local `ray start --head` to submit jobs to, a stand-in for EC2's instance metadata service."""

from __future__ import annotations

import http.server
import json
import re
import threading
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[2]


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


@pytest.fixture
def ray_head(local_cluster_factory):
    """One local head with 4 CPUs and the `spot` resource that the cluster configs' spot workers
    advertise: ``address`` (the job API) and ``env`` (to run `ray` and `python` with)."""
    cluster = local_cluster_factory(["--num-cpus=4", '--resources={"spot": 4}'])
    return {"address": cluster.address, "env": cluster.env}


class FakeImds(http.server.BaseHTTPRequestHandler):
    """EC2's metadata endpoint (IMDSv2: a PUT for the token, then the `spot/instance-action` notice):
    ``server.notice`` is None (404) until the test posts a reclamation."""

    def do_PUT(self):  # noqa: N802 (http.server's name)
        assert self.path == "/latest/api/token" and self.headers["X-aws-ec2-metadata-token-ttl-seconds"]
        self._reply(200, b"imds-token")

    def do_GET(self):  # noqa: N802
        self.server.polls += 1
        if self.path != "/latest/meta-data/spot/instance-action" or self.headers["X-aws-ec2-metadata-token"] != (
            "imds-token"
        ):
            self._reply(401, b"")
        elif self.server.notice is None:
            self._reply(404, b"")
        else:
            self._reply(200, json.dumps(self.server.notice).encode())

    def _reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def imds():
    """A FakeImds server on 127.0.0.1 (a free port); post a notice by setting ``imds.notice``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeImds)
    server.notice, server.polls = None, 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
