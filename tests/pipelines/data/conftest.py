"""Shared fixtures for the data pipeline tests: a small generated COCO set and a local Ray instance."""

from __future__ import annotations

import os

import pytest

from pipelines.data.data_config import DataConfig
from pipelines.data.synthetic import generate_coco

# Augmentation sizes scaled to the ~100-160 px test images, so every branch (crop included) runs.
SMALL_SIZES = dict(
    train_short_sides=(64, 80, 96),
    max_size=160,
    val_short_side=96,
    crop_resize_sides=(80, 100),
    crop_size=(48, 90),
    rows_per_task=4,
    images_per_shard=10,
)


@pytest.fixture(scope="session")
def coco_paths(tmp_path_factory) -> dict[str, str]:
    """24 train and 8 val images of 96-160 px; crowd regions in a quarter of the images."""
    return generate_coco(
        tmp_path_factory.mktemp("coco"),
        24,
        8,
        image_size=((96, 160), (96, 160)),
        num_classes=4,
        crowd_fraction=0.25,
        seed=0,
    )


@pytest.fixture(scope="session")
def make_config(coco_paths):
    """DataConfig of the generated set with small augmentation sizes; kwargs override fields."""

    def make(**overrides) -> DataConfig:
        return DataConfig(**{**coco_paths, **SMALL_SIZES, **overrides})

    return make


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray per test module (2 CPUs, a small object store), shut down after it."""
    import ray

    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # or a fresh ray.init() writes ~/.ray/auth_token
    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()
    if old is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = old
