"""Shared fixtures of the cluster tests: the project's pins read from pyproject.toml, the image tag rule,
a local `ray start --head` to submit jobs to."""

from __future__ import annotations

import re
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
