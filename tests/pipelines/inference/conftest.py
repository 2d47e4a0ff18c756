"""Fixtures of the batch-inference tests: a tiny checkpoint of ours, generated images with bad files, local Ray."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from exports import CATEGORIES, write_checkpoint

from pipelines.data.synthetic import generate_coco

# The bad files of the image folder and the error kind each must get.
BAD_FILES = {"empty.jpg": "empty", "truncated.jpg": "truncated", "corrupt.jpg": "corrupt", "notes.txt": "unsupported"}


@pytest.fixture(scope="session")
def bad_files() -> dict[str, str]:
    return dict(BAD_FILES)


@pytest.fixture(scope="session")
def categories() -> dict[int, str]:
    return dict(CATEGORIES)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint as pipelines/train.py writes one: contiguous labels over 4 categories, a 5-way head."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_epoch0001" / "checkpoint.pt", num_classes=5)


@pytest.fixture(scope="session")
def coco(tmp_path_factory) -> dict[str, str]:
    """10 generated val images of 80-120 px with their instances JSON."""
    return generate_coco(tmp_path_factory.mktemp("coco"), 0, 10, image_size=((80, 120), (80, 120)), seed=3)


@pytest.fixture(scope="session")
def image_dir(coco, tmp_path_factory) -> Path:
    """The val images plus one file of every bad kind (BAD_FILES)."""
    d = tmp_path_factory.mktemp("images")
    for p in sorted(Path(coco["root"], "val").iterdir()):
        shutil.copy(p, d / p.name)
    jpeg = (d / "000000000001.jpg").read_bytes()
    (d / "empty.jpg").write_bytes(b"")
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (d / "corrupt.jpg").write_bytes(jpeg[:600] + bytes(range(256)) * 4 + jpeg[1624:])  # JPEG magic, garbage header
    (d / "notes.txt").write_text("not an image\n")
    return d


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray per test module (2 CPUs, a small object store), shut down after it."""
    import ray

    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # or a fresh ray.init() writes ~/.ray/auth_token
    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    if old is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = old
