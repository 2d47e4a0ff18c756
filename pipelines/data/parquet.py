"""Prepared Parquet shards of a split: the joined rows (image bytes + annotations) written once, read fast.

python -m pipelines.data prepare --split train root=/data/coco parquet_dir=/data/coco-parquet
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipelines.data.coco import ROW_SCHEMA, BadInputSummary, attach_image_bytes, check_bad_input
from pipelines.data.data_config import DataConfig, Split
from pipelines.data.index import load_index
from pipelines.storage import absolute, filesystem_for, join_uri, write_bytes

MANIFEST_VERSION = 1


def manifest_uri(cfg: DataConfig, split: Split) -> str:
    """The manifest of a split's prepared shards: shard paths, row groups, categories, bad input."""
    return join_uri(cfg.parquet_uri(), f"{split}_manifest.json")


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
        fs, path = filesystem_for(join_uri(self.out_uri, rel), cfg.storage_options)
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
    out_uri = join_uri(absolute(cfg.parquet_uri()), split)
    num_shards = math.ceil(meta.num_rows / cfg.images_per_shard)
    compute = ray.data.TaskPoolStrategy(size=cfg.num_decode_workers) if cfg.num_decode_workers is not None else None
    ds = ray.data.range(num_shards, override_num_blocks=max(1, num_shards)).map_batches(
        _WriteShard(meta, absolute(cfg.images_uri(split)), out_uri, cfg),
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
    uri = manifest_uri(cfg, split)
    write_bytes(absolute(uri), json.dumps(manifest, indent=1).encode(), cfg.storage_options)
    return uri
