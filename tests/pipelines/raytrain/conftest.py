"""Shared fixtures of the training tests: the tiny generated dataset, tiny configs, one Ray instance per module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from s3_servers import CREDENTIALS

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, str]:
    """16 train / 5 val (uneven over 2 workers) generated images of 3 shape classes, 64-96 px."""
    from pipelines.data.synthetic import generate_coco

    root = tmp_path_factory.mktemp("tiny_data") / "shapes"
    generate_coco(root, 16, 5, image_size=((64, 96), (64, 96)), num_classes=3, max_objects=3, seed=0, threads=2)
    return {"root": str(root)}


@pytest.fixture(scope="session")
def tiny_overrides(tiny_data):
    """A function giving the `--set` items of the tiny preset on the session's dataset, writing under `storage`."""

    def make(storage: Path, name: str, *extra: str) -> list[str]:
        return [
            f"data.root={tiny_data['root']}",
            f"train.storage_path={storage}",
            f"train.name={name}",
            "demo_data=null",
            *extra,
        ]

    return make


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the whole module: 2 train workers plus CPUs for Ray Data's decode tasks."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",  # never join another cluster running on this machine
        num_cpus=4,
        object_store_memory=200 * 2**20,
        # The test buckets' credentials, as a user exports them before starting Ray: a bucket storage
        # path's workers and Train controller upload checkpoints with them.
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), **CREDENTIALS}},
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()
