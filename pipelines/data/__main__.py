"""`python -m pipelines.data prepare --split train [--split val] key=value ...`: write Parquet shards of splits."""

from __future__ import annotations

import argparse

from pipelines.job_config import ConfigError, apply_overrides
from pipelines.data.data_config import DataConfig
from pipelines.data.parquet import prepare_parquet


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
    try:
        cfg = DataConfig(**apply_overrides({}, args.overrides))
    except ConfigError as e:
        p.error(str(e))
    for split in args.split:
        print(prepare_parquet(cfg, split))


if __name__ == "__main__":
    main()
