"""The `data` section of the run config: where COCO lives, how it is read, decoded and augmented."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipelines.storage import is_absolute, join_uri

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Split = Literal["train", "val"]


def under_root(root: str, rel: str) -> str:
    """`rel` under `root` unless `rel` is already absolute (`/x`, `s3://b/x`, `gs://b/x`)."""
    if is_absolute(rel) or not root:
        return rel
    if not rel:
        return root
    return join_uri(root, rel)


class DataConfig(BaseModel):
    """COCO instances data, read with Ray Data from a local folder, `s3://` or `gs://`.

    Relative image folders, annotation files and `parquet_dir` resolve against `root`. Credentials
    belong in the environment (AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, ...): keys given in
    `root`'s query or `storage_options` work, but the config is saved in every checkpoint.
    """

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)  # `--set data.root=2024` is a path

    # Where the data is.
    root: str = Field("data/coco", description="base folder or bucket prefix (s3://b/p, gs://b/p)")
    train_images: str = Field("train2017", description="train image folder, relative to root or absolute")
    val_images: str = Field("val2017", description="val image folder, relative to root or absolute")
    train_ann: str = Field("annotations/instances_train2017.json", description="train instances JSON")
    val_ann: str = Field("annotations/instances_val2017.json", description="val instances JSON")
    parquet_dir: str | None = Field(
        None, description="prepared Parquet shards (pipelines.data prepare); read instead of the folder when set"
    )
    storage_options: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="kwargs for pyarrow.fs.S3FileSystem / GcsFileSystem, e.g. endpoint_override, region, scheme",
    )

    # What a sample means.
    category_ids: Literal["raw", "contiguous"] = Field(
        "raw",
        description="raw: labels are COCO's category ids and the head has max_id+1 classes (91 for COCO, "
        "as the authors do); contiguous: labels 0..C-1, the mapping kept in DatasetInfo and checkpoints",
    )
    on_bad_input: Literal["error", "skip"] = Field(
        "error", description="error: stop naming the file or annotation id; skip: drop it and count it"
    )
    box_edge_tolerance: float = Field(
        1.0, description="pixels a box may reach past the image edge before it is bad input (it is clipped)"
    )

    # The paper's augmentation (Deformable DETR = DETR's recipe).
    train_short_sides: tuple[int, ...] = tuple(range(480, 801, 32))
    max_size: int = 1333
    val_short_side: int = 800
    crop_resize_sides: tuple[int, ...] = (400, 500, 600)
    crop_size: tuple[int, int] = (384, 600)
    hflip_prob: float = 0.5
    crop_prob: float = Field(0.5, description="probability of the resize-crop-resize branch")
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD

    # Throughput.
    batch_size_per_worker: int = 2
    num_decode_workers: int | None = Field(
        None, description="Ray Data tasks decoding at once; None lets Ray Data use the free CPUs"
    )
    rows_per_task: int = Field(
        32,
        description="images per Ray Data read/decode task and Parquet row group; bigger amortizes Ray's "
        "per-task cost (32: 6% less CPU per image than 16), smaller starts faster",
    )
    read_threads: int = Field(16, description="concurrent file reads inside one task (object stores need many)")
    images_per_shard: int = Field(1024, description="images per Parquet shard written by prepare")
    shuffle_buffer_size: int = Field(
        0, description="worker-local shuffle buffer in rows (on top of the per-epoch global order); 0 = off"
    )
    prefetch_batches: int = 2
    decoder: Literal["auto", "pillow"] = Field("auto", description="auto: simplejpeg for JPEG when installed")
    seed: int = 42

    @field_validator("train_short_sides", "crop_resize_sides")
    @classmethod
    def _sides_positive(cls, v: tuple[int, ...], info) -> tuple[int, ...]:
        if not v or any(s <= 0 for s in v):
            raise ValueError(f"{info.field_name} must be a non-empty list of positive sizes, got {list(v)}")
        return v

    @field_validator(
        "max_size", "val_short_side", "batch_size_per_worker", "rows_per_task", "read_threads", "images_per_shard"
    )
    @classmethod
    def _positive(cls, v: int, info) -> int:
        if v < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {v}")
        return v

    @field_validator("num_decode_workers")
    @classmethod
    def _workers(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"num_decode_workers must be >= 1 or None, got {v}")
        return v

    @field_validator("shuffle_buffer_size", "prefetch_batches", "seed")
    @classmethod
    def _non_negative(cls, v: int, info) -> int:
        if v < 0:
            raise ValueError(f"{info.field_name} must be >= 0, got {v}")
        return v

    @field_validator("hflip_prob", "crop_prob")
    @classmethod
    def _prob(cls, v: float, info) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{info.field_name} must be in [0, 1], got {v}")
        return v

    @field_validator("box_edge_tolerance")
    @classmethod
    def _tolerance(cls, v: float) -> float:
        if v < 0:
            raise ValueError(f"box_edge_tolerance must be >= 0 pixels, got {v}")
        return v

    @field_validator("pixel_std")
    @classmethod
    def _std(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in v):
            raise ValueError(f"pixel_std must be positive, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _crop(self) -> DataConfig:
        lo, hi = self.crop_size
        if not 1 <= lo <= hi:
            raise ValueError(f"crop_size must be (min, max) with 1 <= min <= max, got {self.crop_size}")
        return self

    def images_uri(self, split: Split) -> str:
        return under_root(self.root, self.train_images if split == "train" else self.val_images)

    def ann_uri(self, split: Split) -> str:
        return under_root(self.root, self.train_ann if split == "train" else self.val_ann)

    def parquet_uri(self) -> str | None:
        return None if self.parquet_dir is None else under_root(self.root, self.parquet_dir)
