"""`python -m pipelines.data prepare --split train [--split val] key=value ...`: write Parquet shards of splits."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from pipelines.data.data_config import DataConfig
from pipelines.data.parquet import prepare_parquet
from pipelines.job_config import ConfigError, apply_overrides, format_validation_error


def main(argv: list[str] | None = None) -> int:
    """Exit status 0, 2 for a bad argument or field, 1 for bad data (the message names the file)."""
    p = argparse.ArgumentParser(
        prog="python -m pipelines.data", description="Prepare Parquet shards of a COCO split for faster reading."
    )
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
    except ValidationError as e:
        p.error(format_validation_error(e, DataConfig).replace("\n", "; "))
    if cfg.parquet_dir is None:
        p.error("parquet_dir=... is required: the folder or bucket prefix the shards are written to")
    for split in args.split:
        try:
            print(prepare_parquet(cfg, split))
        except (OSError, ValueError) as e:  # BadInputError is a ValueError
            print(f"error: {split}: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
