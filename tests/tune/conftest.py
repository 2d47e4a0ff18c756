"""Fixtures of the sweep tests: a tiny generated dataset, sweep overrides on it, one local Ray per module."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """8 train / 4 val generated images of 3 shape classes, 64-96 px; plus a val split without objects."""
    from pipelines.data.synthetic import generate_coco

    root = tmp_path_factory.mktemp("tune_data") / "shapes"
    generate_coco(root, 8, 4, image_size=((64, 96), (64, 96)), num_classes=3, max_objects=3, seed=0, threads=2)
    # The same val images with every annotation removed: pycocotools scores it -1 (no ground truth),
    # below any real AP, whatever two tiny epochs learn. ASHA's test builds its sure loser on it.
    with open(root / "instances_val.json") as f:
        val = json.load(f)
    val["annotations"] = []
    with open(root / "instances_val_empty.json", "w") as f:
        json.dump(val, f)
    return str(root)


@pytest.fixture(scope="session")
def sweep_overrides(tiny_data):
    """``--set`` items of a tiny sweep on the session's dataset, writing under ``storage`` (a folder or a
    bucket URI) as ``name``; keyword arguments are more ``train`` settings of the base config."""

    def make(storage: Path | str, name: str, *extra: str, epochs: int = 1, **train) -> list[str]:
        base = {
            "data": {"root": tiny_data},
            "demo_data": None,
            "train": {"epochs": epochs, "eval_every": 1, "num_vis_images": 0, "log_every_s": 30, **train},
        }
        return [
            "base_preset=tiny",
            f"base={json.dumps(base)}",
            f"storage_path={storage}",
            f"name={name}",
            *extra,
        ]

    return make


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module: one trial at a time (2 train workers plus 2 CPUs for its data)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        ray.shutdown()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The dashboard address named to every process, as pipelines.raytrain.cluster.connect_ray does: Train's
    # placement-group cleaner (which frees a stopped trial's workers) needs it when other Ray
    # instances run on the machine.
    env = {"PYTHONPATH": str(REPO_ROOT), "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    ray.init(
        address="local",  # never join another cluster running on this machine
        num_cpus=4,
        object_store_memory=200 * 2**20,
        dashboard_port=port,
        runtime_env={"env_vars": env},
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()
