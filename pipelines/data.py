"""Ray Data datasets of COCO for training and evaluation: read, decode, augment, shard and batch.

Legend: N images in a batch, K boxes of an image.

A dataset is `ray.data.range(num_units)` mapped through one task per unit (a slice of the image list,
or a Parquet row group): read the bytes, decode, augment, and emit SAMPLE_SCHEMA rows. The order and
every random draw are functions of (seed, epoch, image id), so an epoch is reproducible whichever
task or worker handles an image. The epoch comes from an `EpochClock` actor that the training loop
sets before each epoch, when the dataset is built with one (training does: a restarted or resumed
loop then draws exactly its own epochs); without one it is `start_epoch` plus the number of times the
dataset has been executed (Ray's per-dataset execution index): iterate such a dataset once per epoch
and don't execute it on the driver first.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from pipelines.batching import SAMPLE_SCHEMA, DetectionCollate, samples_to_table, to_model_batch
from pipelines.coco import (
    ROW_SCHEMA,
    BadInputError,
    BadInputSummary,
    CategoryMap,
    CocoIndex,
    attach_image_bytes,
    check_bad_input,
    filesystem_for,
    load_coco,
    load_json,
    write_file,
)
from pipelines.data_config import IMAGENET_MEAN, IMAGENET_STD, DataConfig, Split
from pipelines.decode import ImageDecodeError, decode_image
from pipelines.transforms import (
    boxes_xywh_to_xyxy,
    boxes_xyxy_to_cxcywh_normalized,
    train_transform,
    val_transform,
)

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1


# --------------------------------------------------------------------------- metadata


@ray.remote(num_cpus=0)
class BadInputLedger:
    """Collects images skipped inside Ray Data tasks (undecodable, wrong size), once per file."""

    def __init__(self) -> None:
        self._summary = BadInputSummary()
        self._seen: set[tuple[str, str]] = set()

    def record(self, items: list[tuple[str, str]]) -> None:
        for kind, ident in items:
            if (kind, ident) not in self._seen:
                self._seen.add((kind, ident))
                self._summary.add(kind, ident)

    def summary(self) -> dict[str, Any]:
        return self._summary.to_dict()


@ray.remote(num_cpus=0)
class EpochClock:
    """The epoch the training loop is in, read by the dataset's read tasks.

    Every worker sets it before iterating an epoch (the same value: whichever comes first, Ray Data's
    streaming split starts the execution only once all workers have asked for it).
    """

    def __init__(self, epoch: int = 0) -> None:
        self._epoch = epoch

    def set(self, epoch: int) -> None:
        self._epoch = epoch

    def get(self) -> int:
        return self._epoch


@dataclass
class DatasetInfo:
    """What a dataset holds; `to_dict()` goes into checkpoints next to the config."""

    split: str
    num_images: int
    categories: CategoryMap
    source: str  # the instances JSON, or the Parquet manifest
    augment: bool
    keep_crowd: bool
    start_epoch: int = 0
    bad_input: BadInputSummary = field(default_factory=BadInputSummary)  # found before reading pixels
    ledger: Any = None  # BadInputLedger handle when on_bad_input == "skip"

    @property
    def num_classes(self) -> int:
        return self.categories.num_classes

    @property
    def category_ids(self) -> list[int]:
        return list(self.categories.category_ids)

    @property
    def category_names(self) -> list[str]:
        return list(self.categories.names)

    def bad_input_report(self) -> BadInputSummary:
        """Everything skipped so far: at parse time, and inside decode tasks of the epochs run so far."""
        if self.ledger is None:
            return self.bad_input
        return self.bad_input.merge(BadInputSummary.from_dict(ray.get(self.ledger.summary.remote())))

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "num_images": self.num_images,
            "source": self.source,
            "categories": self.categories.to_dict(),
            "bad_input": self.bad_input_report().to_dict(),
        }


# --------------------------------------------------------------------------- per-image work


def _epoch_now(start_epoch: int) -> int:
    # Ray bumps the dataset's execution index after each full run; its seeded shuffles read it too.
    return start_epoch + int(getattr(ray.data.DataContext.get_current(), "_execution_idx", 0))


def make_sample(
    image_bytes: bytes | memoryview,
    row: Mapping[str, Any],
    *,
    categories: CategoryMap,
    cfg: DataConfig,
    augment: bool,
    keep_crowd: bool,
    epoch: int,
) -> dict[str, Any]:
    """Decode and transform one image with its annotations; usable without Ray.

    Args:
        image_bytes: the encoded file.
        row: a META_SCHEMA row as a dict (image_id, file_name, height, width, boxes flat xywh,
            category_id, iscrowd, ann_id).
        augment: the paper's training augmentation, drawn from (cfg.seed, epoch, image_id);
            otherwise the validation resize.
        keep_crowd: keep iscrowd boxes (flagged) in the targets; training leaves them out.

    Returns:
        image (h, w, 3) uint8, boxes (K, 4) float32 normalized cxcywh, labels (K,) int64,
        iscrowd (K,) int8, ann_id (K,) int64, image_id, file_name, orig_size (H, W), affine (4,),
        epoch (-1 without augmentation).

    Raises:
        ImageDecodeError: the bytes don't decode.
        BadInputError: the decoded size differs from the annotation's height/width.
    """
    name = row["file_name"]
    image = decode_image(image_bytes, name=name, decoder=cfg.decoder)
    h, w = image.shape[:2]
    if (h, w) != (row["height"], row["width"]):
        raise BadInputError(
            f"{name} (image {row['image_id']}): decoded size {h}x{w} differs from the "
            f"annotation's {row['height']}x{row['width']}"
        )
    boxes = boxes_xywh_to_xyxy(np.asarray(row["boxes"], np.float32))
    cat = np.asarray(row["category_id"], np.int64)
    crowd = np.asarray(row["iscrowd"], np.int8)
    ann_id = np.asarray(row["ann_id"], np.int64)
    if not keep_crowd:
        sel = crowd == 0
        boxes, cat, crowd, ann_id = boxes[sel], cat[sel], crowd[sel], ann_id[sel]
    if augment:
        rng = np.random.default_rng([cfg.seed, epoch, int(row["image_id"])])
        out = train_transform(
            image,
            boxes,
            rng,
            short_sides=cfg.train_short_sides,
            max_size=cfg.max_size,
            crop_resize_sides=cfg.crop_resize_sides,
            crop_size=cfg.crop_size,
            hflip_prob=cfg.hflip_prob,
            crop_prob=cfg.crop_prob,
        )
    else:
        out = val_transform(image, boxes, short_side=cfg.val_short_side, max_size=cfg.max_size)
    oh, ow = out.image.shape[:2]
    return {
        "image": out.image,
        "image_id": int(row["image_id"]),
        "file_name": name,
        "orig_size": (h, w),
        "boxes": boxes_xyxy_to_cxcywh_normalized(out.boxes_xyxy, oh, ow),
        "labels": categories.labels(cat[out.keep]),
        "iscrowd": crowd[out.keep],
        "ann_id": ann_id[out.keep],
        "affine": out.affine.as_array(),
        "epoch": epoch if augment else -1,
    }


class _Decode:
    """ROW_SCHEMA table -> SAMPLE_SCHEMA table; bad images raise or go to the ledger."""

    def __init__(self, cfg: DataConfig, categories: CategoryMap, augment: bool, keep_crowd: bool, ledger: Any):
        self.cfg, self.categories, self.augment, self.keep_crowd, self.ledger = (
            cfg,
            categories,
            augment,
            keep_crowd,
            ledger,
        )

    def __call__(self, rows: pa.Table, epoch: int) -> pa.Table:
        torch.set_num_threads(1)  # one Ray CPU per task: no intra-op threads fighting the other tasks
        images = rows.column("image").to_pylist()
        meta = rows.drop_columns(["image"]).to_pylist()
        samples, bad = [], []
        for data, row in zip(images, meta):
            try:
                samples.append(
                    make_sample(
                        data,
                        row,
                        categories=self.categories,
                        cfg=self.cfg,
                        augment=self.augment,
                        keep_crowd=self.keep_crowd,
                        epoch=epoch,
                    )
                )
            except ImageDecodeError as e:
                if self.cfg.on_bad_input == "error":
                    raise BadInputError(
                        f"undecodable image {e} (image {row['image_id']}); set "
                        "data.on_bad_input=skip to skip and count such files"
                    ) from e
                bad.append(("undecodable_image", f"{row['file_name']} (image {row['image_id']})"))
            except BadInputError as e:
                if self.cfg.on_bad_input == "error":
                    raise
                bad.append(("size_mismatch", f"{row['file_name']} (image {row['image_id']}): {e}"))
        if bad and self.ledger is not None:
            ray.get(self.ledger.record.remote(bad))  # recorded before these rows can be consumed
        return samples_to_table(samples) if samples else SAMPLE_SCHEMA.empty_table()


class _FolderUnits:
    """Unit u = images [u*k, (u+1)*k) of the epoch's permutation of the annotation file's images."""

    def __init__(self, meta: pa.Table, images_uri: str, cfg: DataConfig, shuffle: bool):
        self.meta, self.images_uri, self.cfg, self.shuffle = meta, images_uri, cfg, shuffle
        self.num_units = max(1, math.ceil(meta.num_rows / cfg.rows_per_task)) if meta.num_rows else 0

    def read(self, unit: int, epoch: int) -> tuple[pa.Table, list[tuple[str, str]]]:
        n, k = self.meta.num_rows, self.cfg.rows_per_task
        if self.shuffle:
            order = np.random.default_rng([self.cfg.seed, epoch]).permutation(n)[unit * k : (unit + 1) * k]
        else:
            order = np.arange(unit * k, min(n, (unit + 1) * k))
        return attach_image_bytes(
            self.meta.take(order),
            self.images_uri,
            self.cfg.storage_options,
            threads=self.cfg.read_threads,
            on_bad_input=self.cfg.on_bad_input,
        )


class _ParquetUnits:
    """Unit u = one row group of a prepared shard; shuffled: a per-epoch order of row groups and of rows."""

    def __init__(self, groups: list[tuple[str, int]], cfg: DataConfig, shuffle: bool):
        self.groups, self.cfg, self.shuffle = groups, cfg, shuffle
        self.num_units = len(groups)

    def read(self, unit: int, epoch: int) -> tuple[pa.Table, list[tuple[str, str]]]:
        if self.shuffle:
            unit = int(np.random.default_rng([self.cfg.seed, epoch]).permutation(self.num_units)[unit])
        path, group = self.groups[unit]
        fs, p = filesystem_for(path, self.cfg.storage_options)
        with fs.open_input_file(p) as f:
            table = pq.ParquetFile(f).read_row_group(group).cast(ROW_SCHEMA)
        if self.shuffle:
            table = table.take(np.random.default_rng([self.cfg.seed, epoch, unit]).permutation(table.num_rows))
        return table, []


class _ReadUnits:
    """The map_batches UDF: unit ids -> rows (raw, or decoded samples when `decode` is set)."""

    def __init__(
        self,
        units: _FolderUnits | _ParquetUnits,
        start_epoch: int,
        decode: _Decode | None,
        ledger: Any,
        epoch_clock: Any = None,
    ):
        self.units, self.start_epoch, self.decode, self.ledger = units, start_epoch, decode, ledger
        self.epoch_clock = epoch_clock

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.epoch_clock is not None:
            epoch = ray.get(self.epoch_clock.get.remote())
        else:
            epoch = _epoch_now(self.start_epoch)
        out = []
        for unit in batch.column("id").to_pylist():
            rows, bad = self.units.read(int(unit), epoch)
            if bad and self.ledger is not None:
                ray.get(self.ledger.record.remote(bad))
            out.append(self.decode(rows, epoch) if self.decode is not None else rows)
        schema = SAMPLE_SCHEMA if self.decode is not None else ROW_SCHEMA
        return pa.concat_tables(out) if out else schema.empty_table()


# --------------------------------------------------------------------------- builders


def load_index(cfg: DataConfig, split: Split) -> CocoIndex:
    """Parse and check the split's instances JSON and its image files (driver side, once)."""
    return load_coco(
        cfg.ann_uri(split),
        _absolute(cfg.images_uri(split)),
        storage_options=cfg.storage_options,
        on_bad_input=cfg.on_bad_input,
        box_edge_tolerance=cfg.box_edge_tolerance,
    )


def _absolute(uri: str) -> str:
    # Ray workers may run in another working directory than the driver.
    return uri if "://" in uri else filesystem_for(uri)[1]


def _manifest_uri(cfg: DataConfig, split: Split) -> str:
    return f"{cfg.parquet_uri().rstrip('/')}/{split}_manifest.json"


def _units(cfg: DataConfig, split: Split, shuffle: bool) -> tuple[_FolderUnits | _ParquetUnits, dict[str, Any]]:
    if cfg.parquet_dir is not None:
        uri = _manifest_uri(cfg, split)
        try:
            m = load_json(uri, cfg.storage_options)
        except BadInputError as e:
            raise BadInputError(
                f"no prepared Parquet shards for {split}: {e}. Run `python -m pipelines.data "
                f"prepare --split {split} ...` or unset data.parquet_dir"
            ) from e
        if m.get("version") != MANIFEST_VERSION:
            raise BadInputError(f"{uri}: manifest version {m.get('version')}, expected {MANIFEST_VERSION}")
        base = _absolute(cfg.parquet_uri()).rstrip("/")
        groups = [(f"{base}/{s['path']}", g) for s in m["shards"] for g in range(len(s["row_groups"]))]
        return _ParquetUnits(groups, cfg, shuffle), {
            "source": uri,
            "num_images": m["num_images"],
            "categories": m["categories"],
            "bad_input": BadInputSummary.from_dict(m["bad_input"]),
        }
    index = load_index(cfg, split)
    return _FolderUnits(index.table, _absolute(cfg.images_uri(split)), cfg, shuffle), {
        "source": cfg.ann_uri(split),
        "num_images": index.table.num_rows,
        "categories": index.categories,
        "bad_input": index.summary,
    }


def _build(
    cfg: DataConfig,
    split: Split,
    *,
    decode: bool,
    augment: bool,
    shuffle: bool,
    keep_crowd: bool,
    start_epoch: int,
    epoch_clock: Any = None,
) -> tuple[ray.data.Dataset, DatasetInfo]:
    units, meta = _units(cfg, split, shuffle)
    ledger = BadInputLedger.remote() if cfg.on_bad_input == "skip" else None
    categories = CategoryMap.from_categories(meta["categories"], cfg.category_ids)
    info = DatasetInfo(
        split=split,
        num_images=meta["num_images"],
        categories=categories,
        source=meta["source"],
        augment=augment,
        keep_crowd=keep_crowd,
        start_epoch=start_epoch,
        bad_input=meta["bad_input"],
        ledger=ledger,
    )
    dec = _Decode(cfg, categories, augment, keep_crowd, ledger) if decode else None
    compute = ray.data.TaskPoolStrategy(size=cfg.num_decode_workers) if cfg.num_decode_workers is not None else None
    ds = ray.data.range(units.num_units, override_num_blocks=max(1, units.num_units))
    ds = ds.map_batches(
        _ReadUnits(units, start_epoch, dec, ledger, epoch_clock),
        batch_size=None,
        batch_format="pyarrow",
        compute=compute,
    )
    # The order is a function of (seed, epoch) only if Ray keeps it; Ray Train replaces a dataset's
    # execution options, so trainers pass `ingest_options()` too.
    ds.context.execution_options.preserve_order = True
    return ds, info


def build_raw_dataset(
    cfg: DataConfig, split: Split, *, shuffle: bool = False, start_epoch: int = 0
) -> tuple[ray.data.Dataset, DatasetInfo]:
    """Undecoded ROW_SCHEMA rows (image bytes and annotations), from the folder or the Parquet shards."""
    return _build(cfg, split, decode=False, augment=False, shuffle=shuffle, keep_crowd=True, start_epoch=start_epoch)


def build_dataset(
    cfg: DataConfig,
    split: Split,
    *,
    augment: bool | None = None,
    shuffle: bool | None = None,
    keep_crowd: bool | None = None,
    start_epoch: int = 0,
    epoch_clock: Any = None,
) -> tuple[ray.data.Dataset, DatasetInfo]:
    """Decoded, augmented SAMPLE_SCHEMA rows for training or evaluation.

    Args:
        cfg: the data config.
        split: "train" or "val".
        augment, shuffle: default to True for train and False for val (val keeps the JSON's order).
        keep_crowd: default False for train (crowd boxes are not training targets) and True for val,
            where they come flagged in `iscrowd` (use `batching.drop_crowd` for a validation loss).
        start_epoch: the epoch of the first execution, when resuming (without `epoch_clock`).
        epoch_clock: an `EpochClock` handle: each execution draws the epoch the clock says, which the
            training loop sets, instead of counting executions.

    Returns:
        The dataset (one row per image) and its DatasetInfo.

    Raises:
        BadInputError: malformed annotations or files (at once), or undecodable images (while
            iterating), unless `cfg.on_bad_input == "skip"`.
    """
    train = split == "train"
    return _build(
        cfg,
        split,
        decode=True,
        augment=train if augment is None else augment,
        shuffle=train if shuffle is None else shuffle,
        keep_crowd=(not train) if keep_crowd is None else keep_crowd,
        start_epoch=start_epoch,
        epoch_clock=epoch_clock,
    )


def ingest_options() -> ray.data.ExecutionOptions:
    """Execution options for `ray.train.DataConfig(execution_options=...)`: keeps the reproducible order."""
    opts = ray.train.DataConfig.default_ingest_options()
    opts.preserve_order = True
    return opts


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
    for batch in batches:
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


# --------------------------------------------------------------------------- Parquet


class _WriteShard:
    """Shard s = images [s*S, (s+1)*S) of the mixed image list, written row group by row group."""

    def __init__(self, meta: pa.Table, images_uri: str, out_uri: str, cfg: DataConfig):
        self.meta, self.images_uri, self.out_uri, self.cfg = meta, images_uri, out_uri, cfg

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for s in batch.column("id").to_pylist():
            rows.append(self._write(int(s)))
        return pa.Table.from_pylist(rows)

    def _write(self, s: int) -> dict[str, Any]:
        cfg, per = self.cfg, self.cfg.images_per_shard
        part = self.meta.slice(s * per, per)
        rel = f"part-{s:05d}.parquet"
        fs, path = filesystem_for(f"{self.out_uri}/{rel}", cfg.storage_options)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        groups, bad = [], BadInputSummary()
        with (
            fs.open_output_stream(path) as f,
            pq.ParquetWriter(f, ROW_SCHEMA, compression="none", write_statistics=["image_id"]) as writer,
        ):
            for start in range(0, part.num_rows, cfg.rows_per_task):
                rows, b = attach_image_bytes(
                    part.slice(start, cfg.rows_per_task),
                    self.images_uri,
                    cfg.storage_options,
                    threads=cfg.read_threads,
                    on_bad_input=cfg.on_bad_input,
                )
                for kind, ident in b:
                    bad.add(kind, ident)
                if rows.num_rows:
                    writer.write_table(rows, row_group_size=rows.num_rows)
                    groups.append(rows.num_rows)
        return {"path": rel, "num_rows": sum(groups), "row_groups": groups, "bad_input": json.dumps(bad.to_dict())}


def prepare_parquet(cfg: DataConfig, split: Split) -> str:
    """Write the split's joined rows as Parquet shards under `cfg.parquet_dir`, plus a manifest.

    Shards hold `cfg.images_per_shard` images in row groups of `cfg.rows_per_task`, mixed in a seeded
    order so a row group is a random sample. Reading them back (`parquet_dir` set) gives the same rows.

    Returns:
        The manifest's URI.
    """
    if cfg.parquet_dir is None:
        raise ValueError("parquet_dir must be set to prepare Parquet shards")
    index = load_index(cfg, split)
    meta = index.table.take(np.random.default_rng([cfg.seed, 7919]).permutation(index.table.num_rows))
    out_uri = f"{_absolute(cfg.parquet_uri()).rstrip('/')}/{split}"
    num_shards = math.ceil(meta.num_rows / cfg.images_per_shard)
    compute = ray.data.TaskPoolStrategy(size=cfg.num_decode_workers) if cfg.num_decode_workers is not None else None
    ds = ray.data.range(num_shards, override_num_blocks=max(1, num_shards)).map_batches(
        _WriteShard(meta, _absolute(cfg.images_uri(split)), out_uri, cfg),
        batch_size=None,
        batch_format="pyarrow",
        compute=compute,
    )
    shards = sorted(ds.take_all(), key=lambda r: r["path"])
    bad = index.summary
    for s in shards:
        bad = bad.merge(BadInputSummary.from_dict(json.loads(s.pop("bad_input"))))
    check_bad_input(bad, cfg.on_bad_input, cfg.images_uri(split))
    manifest = {
        "version": MANIFEST_VERSION,
        "split": split,
        "num_images": sum(s["num_rows"] for s in shards),
        "source_ann": cfg.ann_uri(split),
        "source_images": cfg.images_uri(split),
        "categories": index.categories,
        "bad_input": bad.to_dict(),
        "shards": [
            {"path": f"{split}/{s['path']}", "num_rows": s["num_rows"], "row_groups": list(s["row_groups"])}
            for s in shards
        ],
    }
    uri = _manifest_uri(cfg, split)
    write_file(_absolute(uri), json.dumps(manifest, indent=1).encode(), cfg.storage_options)
    return uri


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Prepare Parquet shards of a COCO split for faster reading.")
    p.add_argument("command", choices=["prepare"])
    p.add_argument("--split", choices=["train", "val"], action="append", required=True)
    p.add_argument(
        "overrides",
        nargs="*",
        help="DataConfig fields as key=value (JSON values allowed), "
        "e.g. root=s3://bucket/coco parquet_dir=s3://bucket/coco-parquet",
    )
    args = p.parse_intermixed_args(argv)
    kw: dict[str, Any] = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"expected key=value, got {item!r}")
        try:
            kw[key] = json.loads(value)
        except json.JSONDecodeError:
            kw[key] = value
    cfg = DataConfig(**kw)
    for split in args.split:
        print(prepare_parquet(cfg, split))


if __name__ == "__main__":
    main()
