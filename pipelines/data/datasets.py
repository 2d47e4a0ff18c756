"""Ray Data datasets of COCO for training and evaluation: one read-and-decode task per unit of images.

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

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipelines.data.batching import SAMPLE_SCHEMA
from pipelines.data.categories import CategoryMap
from pipelines.data.coco import (
    ROW_SCHEMA,
    BadInputError,
    BadInputSummary,
    attach_image_bytes,
    load_json,
)
from pipelines.data.data_config import DataConfig, Split
from pipelines.data.index import load_index
from pipelines.data.parquet import MANIFEST_VERSION, manifest_uri
from pipelines.data.sample import DecodeSamples
from pipelines.storage import absolute, filesystem_for, join_uri

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- metadata


@ray.remote(num_cpus=0)
class BadInputLedger:
    """Collects images skipped inside Ray Data tasks (undecodable, wrong size) and flagged ones, once per file."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, str]] = set()
        self._found: dict[str, list[tuple[str, str]]] = {"skipped": [], "flagged": []}

    def record(self, items: list[tuple[str, str]], flagged: list[tuple[str, str]] = ()) -> None:
        """Skipped input (``items``) and input kept but worth a look (``flagged``), as (kind, identity)."""
        for pairs, found in ((items, self._found["skipped"]), (flagged, self._found["flagged"])):
            for kind, ident in pairs:
                if (kind, ident) not in self._seen:  # every epoch decodes every image again
                    self._seen.add((kind, ident))
                    found.append((kind, ident))

    def summary(self) -> dict[str, Any]:
        out = BadInputSummary()
        for add, found in ((out.add, self._found["skipped"]), (out.flag, self._found["flagged"])):
            for kind, ident in found:
                add(kind, ident)
        return out.to_dict()

    def found(self) -> dict[str, list[tuple[str, str]]]:
        """Every (kind, identity) recorded, skipped and flagged: what a resumed run's ledger starts from."""
        return {k: list(v) for k, v in self._found.items()}


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
    ledger: Any = None  # BadInputLedger handle (skips and flags found while decoding)

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

    def found_while_decoding(self) -> dict[str, list[tuple[str, str]]]:
        """Every input skipped or flagged inside decode tasks so far, as (kind, identity) pairs."""
        return {} if self.ledger is None else ray.get(self.ledger.found.remote())

    def restore_found(self, found: Mapping[str, Sequence[Sequence[str]]]) -> None:
        """Records what an earlier session of the run found while decoding (``found_while_decoding``), so
        that the report covers the whole run; later epochs that meet the same input do not count it twice."""
        if self.ledger is not None and found:
            pairs = {k: [(str(kind), str(ident)) for kind, ident in found.get(k, ())] for k in ("skipped", "flagged")}
            ray.get(self.ledger.record.remote(pairs["skipped"], pairs["flagged"]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "num_images": self.num_images,
            "source": self.source,
            "categories": self.categories.to_dict(),
            "bad_input": self.bad_input_report().to_dict(),
        }


def _epoch_now(start_epoch: int) -> int:
    # Ray bumps the dataset's execution index after each full run; its seeded shuffles read it too.
    return start_epoch + int(getattr(ray.data.DataContext.get_current(), "_execution_idx", 0))


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
        decode: DecodeSamples | None,
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


def _units(cfg: DataConfig, split: Split, shuffle: bool) -> tuple[_FolderUnits | _ParquetUnits, dict[str, Any]]:
    if cfg.parquet_dir is not None:
        uri = manifest_uri(cfg, split)
        try:
            m = load_json(uri, cfg.storage_options)
        except BadInputError as e:
            raise BadInputError(
                f"no prepared Parquet shards for {split}: {e}. Run `python -m pipelines.data "
                f"prepare --split {split} ...` or unset data.parquet_dir"
            ) from e
        if m.get("version") != MANIFEST_VERSION:
            raise BadInputError(f"{uri}: manifest version {m.get('version')}, expected {MANIFEST_VERSION}")
        base = absolute(cfg.parquet_uri())
        groups = [(join_uri(base, s["path"]), g) for s in m["shards"] for g in range(len(s["row_groups"]))]
        return _ParquetUnits(groups, cfg, shuffle), {
            "source": uri,
            "num_images": m["num_images"],
            "categories": m["categories"],
            "bad_input": BadInputSummary.from_dict(m["bad_input"]),
        }
    index = load_index(cfg, split)
    return _FolderUnits(index.table, absolute(cfg.images_uri(split)), cfg, shuffle), {
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
    ledger = None
    if decode or cfg.on_bad_input == "skip":
        # On the driver's node (the head on a cluster): a spot node's reclamation must not take it.
        here = ray.get_runtime_context().get_node_id()
        ledger = BadInputLedger.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()
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
    dec = DecodeSamples(cfg, categories, augment, keep_crowd, ledger) if decode else None
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
    """Execution options for `ray.train.DataConfig(execution_options=...)`: keeps the reproducible order.

    Train's ``DataConfig.default_ingest_options()`` with ``preserve_order``, built here because Ray 2.60's
    copies the deprecated ``exclude_resources`` and so prints a deprecation warning in every run.
    """
    current = ray.data.DataContext.get_current().execution_options
    return ray.data.ExecutionOptions(
        resource_limits=current.resource_limits, preserve_order=True, verbose_progress=current.verbose_progress
    )
