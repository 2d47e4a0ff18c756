"""Collate augmented samples into padded model batches: images, padding mask and per-image targets.

Legend: N images in a batch; H, W the largest augmented height and width in it; h, w one image's;
ΣK the boxes of the whole batch. Boxes are normalized cxcywh of the unpadded augmented image.

Collate returns flat tensors only (each image's pixels and boxes back to back, plus sizes and counts):
Ray's device transfer concatenates any list of tensors inside a dict, and flat uint8 pixels are the
fewest bytes to move. `to_model_batch` pads, normalizes and splits into per-image targets after the
transfer, on the device.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from pipelines.data.data_config import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

# One augmented image per row, as the Ray Data decode step writes it and the collate reads it.
SAMPLE_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),  # (h, w, 3) uint8 RGB, C order
        ("height", pa.int32()),  # h after augmentation
        ("width", pa.int32()),
        ("orig_height", pa.int32()),  # as decoded, before augmentation
        ("orig_width", pa.int32()),
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("boxes", pa.list_(pa.float32())),  # (K*4,) normalized cxcywh, flat
        ("labels", pa.list_(pa.int64())),  # (K,) head labels (raw COCO ids or contiguous)
        ("iscrowd", pa.list_(pa.int8())),  # (K,)
        ("ann_id", pa.list_(pa.int64())),  # (K,) COCO annotation ids, to trace a box back
        ("affine", pa.list_(pa.float64())),  # (4,) sx, tx, sy, ty: original pixels -> augmented pixels
        ("epoch", pa.int64()),  # the epoch the augmentation was drawn for
    ]
)


def samples_to_table(samples: Sequence[dict[str, Any]]) -> pa.Table:
    """Per-image sample dicts (see `pipelines.data.sample.make_sample`) -> a SAMPLE_SCHEMA table."""

    def col(name, fn=lambda v: v):
        return [fn(s[name]) for s in samples]

    # One copy of the pixels into one Arrow buffer (a list of bytes objects would cost two).
    pixels = [np.ascontiguousarray(s["image"], np.uint8).reshape(-1) for s in samples]
    offsets = np.concatenate([[0], np.cumsum([p.size for p in pixels])]).astype(np.int32)
    data = np.concatenate(pixels) if pixels else np.zeros(0, np.uint8)
    images = pa.Array.from_buffers(pa.binary(), len(samples), [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    return pa.Table.from_pydict(
        {
            "image": images,
            "height": [s["image"].shape[0] for s in samples],
            "width": [s["image"].shape[1] for s in samples],
            "orig_height": [int(s["orig_size"][0]) for s in samples],
            "orig_width": [int(s["orig_size"][1]) for s in samples],
            "image_id": col("image_id", int),
            "file_name": col("file_name", str),
            "boxes": col("boxes", lambda b: pa.array(np.asarray(b, np.float32).reshape(-1))),
            "labels": col("labels", lambda v: pa.array(np.asarray(v, np.int64))),
            "iscrowd": col("iscrowd", lambda v: pa.array(np.asarray(v, np.int8))),
            "ann_id": col("ann_id", lambda v: pa.array(np.asarray(v, np.int64))),
            "affine": col("affine", lambda v: pa.array(np.asarray(v, np.float64))),
            "epoch": col("epoch", int),
        },
        schema=SAMPLE_SCHEMA,
    )


def _binary_pixels(col: pa.ChunkedArray) -> tuple[np.ndarray, list[int]]:
    """A binary column -> (all values back to back as uint8, each value's length).

    Zero-copy when the batch is one Arrow chunk (the usual case: batches inside a block), one
    memcpy per value otherwise.
    """
    parts, lengths = [], []
    for chunk in col.chunks:
        width = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        _, offsets_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=width)[chunk.offset : chunk.offset + len(chunk) + 1]
        lengths.extend(np.diff(offsets).tolist())
        if len(chunk):
            parts.append(np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[-1]])
    if len(parts) == 1:
        return parts[0], lengths
    return (np.concatenate(parts) if parts else np.zeros(0, np.uint8)), lengths


def _flat_list(col: pa.ChunkedArray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """A list column -> (all values concatenated, per-row lengths)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return values, lengths


_READONLY_WARNING_SPENT = False


def _readonly_tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor over a read-only array (an Arrow buffer) without a copy; nothing here writes to it."""
    global _READONLY_WARNING_SPENT
    if a.flags.writeable or _READONLY_WARNING_SPENT:
        return torch.from_numpy(a)
    # torch warns once per process that writing would be undefined; we never write, so spend that
    # one warning silently (catch_warnings isn't thread-safe, hence only the first time).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(a)
    _READONLY_WARNING_SPENT = True
    return t


def _ints(col: pa.ChunkedArray) -> np.ndarray:
    return col.to_numpy().astype(np.int64, copy=False)


def collate_table(table: pa.Table) -> dict[str, torch.Tensor]:
    """A SAMPLE_SCHEMA table -> a batch of flat tensors.

    Returns (all on CPU):
        pixels: (Σ h*w*3,) uint8, each image's (h, w, 3) RGB in turn.
        size, orig_size: (N, 2) int64 (h, w) after augmentation and as decoded.
        boxes: (ΣK, 4) float32 normalized cxcywh; `num_boxes` (N,) int64 says how many per image.
        labels: (ΣK,) int64. iscrowd: (ΣK,) bool. ann_id: (ΣK,) int64.
        image_id: (N,) int64. affine: (N, 4) float64. epoch: (N,) int64.
    """
    heights, widths = _ints(table["height"]), _ints(table["width"])
    pixels, lengths = _binary_pixels(table["image"])
    for n, h, w in zip(lengths, heights, widths):
        if n != h * w * 3:
            raise ValueError(f"image of {n} bytes is not {h}x{w}x3")
    boxes, num_boxes = _flat_list(table["boxes"], np.float32)
    labels, _ = _flat_list(table["labels"], np.int64)
    iscrowd, _ = _flat_list(table["iscrowd"], np.int8)
    ann_id, _ = _flat_list(table["ann_id"], np.int64)
    affine, _ = _flat_list(table["affine"], np.float64)
    return {
        "pixels": _readonly_tensor(pixels),
        "size": torch.from_numpy(np.stack([heights, widths], 1)),
        "orig_size": torch.from_numpy(np.stack([_ints(table["orig_height"]), _ints(table["orig_width"])], 1)),
        "boxes": torch.from_numpy(boxes.reshape(-1, 4).copy()),
        "num_boxes": torch.from_numpy(num_boxes // 4),
        "labels": torch.from_numpy(labels.copy()),
        "iscrowd": torch.from_numpy(iscrowd.astype(bool)),
        "ann_id": torch.from_numpy(ann_id.copy()),
        "image_id": torch.from_numpy(_ints(table["image_id"]).copy()),
        "affine": torch.from_numpy(affine.reshape(-1, 4).copy()),
        "epoch": torch.from_numpy(_ints(table["epoch"]).copy()),
    }


class DetectionCollate(ArrowBatchCollateFn):
    """`iter_torch_batches(collate_fn=DetectionCollate())`: Arrow batch -> flat tensors (`collate_table`)."""

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        return collate_table(batch)


def to_model_batch(
    batch: dict[str, torch.Tensor],
    *,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    device: torch.device | str | None = None,
    non_blocking: bool = True,
) -> dict[str, Any]:
    """Flat collated tensors -> what the model and criterion take, on `device`.

    Padding and normalization run here, after the transfer, so only the real pixels in uint8 (4x
    smaller than float32) cross the object store and PCIe.

    Returns:
        images: (N, 3, H, W) float32, normalized, zero on padding, contiguous.
        mask: (N, H, W) bool, True on padding.
        targets: N dicts: boxes (K, 4) float32 normalized cxcywh, labels (K,) int64, iscrowd (K,) bool,
            ann_id (K,) int64, image_id int, orig_size (2,) int64 (h, w), size (2,) int64 (h, w).
    """
    device = torch.device(device) if device is not None else batch["pixels"].device
    counts = batch["num_boxes"].tolist()  # on CPU unless the caller moved it: no device sync then
    image_ids = batch["image_id"].tolist()
    sizes = batch["size"].tolist()

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=non_blocking)

    images, mask = pad_and_normalize(move(batch["pixels"]), sizes, pixel_mean, pixel_std)
    per_image = {k: move(batch[k]).split(counts) for k in ("boxes", "labels", "iscrowd", "ann_id")}
    orig_size, size = move(batch["orig_size"]), move(batch["size"])
    targets = [
        {
            "boxes": per_image["boxes"][i],
            "labels": per_image["labels"][i],
            "iscrowd": per_image["iscrowd"][i],
            "ann_id": per_image["ann_id"][i],
            "image_id": image_ids[i],
            "orig_size": orig_size[i],
            "size": size[i],
        }
        for i in range(len(counts))
    ]
    return {"images": images, "mask": mask, "targets": targets}


def pad_and_normalize(
    pixels: torch.Tensor, sizes: Sequence[Sequence[int]], pixel_mean: Sequence[float], pixel_std: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat uint8 images -> a padded, normalized batch and its padding mask, on the pixels' device.

    Args:
        pixels: (Σ h*w*3,) uint8, each (h, w, 3) image in turn.
        sizes: N (h, w).

    Returns:
        images: (N, 3, H, W) float32 contiguous: (x/255 - mean)/std inside each image, 0 on padding
            (as DETR pads normalized images). One fused multiply-add per image, real pixels only.
        mask: (N, H, W) bool, True on padding.
    """
    if not sizes:
        raise ValueError("cannot collate an empty batch")
    dev = pixels.device
    hw = torch.tensor(sizes, dtype=torch.int64).view(-1, 2)
    hmax, wmax = int(hw[:, 0].max()), int(hw[:, 1].max())
    out = torch.empty((len(sizes), 3, hmax, wmax), dtype=torch.float32, device=dev)
    std = torch.tensor(pixel_std, dtype=torch.float32, device=dev)
    mean = torch.tensor(pixel_mean, dtype=torch.float32, device=dev)
    scale, shift = (1.0 / (255.0 * std)).view(3, 1, 1), (-mean / std).view(3, 1, 1)
    offset = 0
    for i, (h, w) in enumerate(sizes):
        img = pixels[offset : offset + h * w * 3].view(h, w, 3).permute(2, 0, 1)  # (h, w, 3) -> (3, h, w)
        torch.addcmul(shift, img, scale, out=out[i, :, :h, :w])
        out[i, :, h:].zero_()  # only the padding: zeroing the whole batch first costs a full extra pass
        out[i, :, :h, w:].zero_()
        offset += h * w * 3
    if offset != pixels.numel():
        raise ValueError(f"sizes {list(sizes)} account for {offset} bytes of {pixels.numel()} pixels")
    hw = hw.to(dev)
    rows = torch.arange(hmax, device=dev).view(1, -1, 1) >= hw[:, 0].view(-1, 1, 1)
    cols = torch.arange(wmax, device=dev).view(1, 1, -1) >= hw[:, 1].view(-1, 1, 1)
    return out, rows | cols  # (N, H, 1) | (N, 1, W) -> (N, H, W)


def drop_crowd(targets: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Targets without crowd boxes, for a validation loss (pycocotools scores crowd regions itself)."""
    out = []
    for t in targets:
        keep = ~t["iscrowd"]
        out.append({**t, **{k: t[k][keep] for k in ("boxes", "labels", "iscrowd", "ann_id")}})
    return out


# --------------------------------------------------------------------------- worker side


def _device(device: torch.device | str | None) -> torch.device:
    if device is None or device == "auto":
        if torch.cuda.is_available():
            import ray.train.torch

            return ray.train.torch.get_device()
        return torch.device("cpu")
    return torch.device(device)


def _world_rank() -> int:
    try:
        return ray.train.get_context().get_world_rank()
    except Exception:  # not inside a Ray Train worker
        return 0


def iter_batches(
    shard: ray.data.DataIterator | ray.data.Dataset,
    batch_size: int,
    seed: int = 0,
    epoch: int = 0,
    *,
    pixel_mean: Sequence[float] = IMAGENET_MEAN,
    pixel_std: Sequence[float] = IMAGENET_STD,
    device: torch.device | str | None = "auto",
    drop_last: bool = False,
    prefetch_batches: int = 2,
    shuffle_buffer_size: int = 0,
    drawn_epochs: set[int] | None = None,
    skip_batches: int = 0,
) -> Iterator[dict[str, Any]]:
    """Model batches from a worker's shard (`ray.train.get_dataset_shard("train")`) or a dataset.

    Args:
        shard: the worker's DataIterator, or a Dataset.
        batch_size: images per batch on this worker.
        seed, epoch: seed the optional worker-local shuffle (with the worker's rank), and check that the
            dataset was executed as `epoch` (a warning names both if not).
        device: "auto" is the Ray Train worker's device, else CPU. Images are normalized there.
        shuffle_buffer_size: rows in a worker-local shuffle buffer; 0 keeps the dataset's order.
        drawn_epochs: if given, the epochs the augmentation was drawn for are added to it.
        skip_batches: batches of the shard to pass over first, before they are moved or normalized (a
            restart in the middle of an epoch: the batches trained before its checkpoint). They are
            still read and decoded: the order is a property of the whole shard.

    Yields:
        {"images": (N, 3, H, W) float32, "mask": (N, H, W) bool (True = padding), "targets": N dicts},
        see `batching.to_model_batch`.
    """
    dev = _device(device)
    local_seed = None
    if shuffle_buffer_size:
        local_seed = int(np.random.default_rng([seed, epoch, _world_rank()]).integers(2**31))
    batches = shard.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=DetectionCollate(),
        device="cpu",
        drop_last=drop_last,
        prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=shuffle_buffer_size or None,
        local_shuffle_seed=local_seed,
        pin_memory=dev.type == "cuda",
    )
    warned = False
    for index, batch in enumerate(batches):
        if index < skip_batches:
            continue
        drawn = {e for e in batch["epoch"].tolist() if e >= 0}
        if drawn_epochs is not None:
            drawn_epochs.update(drawn)
        if drawn and drawn != {epoch} and not warned:
            logger.warning(
                "augmentation was drawn for epoch(s) %s but the loop is at epoch %d: build the "
                "dataset with start_epoch=<first epoch> and iterate it exactly once per epoch",
                sorted(drawn),
                epoch,
            )
            warned = True
        yield to_model_batch(batch, pixel_mean=pixel_mean, pixel_std=pixel_std, device=dev)
