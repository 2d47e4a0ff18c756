"""Collate: padding to the largest image with a right mask, normalization, per-image targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.data.batching import (
    collate_table,
    drop_crowd,
    iter_batches,
    pad_and_normalize,
    samples_to_table,
    to_model_batch,
)
from pipelines.data.transforms import normalize_image

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _sample(rng, h, w, k, image_id):
    boxes = rng.uniform(0, 1, (k, 4)).astype(np.float32)
    return {
        "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "image_id": image_id,
        "file_name": f"{image_id}.jpg",
        "orig_size": (h * 2, w * 2),
        "boxes": boxes,
        "labels": rng.integers(1, 91, k),
        "iscrowd": (np.arange(k) == 0).astype(np.int8) if k else np.zeros(0),
        "ann_id": np.arange(k) + 100 * image_id,
        "affine": np.array([0.5, 0, 0.5, 0]),
        "epoch": 3,
    }


def test_pad_and_normalize_mask():
    rng = np.random.default_rng(0)
    ims = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(5, 7), (9, 3), (2, 2)]]
    flat = torch.from_numpy(np.concatenate([im.reshape(-1) for im in ims]))
    images, mask = pad_and_normalize(flat, [im.shape[:2] for im in ims], (0.0, 0.0, 0.0), (1 / 255,) * 3)
    assert images.shape == (3, 3, 9, 7) and mask.shape == (3, 9, 7) and mask.dtype == torch.bool
    for i, im in enumerate(ims):
        h, w = im.shape[:2]
        assert (images[i, :, :h, :w].permute(1, 2, 0).numpy() == im).all()
        expected = np.ones((9, 7), bool)
        expected[:h, :w] = False
        assert (mask[i].numpy() == expected).all()
        assert (images[i][:, mask[i]] == 0).all()


def test_collate_and_model_batch():
    rng = np.random.default_rng(1)
    samples = [_sample(rng, 30, 40, 3, 1), _sample(rng, 50, 20, 0, 2), _sample(rng, 10, 60, 2, 3)]
    flat = collate_table(samples_to_table(samples))
    assert flat["pixels"].shape == (3 * (30 * 40 + 50 * 20 + 10 * 60),) and flat["pixels"].dtype == torch.uint8
    assert flat["num_boxes"].tolist() == [3, 0, 2] and flat["boxes"].shape == (5, 4)
    assert all(isinstance(v, torch.Tensor) for v in flat.values()), "Ray's device transfer needs tensors only"
    batch = to_model_batch(flat, pixel_mean=MEAN, pixel_std=STD, device="cpu")
    images, mask, targets = batch["images"], batch["mask"], batch["targets"]
    assert images.dtype == torch.float32 and images.is_contiguous() and images.shape == (3, 3, 50, 60)
    for i, s in enumerate(samples):
        h, w = s["image"].shape[:2]
        torch.testing.assert_close(images[i, :, :h, :w], normalize_image(s["image"], MEAN, STD))
        assert (images[i][:, mask[i]] == 0).all() and not mask[i, :h, :w].any() and mask[i].sum() == 50 * 60 - h * w
        t = targets[i]
        np.testing.assert_array_equal(t["boxes"].numpy(), s["boxes"])
        assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
        assert t["labels"].tolist() == list(s["labels"]) and t["ann_id"].tolist() == list(s["ann_id"])
        assert t["image_id"] == s["image_id"]
        assert t["size"].tolist() == [h, w] and t["orig_size"].tolist() == [2 * h, 2 * w]
    kept = drop_crowd(targets)
    assert [len(t["boxes"]) for t in kept] == [2, 0, 1] and not any(t["iscrowd"].any() for t in kept)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_batch_on_gpu_matches_cpu():
    rng = np.random.default_rng(2)
    flat = collate_table(samples_to_table([_sample(rng, 30, 40, 3, 1), _sample(rng, 50, 20, 1, 2)]))
    cpu = to_model_batch(flat, pixel_mean=MEAN, pixel_std=STD, device="cpu")
    gpu = to_model_batch({k: v.pin_memory() for k, v in flat.items()}, pixel_mean=MEAN, pixel_std=STD, device="cuda")
    assert gpu["images"].is_cuda and gpu["targets"][0]["boxes"].is_cuda
    torch.testing.assert_close(gpu["images"].cpu(), cpu["images"])
    assert torch.equal(gpu["mask"].cpu(), cpu["mask"])
    for a, b in zip(gpu["targets"], cpu["targets"]):
        torch.testing.assert_close(a["boxes"].cpu(), b["boxes"])
        assert a["image_id"] == b["image_id"]


def test_collate_of_a_sliced_table_reads_its_own_pixels():
    """Rows 1 and 2 of a table (a batch cut from inside a block) give images 1 and 2's pixels, not 0 and 1's."""
    rng = np.random.default_rng(3)
    samples = [_sample(rng, 4, 5, 1, i) for i in range(3)]
    for i, s in enumerate(samples):
        s["image"] = np.full((4, 5, 3), 10 * (i + 1), np.uint8)
    flat = collate_table(samples_to_table(samples).slice(1))
    assert flat["image_id"].tolist() == [1, 2]
    pixels = flat["pixels"].numpy()
    assert pixels.shape == (2 * 4 * 5 * 3,)
    assert (pixels[:60] == 20).all() and (pixels[60:] == 30).all()


class _Shard:
    """A stand-in for a worker's DataIterator: the batches it would yield, already collated."""

    def __init__(self, batches):
        self.batches = batches

    def iter_torch_batches(self, **kwargs):
        return iter(self.batches)


def test_resume_skips_exactly_the_batches_trained():
    """skip_batches=2 (a restart after two batches of the epoch) yields batches 3 and 4, nothing twice or lost."""
    rng = np.random.default_rng(4)
    batches = [collate_table(samples_to_table([_sample(rng, 6, 8, 1, 10 * b + i) for i in range(2)])) for b in range(4)]
    seen = [
        [t["image_id"] for t in batch["targets"]]
        for batch in iter_batches(_Shard(batches), 2, epoch=3, device="cpu", skip_batches=2)
    ]
    assert seen == [[20, 21], [30, 31]]
    drawn = set()
    everything = iter_batches(_Shard(batches), 2, epoch=3, device="cpu", drawn_epochs=drawn)
    assert len(list(everything)) == 4 and drawn == {3}
